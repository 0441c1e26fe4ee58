"""``qrobust eval CHECKPOINT``: clean accuracy of a checkpoint, with a 95% interval."""

from __future__ import annotations

import argparse
import json

import torch

from qrobust.checkpoint import load_checkpoint
from qrobust.cli.common import (
    add_checkpoint,
    add_data,
    add_device,
    checkpoint_path,
    nonneg_int,
    one_line_errors,
)
from qrobust.data import check_images, load_dataset
from qrobust.errors import QrobustError
from qrobust.evaluate import predict, wilson_interval
from qrobust.utils import resolve_device


def run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    model, config = load_checkpoint(checkpoint_path(args), device)
    spec = args.data or config.get("dataset", "digits")
    data = load_dataset(spec, root=args.data_root, download=args.download)
    test = data.test.head(args.n) if args.n else data.test
    if len(test) == 0:
        raise QrobustError(f"{test.name} holds no images; evaluate on a dataset with a test split")
    x, y = test.tensors(device)
    check_images(x, tuple(config["model"].get("input_shape", x.shape[1:])), f"dataset {data.name}")
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
