"""``qrobust attack CHECKPOINT --attack fgsm|bim|pgd|cw|jsma``: adversarial accuracy of a checkpoint."""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np

from qrobust.attacks import LOSSES, attack_names, attack_params, create_attack
from qrobust.cli.common import (
    add_checkpoint,
    add_data,
    add_device,
    checkpoint_path,
    load_model,
    load_test_split,
    nonneg_int,
    one_line_errors,
    positive_int,
)
from qrobust.distributed import is_main
from qrobust.errors import QrobustError
from qrobust.evaluate import evaluate_attack
from qrobust.utils import (
    atomic_write_bytes,
    atomic_write_json,
    check_free_space,
    check_output_file,
    resolve_device,
    seed_everything,
    show_progress,
)

# CLI option (dest) -> attack parameter; options that name the attack (cw_*) win over generic ones.
_GENERIC = {"eps": "eps", "alpha": "alpha", "steps": "steps", "restarts": "restarts",
            "random_start": "random_start", "loss": "loss", "eot": "eot_samples", "theta": "theta",
            "gamma": "gamma", "saliency": "saliency"}
_CW = {"cw_c": "c", "cw_steps": "steps", "cw_lr": "lr", "cw_binary_steps": "binary_steps",
       "cw_confidence": "confidence", "cw_abort_early": "abort_early"}


def attack_settings(args: argparse.Namespace) -> dict:
    """The attack parameters the user set, refusing options that do not apply to the chosen attack."""
    accepted = attack_params(args.attack)
    params: dict = {"seed": args.seed}
    for dest, name in (*_GENERIC.items(), *_CW.items()):
        value = getattr(args, dest, None)
        if value is None:
            continue
        if name not in accepted or (dest in _CW and args.attack != "cw"):
            flag = "--" + dest.replace("_", "-")
            raise QrobustError(f"{flag} does not apply to --attack {args.attack}; its settings are: "
                               f"{', '.join(k for k in accepted if k not in ('bounds', 'seed'))}")
        params[name] = value
    if args.targeted or args.target is not None:
        if "targeted" not in accepted:
            raise QrobustError(f"--attack {args.attack} has no targeted mode")
        params["targeted"] = True
    return params


def _target(text: str) -> int | str:
    if text == "random":
        return text
    try:
        return nonneg_int(text)
    except argparse.ArgumentTypeError as exc:
        msg = f"--target must be a class index >= 0 or 'random', got {text!r}"
        raise argparse.ArgumentTypeError(msg) from exc


def _save_adv(path: str, x, x_adv, y, result) -> None:
    if not path.endswith(".npz"):
        raise QrobustError(f"--save-adv must name a .npz file, got {path!r}")
    buf = io.BytesIO()
    arrays = {"x_adv": x_adv.cpu().numpy().astype(np.float32), "x": x.cpu().numpy().astype(np.float32),
              "y": y.cpu().numpy()}
    if result.targets is not None:
        arrays["targets"] = result.targets.cpu().numpy()
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def run(args: argparse.Namespace) -> int:
    params = attack_settings(args)
    attack = create_attack(args.attack, **params)
    check_output_file(args.json_out, "--json-out")  # before the attack, not after it
    if args.save_adv is not None and not args.save_adv.endswith(".npz"):
        raise QrobustError(f"--save-adv must name a .npz file, got {args.save_adv!r}")
    check_output_file(args.save_adv, "--save-adv")
    device = resolve_device(args.device)
    seed_everything(args.seed)
    model, config = load_model(args, checkpoint_path(args), device)  # eval mode; MC dropout stays on
    data, x, y = load_test_split(args, model, config, args.n, device)
    if args.save_adv:  # x and x_adv as float32, before hours of attacking
        check_free_space(Path(args.save_adv).parent, 8 * x.numel(), f"--save-adv {args.save_adv}")
    num_classes = int(model(x[:1]).shape[1])
    targets = None
    if isinstance(args.target, int):
        if args.target >= num_classes:
            raise QrobustError(f"--target {args.target} is not a class of this model (0-{num_classes - 1})")
        targets = args.target

    redraw = show_progress(not args.quiet)  # a log gets no carriage-return redraws

    def progress(done: int, total: int) -> None:
        if redraw:
            print(f"\r{attack.name}: {done}/{total} images", end="", file=sys.stderr, flush=True)

    result = evaluate_attack(model, attack, x, y, labels=args.labels, targets=targets,
                             batch_size=args.batch_size, keep_adv=args.save_adv is not None,
                             progress=progress)
    if redraw:
        print(file=sys.stderr)
    record = {"checkpoint": args.checkpoint, "dataset": data.name, **result.as_dict()}
    lo, hi = result.adversarial_ci95
    print(f"{attack!r}\n"
          f"samples {result.n} (labels: {args.labels})  clean accuracy {result.clean_accuracy:.4f}  "
          f"adversarial accuracy {result.adversarial_accuracy:.4f} [95% CI {lo:.4f}, {hi:.4f}]\n"
          f"success rate {result.success_rate:.4f} of {result.n_attacked} attacked  "
          f"mean L0 {result.mean_l0:.1f}  L2 {result.mean_l2:.4f}  Linf {result.mean_linf:.4f} "
          f"(successful examples)  {result.seconds:.1f}s")
    if not is_main():  # under torchrun: every rank holds the gathered result; rank 0 writes it
        return 0
    if args.json_out:
        atomic_write_json(args.json_out, record)
    if args.save_adv:
        _save_adv(args.save_adv, x, result.x_adv, y, result)
    if args.json:
        print(json.dumps(record))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = one_line_errors(sub.add_parser("attack", help="attack a checkpoint and report adversarial accuracy"))
    add_checkpoint(p)
    p.add_argument("--attack", required=True, choices=[k for k in attack_names() if k != "fgsm_random"])
    g = p.add_argument_group("attack settings (defaults: the attack's own, i.e. the seeds' settings)")
    g.add_argument("--eps", type=float, help="L-inf budget (FGSM/BIM/PGD; default 0.3)")
    g.add_argument("--alpha", type=float, help="step size (BIM/PGD; default 0.01)")
    g.add_argument("--steps", type=positive_int, help="iterations (BIM/PGD default 40; CW default 50)")
    g.add_argument("--restarts", type=positive_int, help="PGD random restarts (default 1)")
    g.add_argument("--random-start", dest="random_start", action=argparse.BooleanOptionalAction, default=None,
                   help="PGD uniform random start (default on)")
    g.add_argument("--loss", choices=LOSSES,
                   help="loss of FGSM/BIM/PGD: ce, ce_prob (seeds' quirk) or cw margin")
    g.add_argument("--targeted", action="store_true", help="targeted attack (random target != prediction)")
    g.add_argument("--target", type=_target, help="targeted attack towards this class (or 'random')")
    g.add_argument("--eot", type=positive_int, help="gradient averaged over K stochastic passes (EOT)")
    g.add_argument("--cw-c", dest="cw_c", type=float, help="CW initial constant c (default 10)")
    g.add_argument("--cw-steps", dest="cw_steps", type=positive_int, help="CW Adam iterations (default 50)")
    g.add_argument("--cw-lr", dest="cw_lr", type=float, help="CW Adam learning rate (default 0.1)")
    g.add_argument("--cw-binary-steps", dest="cw_binary_steps", type=positive_int,
                   help="CW binary search steps over c (default 1, as the seeds)")
    g.add_argument("--cw-confidence", dest="cw_confidence", type=float,
                   help="CW confidence kappa (default 0)")
    g.add_argument("--cw-abort-early", dest="cw_abort_early", action=argparse.BooleanOptionalAction,
                   default=None, help="CW early abort when the objective stalls (default on)")
    g.add_argument("--theta", type=float, help="JSMA change per feature, <0 decreases (default 1)")
    g.add_argument("--gamma", type=float, help="JSMA maximum fraction of features changed (default 0.1)")
    g.add_argument("--saliency", choices=("pairs", "target"),
                   help="JSMA saliency: the paper's pairs or ART's top-2")
    add_data(p, default=None)
    p.add_argument("-n", type=nonneg_int, default=0, help="first N test images (0 = all)")
    p.add_argument("--labels", choices=("pred", "true"), default="pred",
                   help="untargeted attacks move away from the model's predictions (default, as the seeds) "
                        "or the true labels")
    p.add_argument("--batch-size", type=positive_int, default=100)
    p.add_argument("--seed", type=nonneg_int, default=0)
    add_device(p)
    p.add_argument("--json-out", help="write the result record (JSON) to this file, atomically")
    p.add_argument("--json", action="store_true", help="also print the result record as one JSON line")
    p.add_argument("--save-adv", help="save x, x_adv and y to this .npz file")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=run)
