"""Adversarial-training options of ``qrobust train`` (``--adv fgsm-rs|pgd|trades|fgsm|fgsm-random``).

The methods live in :mod:`qrobust.adversary` and are selected by ``TrainConfig.adv_method``;
:func:`adv_settings` turns these flags into those ``TrainConfig`` fields. Seed A's flags map as
``--adv 1`` = PGD (Madry) and ``--adv 2`` = FGSM with a random per-example eps ``|TN(0, s)|``; its
schedule (first N epochs clean, then ``(CE_clean + CE_adv) / 2``) is ``--adv-start-epoch N``. Seed A
attacked with eps ``MAX_EPS = 2`` (PGD 0.01 x 40, so the ball never binds) and FGSM stddev 255 on [0, 1]
pixels; pass ``--adv-eps 2`` / ``--adv-scale 255`` to copy that.
"""

from __future__ import annotations

import argparse
from typing import Any

from qrobust.adversary import KINDS, make_adversary, make_attack
from qrobust.errors import QrobustError
from qrobust.train_config import ADV_METHODS, Adversary

__all__ = ["KINDS", "add_adv_options", "adv_kind", "adv_settings", "build_adversary",
           "make_adversary", "make_attack"]
SEED_A = {"1": "pgd", "2": "fgsm-random"}
SEED_A_PGD = {"steps": 40, "alpha": 0.01}  # `--adv pgd`: QNN-defense's PGD-40 of 0.01


def adv_kind(text: str) -> str:
    key = SEED_A.get(text, text).lower().replace("_", "-")
    if key.replace("-", "_") not in ADV_METHODS:
        names = ", ".join(m.replace("_", "-") for m in ADV_METHODS)
        raise argparse.ArgumentTypeError(f"--adv must be one of {names} (QNN-defense: 1 = pgd, "
                                         f"2 = fgsm-random), got {text!r}")
    return key


def add_adv_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("adversarial training (qrobust.adversary)")
    g.add_argument("--adv", type=adv_kind, default=None, metavar="{fgsm-rs,pgd,trades,fgsm,fgsm-random}",
                   help="train adversarially: fgsm-rs (Wong et al. 2020), pgd (Madry et al.), trades (Zhang "
                        "et al.), fgsm / fgsm-random (QNN-defense: 1 = pgd, 2 = fgsm-random)")
    g.add_argument("--adv-eps", type=float, default=0.3, help="L-inf budget of the training attack (0.3)")
    g.add_argument("--adv-alpha", type=float, default=None,
                   help="attack step (default: fgsm-rs 1.25 eps, pgd 0.01 as QNN-defense, "
                        "trades 2.5 eps / steps)")
    g.add_argument("--adv-steps", type=int, default=None, help="pgd / trades steps (default: pgd 40 as seed "
                                                               "A, trades 10)")
    g.add_argument("--adv-random-start", action=argparse.BooleanOptionalAction, default=True,
                   help="QNN-defense's pgd through build_adversary: uniform random start (default on); the "
                        "TrainConfig methods always start at random, as their papers")
    g.add_argument("--adv-scale", type=float, default=0.15,
                   help="fgsm-random: std of the half-normal per-example eps, capped by --adv-eps (0.15)")
    g.add_argument("--adv-start-epoch", type=int, default=0,
                   help="clean epochs before adversarial training starts (QNN-defense: 10)")
    g.add_argument("--adv-weight", type=float, default=argparse.SUPPRESS,
                   help="weight w of (1 - w) CE_clean + w CE_adv: 0.5 = QNN-defense (default), "
                        "1.0 = Madry / Wong "
                        "(default for fgsm-rs); trades uses --trades-beta instead")
    g.add_argument("--adv-eps-ramp", type=float, default=0.0,
                   help="grow eps (and step) linearly from 0 over this many adversarial epochs (default 0)")
    g.add_argument("--trades-beta", type=float, default=6.0, help="TRADES robust-term weight (6, the paper)")
    g.add_argument("--co-guard", action="store_true",
                   help="stop on catastrophic overfitting: PGD-10 on held-out training images, stop and "
                        "restore the best weights when its accuracy drops by --co-guard-drop (Wong et al.)")
    g.add_argument("--co-guard-drop", type=float, default=0.2, help="accuracy drop that stops (0.2)")
    g.add_argument("--co-guard-every", type=int, default=0, help="check every N steps (0: each epoch end)")
    g.add_argument("--co-guard-samples", type=int, default=256, help="held-out images (256, not trained on)")


def adv_settings(args: argparse.Namespace) -> dict[str, Any]:
    """``--adv ...`` -> the :class:`qrobust.train.TrainConfig` fields of the chosen method."""
    out: dict[str, Any] = {"adv_start_epoch": getattr(args, "adv_start_epoch", 0) or 0,
                           "adv_weight": getattr(args, "adv_weight", None) or 0.5}
    kind = getattr(args, "adv", None)
    if not kind:
        return out
    if args.adv_start_epoch < 0:
        raise QrobustError(f"--adv-start-epoch must be >= 0, got {args.adv_start_epoch}")
    if args.adv_start_epoch >= args.epochs:
        raise QrobustError(f"--adv-start-epoch {args.adv_start_epoch} leaves no adversarial epoch out of "
                           f"--epochs {args.epochs}; lower it or train longer")
    method = kind.replace("-", "_")
    seed_a = SEED_A_PGD if method == "pgd" else {}
    steps = args.adv_steps if args.adv_steps is not None else seed_a.get("steps", 10)
    alpha = args.adv_alpha if args.adv_alpha is not None else seed_a.get("alpha", 0.0)
    weight = getattr(args, "adv_weight", 1.0 if method == "fgsm_rs" else 0.5)
    return {**out, "adv_method": method, "adv_eps": args.adv_eps, "adv_alpha": alpha, "adv_steps": steps,
            "adv_scale": args.adv_scale, "adv_weight": weight, "adv_eps_ramp": args.adv_eps_ramp,
            "trades_beta": args.trades_beta, "co_guard": args.co_guard, "co_guard_drop": args.co_guard_drop,
            "co_guard_every": args.co_guard_every, "co_guard_samples": args.co_guard_samples}


def build_adversary(args: argparse.Namespace) -> Adversary:
    """Seed A's attacks as an ``adversary(model, x, y) -> x_adv`` callable (the older route; prefer
    :func:`adv_settings`, which reaches every method); sets ``args.adv_description`` (checkpoint)."""
    settings = adv_settings(args)
    if args.adv not in KINDS:
        raise QrobustError(f"--adv {args.adv} is not wired into this `qrobust train` yet (it must build its "
                           "TrainConfig with qrobust.cli.adv.adv_settings); use --adv pgd, fgsm or "
                           f"fgsm-random here, or adv_method = \"{args.adv.replace('-', '_')}\" in a TOML "
                           "train table or TrainConfig")
    attack = make_attack(args.adv, eps=args.adv_eps, alpha=settings["adv_alpha"], steps=settings["adv_steps"],
                         random_start=args.adv_random_start, scale=args.adv_scale, seed=args.seed)
    args.adv_description = {"kind": args.adv, "start_epoch": args.adv_start_epoch, **attack.config()}
    return make_adversary(attack, seed=args.seed + 1)
