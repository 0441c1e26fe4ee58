"""The ``qrobust`` command: a thin layer that parses arguments and calls the library.

Each subcommand lives in its own module exposing ``register(subparsers)``; the parser it adds
sets ``func(args) -> int``. Every :class:`~qrobust.errors.QrobustError` becomes a one-line
``error: ...`` on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from qrobust import __version__
from qrobust.errors import QrobustError
from qrobust.utils import configure_logging

SUBCOMMANDS = ("models", "train", "evaluate", "attack", "empir", "detect", "run")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qrobust", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"qrobust {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"qrobust.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"qrobust.cli.{name}":
                continue  # subcommand not part of this build
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging()  # the library logs (what it trains where); the command line shows it on stderr
    try:
        return int(args.func(args) or 0)
    except QrobustError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished work is saved, rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
