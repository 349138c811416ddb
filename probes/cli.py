"""The ``landscape`` command.

``landscape report [CONFIG.toml] [--out DIR] [--seed N]`` — train or load a model zoo, run every
probe and write ``DIR/index.html``, ``DIR/results.json`` and ``DIR/checkpoints/``.

``landscape config --default`` prints the built-in configuration as TOML with every key
documented; ``landscape config CONFIG.toml`` checks a file and prints the configuration it gives.
``landscape --version`` prints the installed version.

Exit status of ``report`` and ``config``: 0 on success; 2 with one line ``landscape: error: ...``
on stderr for a problem with the command line or the configuration (found before any work
starts); any other error is a bug or a numerical failure and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

__all__ = ["check_out_dir", "main"]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("landscape")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown (not installed)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="landscape", description="Loss-landscape geometry and model merging.")
    parser.add_argument("--version", action="version", version=f"landscape {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    cfg = sub.add_parser("config", help="print the default configuration, or check a file and print its settings")
    cfg.add_argument("config", nargs="?", default=None, help="TOML config file to check (default: none)")
    cfg.add_argument("--default", action="store_true", help="print the built-in default config, every key documented")
    rep = sub.add_parser("report", help="run a batch geometry report")
    rep.add_argument("config", nargs="?", default=None, help="TOML config file (default: built-in digits MLPs)")
    rep.add_argument("--out", default="report", help="output folder (default: ./report)")
    rep.add_argument("--seed", type=int, default=None, help="override the config's seed")
    rep.add_argument("--quiet", action="store_true", help="print nothing but errors (no progress lines)")
    from probes.merge_command import add_parser as add_merge_parser

    add_merge_parser(sub)
    return parser


def check_out_dir(out: str | Path) -> None:
    """ConfigError unless ``out`` is a folder we can write in, or one we can create; creates nothing.

    Writability is tried, not inferred from permission bits (which root ignores): a temporary
    file is made and removed in ``out`` or in its nearest existing ancestor.
    """
    from probes.config import ConfigError

    path = Path(out).absolute()
    if path.exists() and not path.is_dir():
        msg = f"--out {str(out)!r} exists and is not a directory"
        raise ConfigError(msg)
    base = next(p for p in (path, *path.parents) if p.exists())
    if not base.is_dir():
        msg = f"--out {str(out)!r} cannot be created: {str(base)!r} is not a directory"
        raise ConfigError(msg)
    try:
        fd, name = tempfile.mkstemp(prefix=".landscape-write-test-", dir=base)
        os.close(fd)
        os.unlink(name)
    except OSError as err:
        what = "is not writable" if base == path else f"cannot be created: {str(base)!r} is not writable"
        msg = f"--out {str(out)!r} {what} ({err.strerror or err})"
        raise ConfigError(msg) from err


def _config_command(args: argparse.Namespace) -> int:
    from probes.config import config_toml, load_config

    print(config_toml(None if args.default else load_config(args.config)), end="")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``landscape`` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.command == "merge":
        from probes.merge_command import main as merge_main

        return merge_main(args)
    from probes.config import ConfigError, load_config, with_seed

    try:
        if args.command == "config":
            return _config_command(args)
        config = load_config(args.config)
        if args.seed is not None:
            config = with_seed(config, args.seed)
        check_out_dir(args.out)
        from probes.report import run_report

        log = (lambda _msg: None) if args.quiet else (lambda msg: print(msg, flush=True))
        run_report(config, args.out, log=log, progress=False if args.quiet else None)
    except ConfigError as err:
        print(f"landscape: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
