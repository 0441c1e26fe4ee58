"""Adversarial-training options of ``qrobust train`` (``--adv fgsm|fgsm-random|pgd``).

Seed A's flags map as ``--adv 1`` = PGD (Madry) and ``--adv 2`` = FGSM with a random per-example
eps ``|TN(0, s)|``; its schedule (first N epochs clean, then ``(CE_clean + CE_adv) / 2``) is
``--adv-start-epoch N``. Seed A attacked with eps ``MAX_EPS = 2`` (PGD 0.01 x 40, so the ball never
binds) and FGSM stddev 255 on [0, 1] pixels; pass ``--adv-eps 2`` / ``--adv-scale 255`` to copy that.
"""

from __future__ import annotations

import argparse

from qrobust.adversary import KINDS, Adversary, make_adversary, make_attack
from qrobust.errors import QrobustError

__all__ = ["KINDS", "add_adv_options", "adv_kind", "build_adversary", "make_adversary", "make_attack"]
SEED_A = {"1": "pgd", "2": "fgsm-random"}


def adv_kind(text: str) -> str:
    key = SEED_A.get(text, text).lower().replace("_", "-")
    if key not in KINDS:
        raise argparse.ArgumentTypeError(f"--adv must be one of {', '.join(KINDS)} (seed A: 1 = pgd, "
                                         f"2 = fgsm-random), got {text!r}")
    return key


def add_adv_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("adversarial training")
    g.add_argument("--adv", type=adv_kind, default=None, metavar="{fgsm,fgsm-random,pgd}",
                   help="train on (CE_clean + CE_adv)/2 with this attack (seed A: 1 = pgd, 2 = fgsm-random)")
    g.add_argument("--adv-eps", type=float, default=0.3,
                   help="L-inf budget of the training attack (default 0.3)")
    g.add_argument("--adv-alpha", type=float, default=0.01, help="PGD step size (default 0.01)")
    g.add_argument("--adv-steps", type=int, default=40, help="PGD steps (default 40, as seed A)")
    g.add_argument("--adv-random-start", action=argparse.BooleanOptionalAction, default=True,
                   help="PGD uniform random start (default on, Madry et al.)")
    g.add_argument("--adv-scale", type=float, default=0.15,
                   help="fgsm-random: std of the half-normal per-example eps, capped by --adv-eps "
                        "(default 0.15)")
    g.add_argument("--adv-start-epoch", type=int, default=0,
                   help="clean epochs before adversarial training starts (seed A: 10)")
    g.add_argument("--adv-weight", type=float, default=0.5,
                   help="weight of the adversarial loss: 0.5 = seed A's (CE_clean + CE_adv) / 2 (default), "
                        "1.0 = Madry et al. (adversarial loss only)")


def build_adversary(args: argparse.Namespace) -> Adversary:
    """``--adv ...`` -> ``adversary(model, x, y) -> x_adv``; sets ``args.adv_description`` (checkpoint)."""
    if args.adv_start_epoch < 0:
        raise QrobustError(f"--adv-start-epoch must be >= 0, got {args.adv_start_epoch}")
    if args.adv_start_epoch >= args.epochs:
        raise QrobustError(f"--adv-start-epoch {args.adv_start_epoch} leaves no adversarial epoch out of "
                           f"--epochs {args.epochs}; lower it or train longer")
    attack = make_attack(args.adv, eps=args.adv_eps, alpha=args.adv_alpha, steps=args.adv_steps,
                         random_start=args.adv_random_start, scale=args.adv_scale, seed=args.seed)
    args.adv_description = {"kind": args.adv, "start_epoch": args.adv_start_epoch, **attack.config()}
    return make_adversary(attack, seed=args.seed + 1)
