"""``qrobust train``: train a registered model on a dataset and write a safe checkpoint."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from qrobust.checkpoint import check_checkpoint_target
from qrobust.cli.common import add_data, add_device, bits, nonneg_int, one_line_errors, positive_int
from qrobust.data import NAMED, folder_image_size, load_dataset
from qrobust.distributed import is_main
from qrobust.errors import QrobustError
from qrobust.models import create_model, get_entry
from qrobust.train import TrainConfig, train_to_checkpoint
from qrobust.train_config import LR_SCHEDULES
from qrobust.utils import resolve_device, seed_everything


def model_kwargs(args: argparse.Namespace) -> dict:
    """Translate generic CLI options into the options the chosen model family takes."""
    accepted = get_entry(args.model).params()
    wanted = {"wbits": args.wbits, "abits": args.abits, "bits": args.bits, "dropout": args.dropout,
              "mc_dropout": args.mc_dropout, "sign_ste": args.sign_ste, "bias": args.bias}
    kwargs = {}
    for key, value in wanted.items():
        if value is None:
            continue
        if key not in accepted:
            raise QrobustError(f"model {args.model!r} has no option --{key.replace('_', '-')}; it takes: "
                               f"{', '.join(sorted(accepted))}")
        kwargs[key] = value
    return kwargs


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model family (see `qrobust models`)")
    p.add_argument("--wbits", type=bits, help="weight bits, 1-32 (EMPIR models)")
    p.add_argument("--abits", type=bits, help="activation bits, 1-32 (EMPIR models)")
    p.add_argument("--bits", type=bits, help="bits of QNN-defense's k-bit QNN (qnn_kbit)")
    p.add_argument("--dropout", type=float, help="dropout rate in [0, 1)")
    p.add_argument("--mc-dropout", dest="mc_dropout", action=argparse.BooleanOptionalAction, default=None,
                   help="keep dropout on at inference")
    p.add_argument("--sign-ste", choices=("hardtanh", "clip"), help="gradient of sign(): BinaryNet or seed "
                                                                    "A's clip")
    p.add_argument("--bias", action=argparse.BooleanOptionalAction, default=None,
                   help="mnistconv: a full-precision bias in every layer (EMPIR has none; adversarial "
                        "training at eps 0.3 needs them, docs/results/adversarial_training.md)")


def data_spec(spec: str) -> str:
    """The dataset as ``qrobust eval`` can find it again: named datasets by name, files by absolute path."""
    path = Path(spec)
    return str(path.resolve()) if spec not in NAMED and path.exists() else spec


def run(args: argparse.Namespace) -> int:
    if args.epochs < 0:
        raise QrobustError(f"--epochs must be >= 0, got {args.epochs}")
    from qrobust.cli.adv import KINDS, adv_settings, build_adversary

    kind = getattr(args, "adv", None)
    # QNN-defense's attacks keep their adversary route; the methods (fgsm-rs, trades) are TrainConfig fields
    method = adv_settings(args) if kind and kind not in KINDS else {
        "adv_start_epoch": getattr(args, "adv_start_epoch", 0) or 0,
        "adv_weight": getattr(args, "adv_weight", 0.5)}
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                      label_smoothing=args.label_smoothing, max_train=args.max_train,
                      lr_schedule=args.lr_schedule, **method)
    cfg.validate()
    out = Path(args.out)
    check_checkpoint_target(out, overwrite=args.force)  # before loading data or training
    device = resolve_device(args.device)
    seed_everything(args.seed)
    model = create_model(args.model, **model_kwargs(args))
    size = folder_image_size(args.data, model.qrobust_config["input_shape"])  # a tree at the model's size
    data = load_dataset(args.data, root=args.data_root, download=args.download, image_size=size)
    adversary = build_adversary(args) if kind in KINDS else None
    test = data.test.head(args.max_test) if args.max_test else data.test

    def report(rec) -> None:
        if not is_main():  # under torchrun, rank 0 speaks for all (the numbers are summed over the ranks)
            return
        print(f"epoch {rec.epoch:3d}  loss {rec.loss:.4f}  train acc {rec.train_accuracy:.4f}  test acc "
              f"{rec.test_accuracy:.4f}  {rec.seconds:.1f}s  {rec.images_per_second:.0f} img/s",
              file=sys.stderr)

    info = {"dataset": data_spec(args.data), "dataset_name": data.name,
            "train": {**vars(cfg), "device": str(device)}}
    if kind:
        info["adversarial_training"] = getattr(args, "adv_description", kind)
    result = train_to_checkpoint(out, model, data, cfg, test=test, info=info, device=device,
                                 adversary=adversary, progress=not args.quiet and is_main(), on_epoch=report,
                                 overwrite=args.force)
    acc = result.test_accuracy  # NaN after --epochs 0: JSON has no NaN, so null
    print(json.dumps({"checkpoint": str(out), "test_accuracy": acc if math.isfinite(acc) else None,
                      "train_seconds": round(result.seconds, 1)}))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = one_line_errors(sub.add_parser("train", help="train a model and save a checkpoint"))
    add_model_options(p)
    add_data(p)
    p.add_argument("--epochs", type=int, default=15, help="training epochs, >= 0 (default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="constant",
                   help="constant (the seeds), cosine decay to 0 over all steps, or cyclic (Wong et al.'s "
                        "FGSM-RS: 0 -> --lr at 2/5 of training -> 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label-smoothing", type=float, default=0.0, help="EMPIR used 0.1 for CIFAR-10")
    p.add_argument("--max-train", type=positive_int, help="use only the first N training images")
    p.add_argument("--max-test", type=nonneg_int, default=0, help="evaluate on the first N test images (0 = "
                                                                  "all)")
    p.add_argument("--out", required=True, help="checkpoint directory to create")
    p.add_argument("--force", action="store_true",
                   help="replace an existing checkpoint (only one qrobust wrote; anything else is refused)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_device(p)
    try:
        from qrobust.cli.adv import add_adv_options
    except ModuleNotFoundError:
        pass
    else:
        add_adv_options(p)
    p.set_defaults(func=run)
