"""``qrobust detect [CHECKPOINT]``: attack a randomized model, detect the attack from MC uncertainty.

Seed A's ``cleverhans_tutorials/mnist_attack.py`` flags are accepted with their spelling
(``--attack 0..4 --measure_uncertainty --dropout --binary --rand --bit --adv --eps --nb_samples
--nb_iter --attack_iterations``); see ``docs/flags.md``. Without CHECKPOINT, ``--binary/--rand/--bit/
--dropout`` pick the matching zoo recipe (e.g. ``--bit 4 --dropout 0.5`` -> ``qnn_4bit_d05``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qrobust.cli.common import add_data, add_device, add_trust, nonneg_int, one_line_errors, positive_int
from qrobust.errors import QrobustError


def parse_attacks(values: list[str]) -> list[str]:
    """Seed A's codes (0=CW-L2, 1=JSMA, 2=FGSM, 3=PGD/MadryEtAl, 4=BIM) or names, space/comma separated."""
    from qrobust.attacks import seed_attack_name

    texts = [text.strip() for value in values for text in str(value).split(",")]
    out = [seed_attack_name(text) for text in texts if text]
    if not out:
        raise QrobustError("no attack given; use --attack 0..4 (e.g. --attack 2 for FGSM)")
    return list(dict.fromkeys(out))


def recipe_from_seed_flags(args: argparse.Namespace) -> str:
    """Seed A builds its model from --binary/--rand/--bit/--dropout; map them to the zoo recipe trained so."""
    from qrobust.recipes import RECIPES

    dropout = args.dropout or 0.0
    d = "_d05" if dropout == 0.5 else ""
    if args.rand and not args.binary:
        raise QrobustError(
            "--rand without --binary is QNN-defense's full-precision randomized net, which qrobust "
            "does not build; use --binary --rand (randomized BNN)"
        )
    if args.binary:
        if args.bit:
            raise QrobustError("--bit must not be combined with --binary "
                               "(QNN-defense: --bit is for k-bit QNNs)")
        name = "qnn_rbnn" if args.rand else "qnn_bnn"
        name += d
    elif args.bit:
        name = f"qnn_{args.bit}bit{d}"
    else:
        name = f"qnn_fp{d}"
    if dropout not in (0.0, 0.5) or name not in RECIPES:
        known = ", ".join(sorted(r for r in RECIPES if r.startswith("qnn_")))
        raise QrobustError(
            f"no trained recipe matches these seed flags (wanted {name!r}, dropout {dropout}); "
            f"recipes: {known}. Train one with `qrobust train --model qnn_kbit --bits K "
            f"--dropout P --mc-dropout --out DIR` and pass DIR as CHECKPOINT"
        )
    return name


def resolve_checkpoint(args: argparse.Namespace) -> Path:
    """CHECKPOINT / --model_path, else the zoo recipe the seed flags name (see :mod:`qrobust.zoo`)."""
    from qrobust.cli.common import checkpoint_path

    text = args.checkpoint or args.model_path
    if text is None:
        text = recipe_from_seed_flags(args)
    return checkpoint_path(args, text, hint="QNN-defense's TensorFlow checkpoints cannot be read; give a "
                                          "qrobust checkpoint from `qrobust train` or a zoo recipe name")


def check_seed_flags(args: argparse.Namespace, config: dict) -> None:
    """With an explicit checkpoint, the architecture flags must agree with it (as QNN-defense built it)."""
    spec = config.get("model", {})
    name, kw = spec.get("name", ""), spec.get("kwargs", {})
    problems = []
    if args.binary and name not in ("qnn_bnn", "qnn_rbnn"):
        problems.append(f"--binary but the checkpoint is {name}")
    if args.rand and name != "qnn_rbnn":
        problems.append(f"--rand but the checkpoint is {name}")
    if args.bit and (name != "qnn_kbit" or kw.get("bits") != args.bit):
        problems.append(f"--bit {args.bit} but the checkpoint is {name} {kw.get('bits', '')}".rstrip())
    if args.adv and not config.get("adversarial_training"):
        problems.append(
            f"--adv {args.adv} but the checkpoint was not adversarially trained (its config.json records no "
            "adversarial_training; train one with qrobust's adversarial training)"
        )
    if problems:
        raise QrobustError(
            "; ".join(problems) + " (qrobust reads the architecture from the checkpoint; drop the "
            "flag or pass the matching checkpoint)"
        )


def build_attack(name: str, args: argparse.Namespace):
    """Seed A's attack settings; with --eot K the gradient sees K Monte-Carlo copies (batched)."""
    from qrobust.attacks import BIM, CWL2, EOTPGD, FGSM, JSMA, PGD, DetectorAwarePGD, on_mc_mean
    from qrobust.attacks.cw import SEED_START_MARGIN

    k = args.eot
    if args.detector_aware:
        if name not in ("pgd", "bim", "fgsm"):
            raise QrobustError(f"--detector-aware is a PGD attack; it cannot replace {name}")
        return DetectorAwarePGD(
            eps=args.eps,
            alpha=args.eps_iter,
            steps=args.nb_iter,
            random_start=name == "pgd",
            mc_samples=max(k, 2),
            lam=args.lam,
            kappa=args.kappa,
            seed=args.seed,
        )
    if k > 1 and name in ("fgsm", "pgd", "bim"):
        steps = 1 if name == "fgsm" else args.nb_iter
        alpha = args.eps if name == "fgsm" else args.eps_iter
        return EOTPGD(
            eps=args.eps, alpha=alpha, steps=steps, random_start=name == "pgd", mc_samples=k, seed=args.seed
        )
    atk = {
        "fgsm": lambda: FGSM(eps=args.eps, seed=args.seed),
        "pgd": lambda: PGD(
            eps=args.eps, alpha=args.eps_iter, steps=args.nb_iter, random_start=True, seed=args.seed
        ),
        "bim": lambda: BIM(eps=args.eps, alpha=args.eps_iter, steps=args.nb_iter, seed=args.seed),
        "jsma": lambda: JSMA(theta=1.0, gamma=0.1, seed=args.seed),
        "cw": lambda: CWL2(c=10.0, steps=args.attack_iterations, lr=0.1, binary_steps=1, seed=args.seed,
                           start_margin=SEED_START_MARGIN),  # the seed's CW-L2 exactly, start included
    }[name]()
    return on_mc_mean(atk, k) if k > 1 else atk  # CW / JSMA: attack the mean softmax of K copies


def _check_settings(args: argparse.Namespace) -> list[str]:
    """Everything the arguments alone can refuse, before a model is loaded or an image attacked."""
    from qrobust.utils import check_output_file, check_writable_dir

    attacks = parse_attacks(args.attack)
    if args.mc < 2 and args.measure_uncertainty:
        raise QrobustError(f"--mc must be at least 2 to measure uncertainty, got {args.mc}")
    if args.eot < 1:
        raise QrobustError(f"--eot must be >= 1, got {args.eot}")
    check_output_file(args.out, "--out")
    args.roc_dir = check_writable_dir(args.roc, flag="--roc") if args.roc else None
    return attacks


def _check_memory(args: argparse.Namespace, x, classes: int) -> None:  # noqa: ANN001
    """T Monte-Carlo passes keep (T, N, classes) probabilities for clean and adversarial inputs (and their
    softmax), and at least T rows of every activation: refuse a T that cannot fit, before allocating."""
    from qrobust.utils import check_memory

    t, n = args.mc, len(x)
    if n < 2:
        raise QrobustError(f"detection on {n} image: it fits on half of the images and scores the other "
                           "half, so it needs at least 2 (QNN-defense: 500); raise -n")
    if not args.measure_uncertainty:
        return
    need = 16 * t * n * classes + 4 * 64 * t * x[0].numel()
    check_memory(need, f"--mc {t} on {n} images", "lower --mc (QNN-defense: 50) or -n")


def _load(args: argparse.Namespace):  # noqa: ANN202
    """The checkpoint (seed flags checked, dropout set) and the validated test images."""
    from qrobust.cli.common import load_model, load_test_split
    from qrobust.mc import is_stochastic
    from qrobust.utils import resolve_device

    device = resolve_device(args.device)
    path = resolve_checkpoint(args)
    model, config = load_model(args, path, device)
    check_seed_flags(args, config)
    model.eval()
    if args.dropout is not None:
        from qrobust.models.dropout import set_dropout

        set_dropout(model, args.dropout)
    if args.measure_uncertainty and not is_stochastic(model):
        print(
            f"warning: {path} has no randomness at inference (no dropout, no stochastic weights): all "
            "Monte-Carlo passes are identical and every uncertainty is 0",
            file=sys.stderr,
        )
    _, x, y = load_test_split(args, model, config, args.nb_samples, device)
    return path, model, x, y


def _row(args: argparse.Namespace, path: Path, name: str, atk, res, n: int) -> dict:  # noqa: ANN001
    """The JSON record of one attack's detection run."""
    from qrobust.evaluate import wilson_interval

    rep = res.report
    samples = args.mc if args.measure_uncertainty else 1
    row = {
        "checkpoint": str(path), "attack": name, "attack_config": atk.config(), "samples": n, "mc": samples,
        "clean_accuracy": rep.clean_accuracy["last_pass"],
        "adversarial_accuracy": rep.adv_accuracy["last_pass"],
        "clean_ci95": list(wilson_interval(round(rep.clean_accuracy["last_pass"] * n), n)),
        "adversarial_ci95": list(wilson_interval(round(rep.adv_accuracy["last_pass"] * n), n)),
        "linf": res.linf, "mean_l2": res.mean_l2, "attack_seconds": round(res.attack_seconds, 2),
    }
    if args.measure_uncertainty:
        row.update({
            "clean_group_accuracy": rep.clean_accuracy["group"],
            "adv_group_accuracy": rep.adv_accuracy["group"],
            "clean_single_pass_accuracy": rep.clean_accuracy["single_pass"],
            "adv_single_pass_accuracy": rep.adv_accuracy["single_pass"],
            "uncertainty_clean": rep.mean_stats_clean, "uncertainty_adv": rep.mean_stats_adv,
            "seed_lr_score_training_accuracy": rep.seed_lr_score,
            "heldout_lr_accuracy": rep.heldout_lr_accuracy, "detection_all": rep.heldout_all,
            "detection_successful": rep.heldout_success, "n_heldout": rep.n_heldout,
            "attack_success": rep.attack_success,
        })
        if args.roc_dir is not None:
            _roc(args, path, name, res, row)
    return row


def _roc(args: argparse.Namespace, path: Path, name: str, res, row: dict) -> None:  # noqa: ANN001
    from qrobust.detect import STAT_NAMES, roc_points
    from qrobust.report.plots import roc_plot

    per, held = res.per_input, res.per_input["heldout"]
    hs = held[per["success"][held]]
    curves = {f"{s}, all": roc_points(per[f"clean_{s}"][held], per[f"adv_{s}"][held]) for s in STAT_NAMES}
    curves["seed_variance, successful"] = roc_points(per["clean_seed_variance"][hs],
                                                     per["adv_seed_variance"][hs])
    png = roc_plot(args.roc_dir / f"roc_{name}.png", curves, f"{path.name} {name}, T={args.mc}",
                   mark_fpr=0.05)
    if png is not None:
        row["roc_png"] = str(png)


def _print_row(args: argparse.Namespace, name: str, row: dict, res) -> None:  # noqa: ANN001
    rep, n = res.report, row["samples"]
    print(f"{name}: clean accuracy {100 * row['clean_accuracy']:.1f}%  adversarial accuracy "
          f"{100 * row['adversarial_accuracy']:.1f}%  (n={n}, mean L2 {res.mean_l2:.2f})")
    if not args.measure_uncertainty:
        return
    sa, ss = rep.heldout_all["seed_variance"], rep.heldout_success["seed_variance"]
    print(f"  group accuracy clean {100 * rep.clean_accuracy['group']:.1f}%  adversarial "
          f"{100 * rep.adv_accuracy['group']:.1f}%  (T={row['mc']})")
    print(f"  uncertainty (QNN-defense variance) clean {rep.mean_stats_clean['seed_variance']:.3e} "
          f"-> adversarial {rep.mean_stats_adv['seed_variance']:.3e}")
    print(f"  QNN-defense LR score (training accuracy, failed attacks included): "
          f"{100 * rep.seed_lr_score:.1f}%")
    print(f"  held-out ROC-AUC {sa['auc']:.3f}  TPR@5%FPR {100 * sa['tpr@0.05fpr']:.1f}%  "
          f"(successful only: AUC {ss['auc']:.3f}, n={ss['n_pos']})")


def run(args: argparse.Namespace) -> int:
    import torch

    from qrobust.detect import run_detection
    from qrobust.distributed import is_main
    from qrobust.utils import atomic_write_json

    attacks = _check_settings(args)
    path, model, x, y = _load(args)
    with torch.no_grad():
        _check_memory(args, x, int(model(x[:1]).shape[1]))
    attackers = [(name, build_attack(name, args)) for name in attacks]  # all refused before any runs
    results = []
    for name, atk in attackers:

        def progress(done: int, total: int, name: str = name) -> None:
            if not args.quiet:
                print(f"\r{name}: {done}/{total}", end="" if done < total else "\n", file=sys.stderr,
                      flush=True)

        res = run_detection(model, atk, x, y, samples=args.mc if args.measure_uncertainty else 1,
                            attack_batch=args.attack_batch_size, seed=args.seed,
                            bootstrap=args.bootstrap if args.measure_uncertainty else 0, progress=progress)
        row = _row(args, path, name, atk, res, len(y))
        results.append(row)
        if not args.json:
            _print_row(args, name, row, res)
    if args.json:
        print(json.dumps(results if len(results) > 1 else results[0]))
    if args.out and is_main():  # under torchrun rank 0 writes
        atomic_write_json(args.out, {"results": results, "version": _version()})
    return 0


def _version() -> str:
    from qrobust.version import __version__

    return __version__


def register(sub: argparse._SubParsersAction) -> None:
    p = one_line_errors(sub.add_parser(
        "detect",
        help="attack a randomized model and detect it from Monte-Carlo uncertainty",
        description=__doc__,
    ))
    p.add_argument(
        "checkpoint",
        nargs="?",
        default=None,
        help="checkpoint directory or zoo recipe name (default: from --binary/--rand/--bit/--dropout)",
    )
    p.add_argument("--model_path", "--model-path", dest="model_path", default=None, help="same as CHECKPOINT")
    p.add_argument(
        "--attack",
        nargs="+",
        default=["2"],
        help="0=CW-L2, 1=JSMA, 2=FGSM, 3=PGD (MadryEtAl), 4=BIM or names; several allowed (default 2)",
    )
    p.add_argument(
        "--measure_uncertainty",
        "--measure-uncertainty",
        dest="measure_uncertainty",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Monte-Carlo passes and detection metrics (default on; --no-measure-uncertainty: "
        "accuracies only, one pass)",
    )
    p.add_argument("--mc", type=positive_int, default=50, help="Monte-Carlo passes T (QNN-defense: 50)")
    p.add_argument(
        "--dropout",
        type=float,
        default=None,
        help="rate of the dropout layers, kept on at inference (default: the checkpoint's)",
    )
    p.add_argument(
        "--binary", action="store_true", help="QNN-defense BNN (recipe qnn_bnn / checked against CHECKPOINT)"
    )
    p.add_argument("--rand", action="store_true", help="with --binary: randomized BNN (stochastic weights)")
    p.add_argument("--scale", action="store_true", help="accepted (the randomized BNN always scales)")
    p.add_argument("--bit", type=nonneg_int, default=0, help="k-bit QNN (recipe qnn_<k>bit[_d05])")
    p.add_argument(
        "--adv",
        type=nonneg_int,
        default=0,
        help="QNN-defense's adversarial training id (1 PGD, 2 FGSM): checked against the checkpoint",
    )
    p.add_argument("--eps", type=float, default=0.3, help="L-inf budget of FGSM/PGD/BIM (0.3)")
    p.add_argument("--eps_iter", "--eps-iter", dest="eps_iter", type=float, default=0.01, help="PGD/BIM step")
    p.add_argument(
        "--nb_iter", "--nb-iter", dest="nb_iter", type=positive_int, default=40, help="PGD/BIM steps"
    )
    p.add_argument(
        "--attack_iterations",
        "--attack-iterations",
        dest="attack_iterations",
        type=positive_int,
        default=100,
        help="CW-L2 iterations (QNN-defense: 100; 1 binary step, lr 0.1, c 10)",
    )
    p.add_argument(
        "--nb_samples",
        "--nb-samples",
        "-n",
        dest="nb_samples",
        type=nonneg_int,
        default=500,
        help="first N test images (QNN-defense: 500 clean; 0 = all)",
    )
    p.add_argument(
        "--eot",
        type=positive_int,
        default=1,
        help="Monte-Carlo copies per attack gradient (1 = one random sample, as QNN-defense; K>1 = EOT)",
    )
    p.add_argument(
        "--detector-aware",
        action="store_true",
        help="PGD that also lowers QNN-defense's variance (estimated from max(--eot, 2) copies)",
    )
    p.add_argument("--lam", type=float, default=10.0, help="weight of the variance term (--detector-aware)")
    p.add_argument("--kappa", type=float, default=1.0, help="margin cap of --detector-aware")
    p.add_argument("--bootstrap", type=nonneg_int, default=1000, help="bootstrap resamples for AUC intervals")
    p.add_argument("--attack-batch-size", type=positive_int, default=100,
                   help="attack batch (QNN-defense: 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--roc", default=None, help="folder for ROC curve PNGs")
    p.add_argument("--out", default=None, help="write the results as JSON")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--quiet", action="store_true")
    p.add_argument(
        "--data_dir", dest="data_root_seed", default=None, help="QNN-defense's data folder (= --data-root)"
    )
    add_data(p, default=None)
    add_device(p)
    add_trust(p)
    p.set_defaults(func=_run_with_aliases)


def _run_with_aliases(args: argparse.Namespace) -> int:
    if args.data_root_seed and not args.data_root:
        args.data_root = args.data_root_seed
    return run(args)
