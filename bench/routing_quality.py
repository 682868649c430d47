"""Routing quality with subjects held out: `python bench/routing_quality.py [FILE.jsonl ...]`.

Same as `triage classifier cv --data ...`: per source, APGR / CPT(50%) / CPT(80%) of the
classifier trained without the held-out subjects, against a random and a prompt-length router.
Defaults to the shared routing data (MMLU train subjects + Arena-Hard v1).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from classifiers.commands import main  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "routing"
DEFAULT = [str(DATA / "mmlu-train.jsonl"), str(DATA / "arena-hard-v1.jsonl")]

if __name__ == "__main__":
    raise SystemExit(main(["cv", "--data", *(sys.argv[1:] or DEFAULT)]))
