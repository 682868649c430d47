from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from gateway.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_check_ok(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(ROOT / "policies/demo.yaml")]) == 0
    assert "ok (2 tiers, 2 models)" in capsys.readouterr().out


def test_check_says_which_tiers_serve_which_endpoints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = yaml.safe_load((ROOT / "policies/demo.yaml").read_text())
    raw["models"]["tiny-embed"] = {"simulate": {"profile": "instant"}, "endpoints": ["embeddings"]}
    raw["tiers"]["embed"] = {"models": ["tiny-embed"]}
    path = tmp_path / "embed.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert main(["check", str(path)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"{path}: ok (3 tiers, 3 models)",
        "  cheap: chat, completions (default)",
        "  large: chat, completions (strong)",
        "  embed: embeddings",
    ]


def test_check_rejects_a_model_in_no_tier(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = yaml.safe_load((ROOT / "policies/demo.yaml").read_text())
    raw["models"]["spare"] = {"simulate": {"profile": "instant"}}
    path = tmp_path / "spare.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["check", str(path)]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"{path}: invalid policy",
        "  models.spare: in no tier; add it to a tier's models or remove it",
    ]


def test_check_prints_every_error_with_its_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = yaml.safe_load((ROOT / "policies/demo.yaml").read_text())
    raw["tiers"]["large"]["slo"]["ttft_ms"] = 0
    raw["tiers"]["cheap"]["slo"]["percentile"] = 101
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["check", str(path)]) == 1
    err = capsys.readouterr().err
    assert "  tiers.large.slo.ttft_ms: must be > 0" in err
    assert "  tiers.cheap.slo.percentile: must be <= 100" in err
    assert "Traceback" not in err


def test_schema_is_json_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["additionalProperties"] is False
    assert {"models", "tiers", "routing", "version"} <= set(schema["properties"])


def test_key_new_prints_key_and_its_hash(capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.policy import hash_key

    assert main(["key", "new"]) == 0
    lines = dict(line.split(":", 1) for line in capsys.readouterr().out.splitlines())
    assert hash_key(lines["key"].strip()) == lines["hash"].strip()


def test_workers_with_quotas_need_a_shared_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Budgets and rate limits kept per worker would be counted N times over: refused."""
    policy = yaml.safe_load((ROOT / "policies/demo.yaml").read_text())
    policy["auth"] = {"anonymous": {"limits": {"rpm": 60}}}
    path = tmp_path / "quotas.yaml"
    path.write_text(yaml.safe_dump(policy))
    assert main(["serve", "--policy", str(path), "--workers", "2"]) == 2
    assert "store.redis_url" in capsys.readouterr().err
