"""`triage classifier train | eval | score | cv`: the classifier's command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

from classifiers.crossval import HeldOutSource, Mixture
from classifiers.data import DataError, Row, read_rows
from classifiers.model import DifficultyModel, ModelLoadError, load_model
from classifiers.training import LabelledRequest, TrainConfig

__all__ = ["explain_lines", "loso_lines", "main", "report_lines"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="triage classifier", description="Train and evaluate the difficulty classifier."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a model from JSONL rows")
    train.add_argument("--data", nargs="+", required=True, metavar="FILE.jsonl")
    train.add_argument("--out", required=True, metavar="DIR")
    train.add_argument("--alpha", type=float, default=TrainConfig().alpha)
    train.add_argument("--dense-alpha", type=float, default=TrainConfig().dense_alpha)
    train.add_argument(
        "--length-weight",
        default="auto",
        metavar="W|auto",
        help="share of the ranking taken from prompt length, 0-1; auto (the default) picks it "
        "by leaving each training source out in turn (needs two sources, else 0)",
    )
    evaluate = commands.add_parser("eval", help="APGR and CPT against random and length")
    evaluate.add_argument("--model", required=True, metavar="DIR")
    evaluate.add_argument("--data", nargs="+", required=True, metavar="FILE.jsonl")
    score = commands.add_parser("score", help="one score per input row on stdout")
    score.add_argument("--model", required=True, metavar="DIR")
    score.add_argument("--data", nargs="+", required=True, metavar="FILE.jsonl")
    cv = commands.add_parser("cv", help="cross-validated figures, subjects held out")
    cv.add_argument("--data", nargs="+", required=True, metavar="FILE.jsonl")
    cv.add_argument("--folds", type=int, default=5)
    cv.add_argument("--repeats", type=int, default=3)
    cv.add_argument(
        "--by",
        choices=("subject", "source"),
        default="subject",
        help="hold out subject groups within each source, or each source whole (nested: the "
        "length blend weight is chosen on the other sources)",
    )
    return parser


def _labelled(rows: Sequence[Row], out: TextIO) -> tuple[list[LabelledRequest], list[str]]:
    kept: list[LabelledRequest] = []
    subjects: list[str] = []
    for row in rows:
        if row.request is None or row.weak is None or row.strong is None:
            continue
        kept.append(LabelledRequest(row.request, row.weak, row.strong, row.source, row.subject))
        subjects.append(row.subject)
    skipped = len(rows) - len(kept)
    if skipped:
        print(f"skipped {skipped} rows without prompt text", file=out)
    return kept, subjects


def report_lines(results: Sequence[tuple[str, float, float, float]], title: str = "") -> list[str]:
    """A fixed-width table of (router, APGR, CPT50, CPT80) rows."""
    lines = [title] if title else []
    lines.append(f"{'router':<10} {'APGR':>7} {'CPT(50%)':>9} {'CPT(80%)':>9}")
    for name, apgr, cpt50, cpt80 in results:
        lines.append(f"{name:<10} {apgr:>7.3f} {cpt50:>8.1%} {cpt80:>9.1%}")
    return lines


def explain_lines(model: DifficultyModel, request: Mapping[str, Any], top: int = 5) -> list[str]:
    """Score and the features that drove it, for `triage explain`."""
    lines = [f"score {model.score(request):.3f}"]
    for name, contribution in model.explain(request, top=top):
        lines.append(f"  {contribution:+.3f}  {name}")
    return lines


def _train(args: argparse.Namespace, out: TextIO) -> int:
    from classifiers.crossval import choose_length_weight
    from classifiers.features import extract
    from classifiers.training import fit

    rows, _ = _labelled(read_rows(args.data), out)
    config = TrainConfig(alpha=args.alpha, dense_alpha=args.dense_alpha)
    features = [extract(row.request) for row in rows]
    if args.length_weight == "auto":
        weight, margins = choose_length_weight(rows, features, config)
        if weight is None:
            weight = 0.0
            print("length weight 0: one source only, nothing to leave out", file=out)
        else:
            detail = ", ".join(f"{s} {m:+.3f}" for s, m in margins.items())
            print(f"length weight {weight:g} (over length, source left out: {detail})", file=out)
    else:
        weight = float(args.length_weight)
    config = replace(config, length_weight=weight)
    metadata = {"data": [Path(p).name for p in args.data]}
    model = fit(rows, config, metadata=metadata, features=features)
    path = model.save(args.out)
    print(f"trained on {len(rows)} rows, {len(model.tokens)} word weights -> {path}", file=out)
    return 0


def _eval(args: argparse.Namespace, out: TextIO) -> int:
    from classifiers.crossval import length_scores
    from classifiers.features import extract
    from classifiers.metrics import report

    model = load_model(args.model)
    rows, _ = _labelled(read_rows(args.data), out)
    groups: dict[str, list[LabelledRequest]] = {"all": rows}
    sources = sorted({row.source for row in rows})
    if len(sources) > 1:
        for source in sources:
            groups[source] = [row for row in rows if row.source == source]
    for name, members in groups.items():
        weak = [r.weak for r in members]
        strong = [r.strong for r in members]
        scores = [model.score_features(extract(r.request)) for r in members]
        table = [
            report("model", scores, weak, strong),
            report("random", [0.0] * len(members), weak, strong),
            report("length", length_scores(members), weak, strong),
        ]
        title = f"{name}: {len(members)} rows"
        for line in report_lines([(r.name, r.apgr, r.cpt50, r.cpt80) for r in table], title):
            print(line, file=out)
    return 0


def _score(args: argparse.Namespace, out: TextIO) -> int:
    model = load_model(args.model)
    lines = []
    for row in read_rows(args.data, labelled=False):
        # A row without prompt text still gets a line, so line numbers match input rows.
        lines.append(f"{model.score(row.request) if row.request else 0.0:.6f}")
    out.write("\n".join(lines) + ("\n" if lines else ""))
    return 0


def loso_lines(results: Sequence[HeldOutSource], mixture: Mixture) -> list[str]:
    """The leave-one-source-out table: APGR per held-out source and on the equal mixture."""
    lines = [
        f"{'held-out source':<18} {'rows':>6} {'weight':>6} {'model':>7} {'unblended':>9} "
        f"{'length':>7} {'random':>7} {'model-length':>12}"
    ]
    for r in results:
        lines.append(
            f"{r.source:<18} {r.rows:>6} {r.length_weight:>6.1f} {r.model:>7.3f} "
            f"{r.unblended:>9.3f} {r.length:>7.3f} {r.random:>7.3f} {r.model - r.length:>+12.3f}"
        )
    m = mixture
    lines.append(
        f"{f'mixture of {m.sources}':<18} {'':>6} {'':>6} {m.model:>7.3f} {m.unblended:>9.3f} "
        f"{m.length:>7.3f} {m.random:>7.3f} {m.model - m.length:>+12.3f}"
    )
    lines.append(f"mixture, a router that knows each source's mean gain: {m.oracle:.3f}")
    for r in results:
        detail = ", ".join(f"{s} {v:+.3f}" for s, v in r.inner_margins.items())
        lines.append(f"{r.source}: weight {r.length_weight:g} chosen on {detail}")
    return lines


def _cv(args: argparse.Namespace, out: TextIO) -> int:
    from classifiers.crossval import cross_validate, leave_one_source_out

    rows, subjects = _labelled(read_rows(args.data), out)
    if args.by == "source":
        for line in loso_lines(*leave_one_source_out(rows)):
            print(line, file=out)
        return 0
    for result in cross_validate(rows, subjects, folds=args.folds, repeats=args.repeats):
        title = f"{result.source}: {result.rows} rows, {result.subjects} subjects, {result.scheme}"
        table = [
            (r.name, r.apgr, r.cpt50, r.cpt80) for r in (result.model, result.random, result.length)
        ]
        for line in report_lines(table, title):
            print(line, file=out)
        if result.fold_apgr_sd is not None:
            print(
                f"model APGR standard deviation across folds: {result.fold_apgr_sd:.3f}", file=out
            )
    return 0


def main(argv: Sequence[str], out: TextIO | None = None) -> int:
    """Run one subcommand; returns the exit code (2 for unreadable data or model)."""
    args = _parser().parse_args(list(argv))
    stream = out or sys.stdout
    handlers = {"train": _train, "eval": _eval, "score": _score, "cv": _cv}
    try:
        return handlers[args.command](args, stream)
    except (DataError, ModelLoadError, ValueError) as exc:
        print(f"triage classifier {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
