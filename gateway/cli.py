"""`triage serve | check | schema | sim | key | explain | classifier`."""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from gateway.policy import ENDPOINTS, Policy, PolicyError, hash_key, load_policy

if TYPE_CHECKING:
    from starlette.applications import Starlette

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["classifier"]:
        from classifiers.commands import main as classifier_main

        return int(classifier_main(argv[1:]))
    args = _parser().parse_args(argv)
    result: int = args.handler(args)
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="triage", description=__doc__)
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--policy", required=True)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--workers", type=int, default=1)
    serve.add_argument("--log-level", default=None, help="default: TRIAGE_LOG_LEVEL or info")
    serve.add_argument(
        "--timeout-graceful-shutdown",
        type=int,
        default=30,
        help="seconds to let in-flight requests and streams finish after SIGTERM",
    )
    serve.set_defaults(handler=_serve)

    check = commands.add_parser("check", help="validate a policy file; exit 1 on errors")
    check.add_argument("policy")
    check.set_defaults(handler=_check)

    schema = commands.add_parser("schema", help="print the policy's JSON Schema")
    schema.set_defaults(handler=_schema)

    key = commands.add_parser("key", help="API keys")
    key_commands = key.add_subparsers(required=True, metavar="ACTION")
    key_new = key_commands.add_parser("new", help="print a fresh key and its hash")
    key_new.set_defaults(handler=_key_new)

    explain = commands.add_parser("explain", help="show how a prompt would be routed")
    explain.add_argument("prompt")
    explain.add_argument("--policy", required=True)
    explain.set_defaults(handler=_explain)

    sim = commands.add_parser("sim", help="run one simulated GPU backend")
    from gateway.sim.cli import add_sim_arguments

    add_sim_arguments(sim)
    sim.set_defaults(handler=_sim)

    commands.add_parser("classifier", help="train, evaluate or score a difficulty classifier")
    return parser


def _load_or_report(path: str) -> Policy | None:
    try:
        return load_policy(path)
    except PolicyError as exc:
        print(f"{path}: invalid policy", file=sys.stderr)
        for line in exc.errors:
            print(f"  {line}", file=sys.stderr)
        return None


def _check(args: argparse.Namespace) -> int:
    policy = _load_or_report(args.policy)
    if policy is None:
        return 1
    print(f"{args.policy}: ok ({len(policy.tiers)} tiers, {len(policy.models)} models)")
    for line in _tier_lines(policy):
        print(f"  {line}")
    return 0


def _tier_lines(policy: Policy) -> list[str]:
    """One line per tier: the endpoints it serves, and where `auto` sends by default."""
    lines = []
    for name, served in policy.tier_endpoints.items():
        roles = [name == policy.default_tier and "default", name == _strongest(policy) and "strong"]
        marks = ", ".join(role for role in roles if role)
        endpoints = ", ".join(kind for kind in ENDPOINTS if kind in served)
        lines.append(f"{name}: {endpoints}" + (f" ({marks})" if marks else ""))
    return lines


def _strongest(policy: Policy) -> str | None:
    """The tier `strong_fraction` sends its share to, if the policy sets one."""
    return policy.strongest_tier if policy.routing.strong_fraction is not None else None


def _serve(args: argparse.Namespace) -> int:
    policy = _load_or_report(args.policy)
    if policy is None:
        return 1
    if args.workers > 1 and policy.store.redis_url is None and policy.has_quotas:
        # Each worker would hold its own spend and rate windows: N times every budget.
        print(
            f"{args.policy}: --workers {args.workers} needs store.redis_url: the in-process "
            "store is per worker, so budgets and rate limits would each be counted "
            f"{args.workers} times over. Set store.redis_url, or serve with one worker.",
            file=sys.stderr,
        )
        return 2
    from gateway.server import ConnectionLimits, serve
    from gateway.telemetry.logs import configure_logging

    configure_logging(args.log_level)
    os.environ["TRIAGE_POLICY"] = args.policy  # read by gateway.asgi in each worker process
    if args.log_level:
        os.environ["TRIAGE_LOG_LEVEL"] = args.log_level  # read by gateway.asgi too
    if args.workers > 1 and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        # Workers write their metrics to files here, so one scrape sees all of them.
        import tempfile

        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="triage-metrics-")
    if args.workers > 1:
        from gateway.server import SUPERVISOR_PID
        from gateway.telemetry.metrics import reset_multiprocess_dir

        # A worker that reloads the policy asks this process to restart all of them.
        os.environ[SUPERVISOR_PID] = str(os.getpid())
        reset_multiprocess_dir(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    listener = policy.server
    serve(
        "gateway.asgi:app" if args.workers > 1 else _app(args.policy),
        host=args.host,
        port=args.port,
        workers=args.workers,
        limits=ConnectionLimits(
            max_header_bytes=listener.max_header_bytes,
            max_headers=listener.max_headers,
            client_timeout_s=listener.client_timeout_s,
        ),
        log_level=(args.log_level or os.environ.get("TRIAGE_LOG_LEVEL") or "info").lower(),
        grace_s=args.timeout_graceful_shutdown,
    )
    return 0


def _app(policy: str) -> Starlette:
    from gateway.app import build_app

    return build_app(policy)


def _schema(args: argparse.Namespace) -> int:
    print(json.dumps(Policy.model_json_schema(), indent=2))
    return 0


def _key_new(args: argparse.Namespace) -> int:
    key = "sk-triage-" + secrets.token_urlsafe(32)
    print(f"key:  {key}\nhash: {hash_key(key)}")
    return 0


def _explain(args: argparse.Namespace) -> int:
    from pathlib import Path

    from gateway.router import RouteInput, Router
    from gateway.runtime import load_classifier

    policy = _load_or_report(args.policy)
    if policy is None:
        return 1
    scorer, thresholds = load_classifier(policy, Path(args.policy).parent)

    body = {"model": "auto", "messages": [{"role": "user", "content": args.prompt}]}
    route = RouteInput("auto", body, {}, len(args.prompt) // 4 + 1)
    decision = Router(policy, scorer, thresholds).decide(route)
    print(f"tier:       {decision.tier} ({decision.reason})")
    if decision.difficulty is not None:
        print(f"difficulty: {decision.difficulty:.4f}")
        print("thresholds: " + ", ".join(f"{t} >= {v:.4f}" for t, v in thresholds.items()))
        explain = getattr(scorer, "explain", None)
        if explain is not None:
            print("features:")
            for name, weight in explain(body):
                print(f"  {weight:+.4f}  {name}")
    return 0


def _sim(args: argparse.Namespace) -> int:
    from gateway.sim.cli import run_from_args

    return run_from_args(args)


if __name__ == "__main__":
    raise SystemExit(main())
