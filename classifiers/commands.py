"""`triage classifier train | eval | score | cv | promote`: the classifier's command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

from classifiers.adapt import TrafficConfig, TrafficRows
from classifiers.crossval import HeldOutSource, Mixture
from classifiers.data import DataError, Row, read_rows
from classifiers.features import Features
from classifiers.model import DifficultyModel, ModelLoadError, load_model
from classifiers.training import LabelledRequest, TrainConfig

__all__ = ["DEFAULT_HOLDOUT", "explain_lines", "loso_lines", "main", "report_lines"]

DEFAULT_HOLDOUT = 0.2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="triage classifier", description="Train and evaluate the difficulty classifier."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a model from JSONL rows")
    train.add_argument("--data", nargs="+", required=True, metavar="FILE.jsonl")
    train.add_argument("--out", required=True, metavar="DIR")
    train.add_argument(
        "--traffic",
        nargs="+",
        default=[],
        metavar="FILE.jsonl",
        help="labelled traffic rows (gateway feedback/shadow labels), fitted on top of the "
        "base data; rows without outcomes are skipped",
    )
    train.add_argument(
        "--traffic-weight",
        type=float,
        default=TrafficConfig().weight,
        help="how many base rows one traffic row counts for (default measured by bench/adapt.py)",
    )
    train.add_argument(
        "--holdout",
        type=float,
        default=DEFAULT_HOLDOUT,
        help="share of traffic rows (a fixed rule on each row's key) never trained on: the "
        "slice `promote` compares models on",
    )
    train.add_argument("--alpha", type=float, default=TrainConfig().alpha)
    train.add_argument("--dense-alpha", type=float, default=TrainConfig().dense_alpha)
    train.add_argument(
        "--length-weight",
        default="auto",
        metavar="W|auto",
        help="share of the ranking taken from prompt length, 0-1; auto (the default) picks it "
        "on the traffic labels when --traffic has enough, else by leaving each training source "
        "out in turn (needs two sources, else 0)",
    )
    evaluate = commands.add_parser("eval", help="APGR and CPT against random and length")
    evaluate.add_argument("--model", required=True, metavar="DIR")
    evaluate.add_argument("--data", nargs="+", required=True, metavar="FILE.jsonl")
    score = commands.add_parser("score", help="one score per input row on stdout")
    score.add_argument("--model", required=True, metavar="DIR")
    score.add_argument("--data", nargs="+", required=True, metavar="FILE.jsonl")
    promote = commands.add_parser(
        "promote", help="install a candidate only if it routes held-out traffic better"
    )
    promote.add_argument("--candidate", required=True, metavar="DIR")
    promote.add_argument("--current", required=True, metavar="DIR", help="the policy's classifier")
    promote.add_argument("--labels", nargs="+", required=True, metavar="FILE.jsonl")
    promote.add_argument("--resamples", type=int, default=1000)
    promote.add_argument("--seed", type=int, default=0)
    promote.add_argument("--confidence", type=float, default=0.95)
    promote.add_argument(
        "--reload", metavar="URL", help="POST here after installing (the gateway's /admin/reload)"
    )
    promote.add_argument(
        "--admin-key-env",
        default="TRIAGE_ADMIN_KEY",
        metavar="NAME",
        help="environment variable holding the admin key sent to --reload",
    )
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
    from classifiers.features import extract
    from classifiers.training import fit_linear

    if not 0.0 <= args.holdout < 1.0:
        raise ValueError(f"--holdout must be in [0, 1), got {args.holdout!r}")
    rows, _ = _labelled(read_rows(args.data), out)
    config = TrainConfig(alpha=args.alpha, dense_alpha=args.dense_alpha)
    features = [extract(row.request) for row in rows]
    metadata: dict[str, Any] = {"data": [Path(p).name for p in args.data]}
    traffic = _traffic(args, features, out) if args.traffic else None
    fitted = None
    if traffic is not None:
        from classifiers.adapt import adapt

        linear = fit_linear(rows, config, features)
        settings = replace(TrafficConfig(), weight=args.traffic_weight)
        fitted = adapt(linear, traffic.rows, traffic.features, settings)
        metadata["traffic"] = {
            "files": [Path(p).name for p in args.traffic],
            "rows": len(traffic.rows),
            "skipped": traffic.skipped,
            "holdout": args.holdout,
            "weight": args.traffic_weight,
        }
        if fitted is None:
            print(
                f"traffic: {len(traffic.rows)} usable rows, too few to learn from "
                f"(need {settings.min_rows} with differing gains): base data only",
                file=out,
            )
        else:
            if args.length_weight != "auto":
                fitted = replace(fitted, length_weight=float(args.length_weight))
            length_weight = fitted.length_weight
            detail = ", ".join(
                f"{w:g}: {a:.3f} ({fitted.cv_bound[w]:+.3f})" for w, a in fitted.cv_apgr.items()
            )
            print(
                f"traffic: {fitted.rows} rows, length weight {length_weight:g} (out-of-fold "
                f"APGR by weight, with the lower bound of its margin over length: {detail}; "
                f"length {fitted.length_apgr:.3f})",
                file=out,
            )
            metadata["traffic"].update(
                length_weight=length_weight,
                cv_apgr={f"{w:g}": a for w, a in fitted.cv_apgr.items()},
                cv_margin_bound={f"{w:g}": b for w, b in fitted.cv_bound.items()},
                length_apgr=fitted.length_apgr,
            )
    if fitted is not None and traffic is not None:
        from classifiers.training import finish

        model = finish(
            [*rows, *traffic.rows],
            [*features, *traffic.features],
            fitted.linear,
            replace(config, length_weight=fitted.length_weight),
            metadata=metadata,
            stats=fitted.stats,
        )
        trained = len(rows) + len(traffic.rows)
    else:
        model = _train_base(args, rows, features, config, metadata, out)
        trained = len(rows)
    path = model.save(args.out)
    print(f"trained on {trained} rows, {len(model.tokens)} word weights -> {path}", file=out)
    return 0


def _train_base(
    args: argparse.Namespace,
    rows: Sequence[LabelledRequest],
    features: Sequence[Features],
    config: TrainConfig,
    metadata: Mapping[str, Any],
    out: TextIO,
) -> DifficultyModel:
    from classifiers.crossval import choose_length_weight
    from classifiers.training import fit

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
    return fit(rows, config, metadata=metadata, features=features)


def _traffic(args: argparse.Namespace, known: Sequence[Features], out: TextIO) -> TrafficRows:
    from classifiers.adapt import traffic_rows
    from classifiers.promote import held_out

    every = traffic_rows(read_rows(args.traffic, labelled=False), known)
    keep = [i for i, key in enumerate(every.keys) if not held_out(key, args.holdout)]
    print(
        f"traffic: {len(every.rows)} labelled rows, {len(every.rows) - len(keep)} held out for "
        f"promote, {every.skipped} skipped (no outcomes, or neither prompt nor features)",
        file=out,
    )
    return TrafficRows(
        rows=[every.rows[i] for i in keep],
        features=[every.features[i] for i in keep],
        keys=[every.keys[i] for i in keep],
        skipped=every.skipped,
    )


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


def _promote(args: argparse.Namespace, out: TextIO) -> int:
    """Exit 0 when installed, 1 when the candidate is not better, 3 when the reload failed."""
    from classifiers.adapt import traffic_rows
    from classifiers.promote import card_section, compare, held_out, install

    candidate = load_model(args.candidate)
    current = load_model(args.current)
    # Rows stored without text carry word hashes: the words either model weighs are the only
    # ones whose hashes need mapping back for scoring.
    words = frozenset(w.encode("ascii", "replace") for m in (candidate, current) for w in m.tokens)
    every = traffic_rows(read_rows(args.labels, labelled=False), [Features((), words)])
    shares = [_holdout_of(model) for model in (candidate, current)]
    share = min(s for s in shares if s is not None) if any(s is not None for s in shares) else 0.0
    if share <= 0.0:
        print(
            "not promoted: the candidate's metadata has no traffic hold-out; train it with "
            "`--traffic ... --holdout SHARE` so that some labels are never trained on",
            file=out,
        )
        return 1
    keep = [i for i, key in enumerate(every.keys) if held_out(key, share)]
    comparison = compare(
        candidate,
        current,
        [every.features[i] for i in keep],
        [every.rows[i].weak for i in keep],
        [every.rows[i].strong for i in keep],
        resamples=args.resamples,
        seed=args.seed,
        confidence=args.confidence,
    )
    c = comparison
    print(
        f"held-out traffic rows: {c.rows} (hold-out share {share:g})\n"
        f"candidate APGR {c.candidate_apgr.value:.3f}, current {c.current_apgr.value:.3f}, "
        f"length {c.length_apgr:.3f}; gain {c.apgr_gain.value:+.3f} "
        f"({c.confidence:.0%} interval {c.apgr_gain.low:+.3f} to {c.apgr_gain.high:+.3f}, "
        f"{c.resamples} resamples)\n"
        f"CPT(50%) candidate {c.candidate_cpt50.value:.1%}, current {c.current_cpt50.value:.1%}",
        file=out,
    )
    if not c.better:
        print(
            f"not promoted: the APGR gain's interval reaches {c.apgr_gain.low:+.3f}, not above 0",
            file=out,
        )
        return 1
    path = install(
        Path(args.candidate), Path(args.current), c, card_section(c, args.candidate, args.labels)
    )
    print(f"promoted: {path} (previous kept as model.previous.json)", file=out)
    if args.reload:
        return _reload(args.reload, args.admin_key_env, out)
    return 0


def _holdout_of(model: DifficultyModel) -> float | None:
    traffic = model.metadata.get("traffic")
    share = traffic.get("holdout") if isinstance(traffic, Mapping) else None
    return float(share) if isinstance(share, int | float) and share > 0 else None


def _reload(url: str, key_env: str, out: TextIO) -> int:
    import os
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, method="POST", data=b"")
    key = os.environ.get(key_env)
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            print(f"reload: {response.status} {response.read().decode(errors='replace')}", file=out)
            return 0
    except (urllib.error.URLError, OSError) as exc:
        print(f"reload failed ({exc}); the new model is installed: reload by hand", file=out)
        return 3


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
    handlers = {"train": _train, "eval": _eval, "score": _score, "cv": _cv, "promote": _promote}
    try:
        return handlers[args.command](args, stream)
    except (DataError, ModelLoadError, ValueError) as exc:
        print(f"triage classifier {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
