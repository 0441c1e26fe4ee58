"""``qrobust models``: list the registered model families and their options."""

from __future__ import annotations

import argparse

from qrobust.cli.common import one_line_errors
from qrobust.models import list_models


def run(args: argparse.Namespace) -> int:
    for entry in list_models():
        opts = ", ".join(f"{k}={v}" for k, v in entry.params().items())
        print(f"{entry.name:10s} {'x'.join(map(str, entry.input_shape)):9s} {entry.description}  [{opts}]")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = one_line_errors(sub.add_parser("models", help="list model families"))
    p.set_defaults(func=run)
