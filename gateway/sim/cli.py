"""Command-line flags for `triage sim`, and running a sim from them."""

from __future__ import annotations

import argparse
import sys

from pydantic import ValidationError

from gateway.sim.faults import FAULT_KINDS, FaultConfig
from gateway.sim.profile import PROFILES, SimProfile, profile_from_name
from gateway.sim.quirks import QUIRKS, quirks_from_name
from gateway.sim.server import serve_sim

__all__ = ["add_sim_arguments", "profile_from_args", "run_from_args"]


def add_sim_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the sim's flags; every profile field left unset keeps the profile's value."""
    parser.add_argument("--profile", choices=sorted(PROFILES), default="small")
    parser.add_argument(
        "--quirks",
        choices=sorted(QUIRKS),
        default="vllm",
        help="behave as this kind of server: endpoints, errors, usage (gateway/sim/quirks.py)",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model", help="served model name")
    parser.add_argument(
        "--ttft-ms", type=float, help="time to first token before per-token prefill"
    )
    parser.add_argument("--prefill-ms-per-token", type=float, help="prefill time per prompt token")
    parser.add_argument("--itl-ms", type=float, help="inter-token latency at batch size 1")
    parser.add_argument("--max-num-seqs", type=int, help="sequences decoded at once")
    parser.add_argument(
        "--batch-slowdown", type=float, help="inter-token latency multiplier at a full batch"
    )
    parser.add_argument("--jitter", type=float, help="delays vary within 1 ± this fraction")
    parser.add_argument("--seed", type=int, help="seed for output text, jitter and faults")
    parser.add_argument("--max-model-len", type=int, help="context window in tokens")
    parser.add_argument("--kv-blocks", type=int, help="KV cache size in blocks")
    parser.add_argument("--block-size", type=int, help="tokens per KV cache block")
    parser.add_argument(
        "--fault-rate", type=float, default=0.0, help="probability a request gets the fault"
    )
    parser.add_argument("--fault-kind", choices=FAULT_KINDS, default="500")
    parser.add_argument("--fault-retry-after-s", type=float, default=1.0)
    parser.add_argument("--fault-stall-after-tokens", type=int, default=3)


def profile_from_args(args: argparse.Namespace) -> SimProfile:
    """The profile named by `--profile` with the flags given applied; ValueError if invalid."""
    return profile_from_name(
        args.profile,
        model=args.model,
        ttft_ms=args.ttft_ms,
        prefill_ms_per_token=args.prefill_ms_per_token,
        itl_ms=args.itl_ms,
        max_num_seqs=args.max_num_seqs,
        batch_slowdown=args.batch_slowdown,
        jitter=args.jitter,
        seed=args.seed,
        max_model_len=args.max_model_len,
        kv_blocks=args.kv_blocks,
        block_size=args.block_size,
    )


def run_from_args(args: argparse.Namespace) -> int:
    """Serve a sim as `args` describe until interrupted; 2 for invalid flags."""
    try:
        profile = profile_from_args(args)
        faults = FaultConfig(
            rate=args.fault_rate,
            kind=args.fault_kind,
            retry_after_s=args.fault_retry_after_s,
            stall_after_tokens=args.fault_stall_after_tokens,
        )
    except ValidationError as exc:
        for error in exc.errors():
            flag = "--fault-" + str(error["loc"][0]).replace("_", "-")
            print(f"triage sim: {flag}: {error['msg']}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"triage sim: {exc}", file=sys.stderr)
        return 2
    serve_sim(profile, args.host, args.port, faults, quirks_from_name(args.quirks))
    return 0
