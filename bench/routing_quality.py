"""Routing quality, each source held out whole: `python bench/routing_quality.py [FILE.jsonl ...]`.

Same as `triage classifier cv --by source --data ...`: for each source, APGR of the classifier
trained on the other sources only (its length blend weight chosen by leaving out each of those
in turn), of the same model unblended, of prompt length and of random; then all held-out
sources pooled in equal parts. Defaults to every file in the shared routing data. Subjects held
out within a source: `triage classifier cv --data ...`.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from classifiers.commands import main  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "routing"
DEFAULT = sorted(str(path) for path in DATA.glob("*.jsonl"))

if __name__ == "__main__":
    raise SystemExit(main(["cv", "--by", "source", "--data", *(sys.argv[1:] or DEFAULT)]))
