"""Learning from traffic: labels that contradict the base data win, stored features stand in
for prompt text, promotion installs only a better model, and the replay never scores a row it
trained on."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from types import ModuleType

import pytest

from classifiers.adapt import TrafficConfig, adapt, blended_model, traffic_rows
from classifiers.commands import main
from classifiers.data import DataError, Row, StoredFeatures, feature_record, read_rows
from classifiers.features import extract
from classifiers.model import load_model
from classifiers.promote import held_out
from classifiers.training import LabelledRequest, TrainConfig, fit_linear

ROOT = Path(__file__).resolve().parents[2]
# Both kinds of prompt have the same length and word lengths: only the words tell them apart.
HARD_IN_BASE = "zorblax quantum flux {i:04d}"
EASY_IN_BASE = "fribble kitchen yarn {i:04d}"


def _rows(n: int, hard: str, easy: str, source: str, **extra: object) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for i in range(n):
        is_hard = i % 2 == 0
        text = (hard if is_hard else easy).format(i=i)
        weak = 0 if is_hard or i % 10 == 1 else 1  # one easy prompt in five still gains
        rows.append(
            {"request_id": f"{source}-{i}", "prompt": text, "weak": weak, "strong": 1}
            | {"source": source}
            | extra
        )
    return rows


def _write(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _base(tmp_path: Path) -> Path:
    return _write(tmp_path / "base.jsonl", _rows(200, HARD_IN_BASE, EASY_IN_BASE, "exam"))


def _traffic(tmp_path: Path, private: bool = False) -> Path:
    # The operator's traffic says the opposite: kitchen prompts need the strong model.
    rows = _rows(300, EASY_IN_BASE, HARD_IN_BASE, "prod")
    if private:
        for row in rows:
            row["features"] = feature_record({"prompt": row.pop("prompt")})
            row["prompt"] = None
    return _write(tmp_path / ("private.jsonl" if private else "traffic.jsonl"), rows)


def _train(tmp_path: Path, out: str, *extra: str) -> str:
    stream = io.StringIO()
    args = ["train", "--data", str(_base(tmp_path)), "--out", str(tmp_path / out), *extra]
    assert main(args, stream) == 0, stream.getvalue()
    return stream.getvalue()


def _scores(directory: Path) -> tuple[float, float]:
    model = load_model(directory)
    return (
        model.score({"prompt": HARD_IN_BASE.format(i=9998)}),
        model.score({"prompt": EASY_IN_BASE.format(i=9999)}),
    )


def test_traffic_labels_that_contradict_the_base_flip_the_decision(tmp_path: Path) -> None:
    _train(tmp_path, "base", "--length-weight", "0")
    zorblax, kitchen = _scores(tmp_path / "base")
    assert zorblax > kitchen  # what the base data teaches

    text = _train(tmp_path, "adapted", "--traffic", str(_traffic(tmp_path)))
    assert "traffic: 300 labelled rows" in text
    zorblax, kitchen = _scores(tmp_path / "adapted")
    assert kitchen > zorblax  # what the traffic teaches
    metadata = load_model(tmp_path / "adapted").metadata
    assert metadata["traffic"]["holdout"] == 0.2
    assert metadata["traffic"]["length_weight"] < 1.0


def test_rows_without_prompt_text_retrain_the_same_way(tmp_path: Path) -> None:
    _train(tmp_path, "text", "--traffic", str(_traffic(tmp_path)))
    _train(tmp_path, "private", "--traffic", str(_traffic(tmp_path, private=True)))
    assert _scores(tmp_path / "private") == pytest.approx(_scores(tmp_path / "text"), abs=1e-3)
    assert '"fribble' not in (tmp_path / "private.jsonl").read_text()


def test_stored_features_map_back_to_known_words_only() -> None:
    known = extract({"prompt": "fluffy kitten"})
    record = feature_record({"prompt": "fluffy kitten secretname"})
    stored = StoredFeatures(tuple(record["dense"]), tuple(record["words"]))
    row = Row(None, 0.0, 1.0, "prod", "prod", "", features=stored, key="k")
    other = Row(None, 1.0, 0.0, "prod", "prod", "", features=stored, key="j")
    result = traffic_rows([row, other], known=[known])
    tokens = result.features[0].tokens
    assert {b"fluffy", b"kitten"} <= tokens
    assert len(tokens) == 3  # the unknown word still counts towards the normalisation
    assert b"secretname" not in tokens


def test_a_features_record_of_another_version_is_refused(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "old.jsonl",
        [{"prompt": None, "weak": 0, "strong": 1, "features": {"format": "old", "dense": []}}],
    )
    with pytest.raises(DataError, match="triage-features-2"):
        read_rows([path])


def test_too_few_traffic_rows_leave_the_base_model() -> None:
    rows = [LabelledRequest({"prompt": f"p {i}"}, 0.0, float(i % 2), "traffic") for i in range(10)]
    features = [extract(row.request) for row in rows]
    base = fit_linear(rows, TrainConfig(min_count=1), features)
    assert adapt(base, rows, features, TrafficConfig(min_rows=30)) is None
    fitted = adapt(base, rows * 3, features * 3, TrafficConfig(min_rows=30))
    assert fitted is not None and fitted.rows == 30
    # Nothing here beats length out of fold, so the blend falls back to length alone.
    assert fitted.length_weight == 1.0
    assert set(blended_model(fitted).tokens) == set()


def _promote(*args: str) -> tuple[int, str]:
    stream = io.StringIO()
    return main(["promote", *args], stream), stream.getvalue()


def test_promote_installs_a_better_candidate_and_refuses_a_worse_one(tmp_path: Path) -> None:
    _train(tmp_path, "current", "--length-weight", "0", "--traffic", str(_base(tmp_path)))
    _train(tmp_path, "candidate", "--traffic", str(_traffic(tmp_path)))
    labels = str(_traffic(tmp_path))
    old = (tmp_path / "current" / "model.json").read_bytes()

    code, text = _promote(
        "--candidate", str(tmp_path / "current"), "--current", str(tmp_path / "candidate"),
        "--labels", labels,
    )  # fmt: skip
    assert code == 1 and "not promoted" in text
    assert not (tmp_path / "candidate" / "model.previous.json").exists()
    assert not (tmp_path / "candidate" / "MODEL_CARD.md").exists()

    code, text = _promote(
        "--candidate", str(tmp_path / "candidate"), "--current", str(tmp_path / "current"),
        "--labels", labels, "--resamples", "200",
    )  # fmt: skip
    assert code == 0, text
    installed = json.loads((tmp_path / "current" / "model.json").read_text())
    assert (
        installed["metadata"]["promotion"]["apgr"]
        > installed["metadata"]["promotion"]["apgr_replaced"]
    )
    assert (tmp_path / "current" / "model.previous.json").read_bytes() == old
    card = (tmp_path / "current" / "MODEL_CARD.md").read_text()
    assert "## Promotion" in card and "candidate minus previous" in card
    assert _scores(tmp_path / "current") == pytest.approx(_scores(tmp_path / "candidate"))
    assert not [p for p in (tmp_path / "current").iterdir() if p.name.endswith(".tmp")]


def test_a_failed_install_leaves_the_current_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _train(tmp_path, "current", "--length-weight", "0", "--traffic", str(_base(tmp_path)))
    _train(tmp_path, "candidate", "--traffic", str(_traffic(tmp_path)))
    old = (tmp_path / "current" / "model.json").read_bytes()
    real = os.replace

    def fail_on_model(source: str | Path, target: str | Path) -> None:
        if Path(target).name == "model.json":
            raise OSError("disk full")
        real(source, target)

    monkeypatch.setattr("classifiers.promote.os.replace", fail_on_model)
    with pytest.raises(OSError):
        main(
            ["promote", "--candidate", str(tmp_path / "candidate"), "--current",
             str(tmp_path / "current"), "--labels", str(_traffic(tmp_path))],
            io.StringIO(),
        )  # fmt: skip
    assert (tmp_path / "current" / "model.json").read_bytes() == old
    load_model(tmp_path / "current")


def test_promote_without_a_hold_out_refuses(tmp_path: Path) -> None:
    _train(tmp_path, "a", "--length-weight", "0")
    _train(tmp_path, "b", "--traffic", str(_traffic(tmp_path)), "--holdout", "0")
    code, text = _promote(
        "--candidate", str(tmp_path / "b"), "--current", str(tmp_path / "a"),
        "--labels", str(_traffic(tmp_path)),
    )  # fmt: skip
    assert code == 1 and "no traffic hold-out" in text


def test_the_hold_out_rule_is_stable_and_near_its_share() -> None:
    keys = [f"req-{i}" for i in range(5000)]
    picked = [k for k in keys if held_out(k, 0.2)]
    assert 0.18 < len(picked) / len(keys) < 0.22
    assert picked == [k for k in keys if held_out(k, 0.2)]
    assert not any(held_out(k, 0.0) for k in keys)


class _Recorder(BaseHTTPRequestHandler):
    seen: list[tuple[str, str | None]] = []

    def do_POST(self) -> None:
        type(self).seen.append((self.path, self.headers.get("Authorization")))
        body = b'{"reloaded": true}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def admin() -> Iterator[str]:
    server = HTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/admin/reload"
    server.shutdown()
    server.server_close()
    thread.join()


def test_promote_reloads_the_gateway(
    tmp_path: Path, admin: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _train(tmp_path, "current", "--length-weight", "0", "--traffic", str(_base(tmp_path)))
    _train(tmp_path, "candidate", "--traffic", str(_traffic(tmp_path)))
    monkeypatch.setenv("TEST_ADMIN_KEY", "sekrit")
    _Recorder.seen.clear()
    code, text = _promote(
        "--candidate", str(tmp_path / "candidate"), "--current", str(tmp_path / "current"),
        "--labels", str(_traffic(tmp_path)), "--resamples", "100",
        "--reload", admin, "--admin-key-env", "TEST_ADMIN_KEY",
    )  # fmt: skip
    assert code == 0, text
    assert _Recorder.seen == [("/admin/reload", "Bearer sekrit")]
    assert "reload: 200" in text


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_adapt", ROOT / "bench" / "adapt.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_adapt"] = module
    spec.loader.exec_module(module)
    return module


def test_the_replay_never_scores_a_row_it_trained_on() -> None:
    bench = _bench()
    rows = [
        LabelledRequest({"prompt": f"{source} {i}"}, 0.0, float(i % 2), source)
        for source, n in (("a", 2600), ("b", 900), ("c", 250))
        for i in range(n)
    ]
    for split in bench.splits(rows, seed=3):
        scored = set(split.scored)
        assert len(scored) >= bench.MIN_SCORED
        assert not scored & set(split.base)
        assert not set(split.stream) & set(split.base)
        for k in split.ks:
            labels = split.labels(k)
            assert labels == split.stream[:k]
            assert not set(labels) & scored
        with pytest.raises(ValueError):
            split.labels(max(split.ks) + 1)
        if split.name.startswith("mixture"):
            assert split.ks == bench.KS
        else:
            assert {rows[i].source for i in split.stream} == {split.name}
            assert split.name not in {rows[i].source for i in split.base}


def test_promote_scores_rows_without_text_as_rows_with_it(tmp_path: Path) -> None:
    _train(tmp_path, "current", "--length-weight", "0", "--traffic", str(_base(tmp_path)))
    _train(tmp_path, "candidate", "--traffic", str(_traffic(tmp_path)))
    figures = []
    for labels in (_traffic(tmp_path), _traffic(tmp_path, private=True)):
        code, text = _promote(
            "--candidate", str(tmp_path / "candidate"), "--current", str(tmp_path / "current"),
            "--labels", str(labels), "--resamples", "50",
        )  # fmt: skip
        figures.append(text.splitlines()[1])  # "candidate APGR ..., current ..., length ..."
        (tmp_path / "current" / "model.previous.json").unlink(missing_ok=True)
        if code == 0:  # installed: put the old current back for the second run
            _train(tmp_path, "current", "--length-weight", "0", "--traffic", str(_base(tmp_path)))
    assert figures[0] == figures[1]
