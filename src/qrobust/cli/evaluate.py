"""``qrobust eval CHECKPOINT``: clean accuracy of a checkpoint, with a 95% interval."""

from __future__ import annotations

import argparse
import json

from qrobust.checkpoint import load_checkpoint
from qrobust.cli.common import add_data, add_device, nonneg_int
from qrobust.data import check_images, load_dataset
from qrobust.evaluate import accuracy, wilson_interval
from qrobust.utils import resolve_device


def run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    model, config = load_checkpoint(args.checkpoint, device)
    data = load_dataset(args.data or config.get("dataset", "digits"), root=args.data_root, download=args.download)
    test = data.test.head(args.n) if args.n else data.test
    x, y = test.tensors(device)
    check_images(x, tuple(config["model"]["input_shape"]), f"dataset {data.name}")
    acc = accuracy(model, x, y)
    lo, hi = wilson_interval(round(acc * len(y)), len(y))
    print(json.dumps({"checkpoint": args.checkpoint, "dataset": data.name, "samples": len(y),
                      "clean_accuracy": acc, "ci95": [lo, hi]}))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="clean accuracy of a checkpoint")
    p.add_argument("checkpoint")
    add_data(p, default=None)
    p.add_argument("-n", type=nonneg_int, default=0, help="first N test images (0 = all)")
    add_device(p)
    p.set_defaults(func=run)
