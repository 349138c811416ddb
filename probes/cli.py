"""The ``landscape`` command.

``landscape report [CONFIG.toml] [--out DIR] [--seed N]`` — train or load a model zoo, run every
probe and write ``DIR/index.html``, ``DIR/results.json`` and ``DIR/checkpoints/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="landscape", description="Loss-landscape geometry and model merging.")
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="run a batch geometry report")
    rep.add_argument("config", nargs="?", default=None, help="TOML config file (default: built-in digits MLPs)")
    rep.add_argument("--out", default="report", help="output folder (default: ./report)")
    rep.add_argument("--seed", type=int, default=None, help="override the config's seed")
    rep.add_argument("--quiet", action="store_true", help="print nothing but errors")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``landscape`` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    from probes.config import load_config

    try:
        config = load_config(args.config)
        if args.seed is not None:
            if args.seed < 0:
                msg = f"--seed must be a non-negative int, got {args.seed}"
                raise ValueError(msg)
            config = dataclasses.replace(config, seed=args.seed)
        from probes.report import run_report

        log = (lambda _msg: None) if args.quiet else (lambda msg: print(msg, flush=True))
        run_report(config, args.out, log=log)
    except ValueError as err:
        print(f"landscape: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
