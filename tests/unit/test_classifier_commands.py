"""The train / eval / score command line on a tiny data file."""

from __future__ import annotations

import io
import json
from pathlib import Path

from classifiers.commands import explain_lines, main
from classifiers.model import load_model


def _write(path: Path, n: int = 60) -> Path:
    rows: list[dict[str, object]] = []
    for i in range(n):
        hard = i % 3 == 0
        prompt = f"solve the integral of x^{i} step by step" if hard else f"say hi number {i}"
        rows.append({"prompt": prompt, "weak": 0 if hard else 1, "strong": 1, "source": "t"})
    rows.append(
        {"prompt": None, "prompt_sha256": "ab" * 32, "tier": "small", "weak": 1, "strong": 1}
    )
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_train_eval_score(tmp_path: Path) -> None:
    data = _write(tmp_path / "rows.jsonl")
    out = io.StringIO()
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "m")], out) == 0
    assert "skipped 1 rows without prompt text" in out.getvalue()

    out = io.StringIO()
    assert main(["eval", "--model", str(tmp_path / "m"), "--data", str(data)], out) == 0
    text = out.getvalue()
    assert "APGR" in text and "random" in text and "length" in text

    out = io.StringIO()
    assert main(["score", "--model", str(tmp_path / "m"), "--data", str(data)], out) == 0
    scores = [float(line) for line in out.getvalue().splitlines()]
    assert len(scores) == 61
    assert scores[0] > scores[1]

    lines = explain_lines(load_model(tmp_path / "m"), {"prompt": "solve the integral"})
    assert lines[0].startswith("score ")


def test_bad_model_is_an_error_not_a_traceback(tmp_path: Path) -> None:
    data = _write(tmp_path / "rows.jsonl")
    assert main(["score", "--model", str(tmp_path / "missing"), "--data", str(data)]) == 2


def test_cv_holds_out_subjects(tmp_path: Path) -> None:
    rows = []
    for i in range(120):
        hard = i % 3 == 0
        prompt = f"prove the theorem about x^{i} step by step" if hard else f"name colour {i}"
        rows.append(
            {
                "prompt": prompt,
                "weak": 0 if hard else 1,
                "strong": 1,
                "source": "exam",
                "subject": f"s{i % 6}",
            }
        )
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = io.StringIO()
    assert main(["cv", "--data", str(data), "--folds", "3", "--repeats", "1"], out) == 0
    text = out.getvalue()
    assert "exam: 120 rows, 6 subjects, 3-fold by subject x1" in text
    assert "standard deviation across folds" in text
