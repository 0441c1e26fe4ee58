"""The ``qrobust`` command: a thin layer that parses arguments and calls the library.

Each subcommand lives in its own module exposing ``register(subparsers)``; the parser it adds
sets ``func(args) -> int``. Every :class:`~qrobust.errors.QrobustError` becomes a one-line
``error: ...`` on stderr and exit code 2 (checks turn a full disk or a read-only folder into one too);
an operating-system error or out-of-memory that no check foresaw is a one-line ``error: ...`` and exit
code 1. See ``docs/bad_inputs.md``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from qrobust.errors import QrobustError
from qrobust.utils import configure_logging
from qrobust.version import __version__

SUBCOMMANDS = ("models", "train", "evaluate", "attack", "empir", "detect", "run", "worst_case")


def build_parser() -> argparse.ArgumentParser:
    from qrobust.cli.common import one_line_errors

    parser = one_line_errors(argparse.ArgumentParser(prog="qrobust", description=__doc__.splitlines()[0]))
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
        from qrobust.distributed import session
        from qrobust.utils import resolve_device

        # under torchrun: one process group per command (gloo on CPU, NCCL on GPU); alone: nothing
        with session(resolve_device(getattr(args, "device", None) or "auto")):
            return int(args.func(args) or 0)
    except QrobustError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `qrobust ... | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:  # the machine, not the input: full disk, read-only folder, missing device
        from qrobust.utils import describe_os_error

        print(f"error: {describe_os_error(exc)}", file=sys.stderr)
        return 1
    except MemoryError:
        print("error: out of memory; lower -n / --nb-samples, --mc or --batch-size", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; finished work is saved, rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
