"""``qrobust eval CHECKPOINT``: clean accuracy of a checkpoint, with a 95% interval."""

from __future__ import annotations

import argparse
import json

import torch

from qrobust.cli.common import (
    add_checkpoint,
    add_data,
    add_device,
    checkpoint_path,
    load_model,
    load_test_split,
    nonneg_int,
    one_line_errors,
)
from qrobust.evaluate import predict, wilson_interval
from qrobust.utils import resolve_device


def run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    model, config = load_model(args, checkpoint_path(args), device)
    data, x, y = load_test_split(args, model, config, args.n, device)
    with torch.no_grad():
        pred = predict(model, x)
    correct = int((pred == y).sum())
    lo, hi = wilson_interval(correct, len(y))
    print(json.dumps({"checkpoint": args.checkpoint, "dataset": data.name, "samples": len(y),
                      "clean_accuracy": correct / len(y), "ci95": [lo, hi]}))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = one_line_errors(sub.add_parser("eval", help="clean accuracy of a checkpoint"))
    add_checkpoint(p)
    add_data(p, default=None)
    p.add_argument("-n", type=nonneg_int, default=0, help="first N test images (0 = all)")
    add_device(p)
    p.set_defaults(func=run)
