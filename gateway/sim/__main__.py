"""`python -m gateway.sim`: serve one simulated GPU replica (same flags as `triage sim`)."""

from __future__ import annotations

import argparse
import sys

from gateway.sim.cli import add_sim_arguments, run_from_args

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.sim", description=__doc__)
    add_sim_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
