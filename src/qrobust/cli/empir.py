"""``qrobust empir {mnist,cifar10}``: EMPIR's attack scripts (``mnist_attack.py``, ``cifar10_attack.py``).

Takes EMPIR's own flags (``--ensembleThree --model_path1/2/3 --wbits --abits --wbits2 --abits2``, or
``--model_path`` for a single model; ``--attack 0..4``, ``--eps``, ``--nb_samples``, ...) with qrobust
checkpoints instead of TensorFlow ones, and adds ``--target legacy|adaptive`` (what the attack
differentiates; ``legacy`` is what EMPIR's code did). See ``docs/flags.md`` and ``docs/ensembles.md``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from qrobust.cli.common import add_device, add_trust, nonneg_int, one_line_errors, positive_int
from qrobust.errors import QrobustError

DATASET_MODEL = {"mnist": "mnistconv", "cifar10": "cifarconv"}
# EMPIR flags that only matter for training (the seed trains when --model_path holds no checkpoint)
TRAINING_FLAGS = ("nb_epochs", "nb_filters", "lr", "learning_rate", "rand", "stocRound", "distill",
                  "student_epochs", "inpgradreg", "l2dbl", "l2cs", "adv", "delay", "wbitsList", "abitsList",
                  "wbits2List", "abits2List")


def parse_attack(text: str) -> str:
    """EMPIR's integer code (0=CW, 1=JSMA, 2=FGSM, 3=PGD/MadryEtAl, 4=BIM) or a name."""
    from qrobust.attacks import seed_attack_name

    try:
        return seed_attack_name(text)
    except QrobustError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _resolve_path(text: str, flag: str, args: argparse.Namespace | None = None) -> Path:
    """A checkpoint directory, a recipe name or zoo:<recipe> (see :mod:`qrobust.zoo`)."""
    from qrobust.cli.common import checkpoint_path

    return checkpoint_path(args or argparse.Namespace(), text, flag=flag,
                           hint="EMPIR's TensorFlow checkpoints cannot be read; give a qrobust checkpoint "
                                "made by `qrobust train`, or a zoo recipe name")


def _check_bits(model, config: dict, wbits: int, abits: int, flag: str) -> None:
    """EMPIR builds members from --wbits/--abits; qrobust reads them from the checkpoint: check they agree."""
    kw = config.get("model", {}).get("kwargs", {})
    have = (kw.get("wbits", 32), kw.get("abits", 32))
    for want, got, name in ((wbits, have[0], "wbits"), (abits, have[1], "abits")):
        if want and want != got:
            raise QrobustError(f"--{name}{flag} {want} does not match checkpoint {config.get('_path')}, "
                               f"which has {name}={got}; drop the flag (qrobust reads precisions from the "
                               "checkpoint) or pass the right checkpoint")


def build_system(args: argparse.Namespace, device):
    """Load the attacked system: an EMPIR ensemble (--ensembleThree) or one model (--model_path)."""
    from qrobust.cli.common import load_model
    from qrobust.ensemble import Ensemble

    if args.ensembleThree:
        missing = [f"--model_path{i}" for i in (1, 2, 3) if not getattr(args, f"model_path{i}")]
        if missing:
            raise QrobustError(f"--ensembleThree needs {', '.join(missing)} (EMPIR cannot train an ensemble "
                               "from scratch either); train members with `qrobust train`")
        if args.model_path:
            raise QrobustError("give either --ensembleThree with --model_path1/2/3 or --model_path, not both")
        members, configs = [], []
        for i in (1, 2, 3):
            path = _resolve_path(getattr(args, f"model_path{i}"), f"--model_path{i}", args)
            model, config = load_model(args, path, device)
            config["_path"] = str(path)
            members.append(model)
            configs.append(config)
        _check_bits(members[0], configs[0], args.wbits, args.abits, "")
        _check_bits(members[1], configs[1], args.wbits2, args.abits2, "2")
        ens = Ensemble(members, rule=args.rule, designated=2).eval()  # EMPIR: model 3 decides ties
        ens.member_configs = configs
        return ens, configs
    if args.model_path is None:
        raise QrobustError("nothing to attack: give --model_path (one model) or --ensembleThree with "
                           "--model_path1/2/3")
    for flag in ("model_path1", "model_path2", "model_path3"):
        if getattr(args, flag):
            raise QrobustError(f"--{flag} is only used with --ensembleThree")
    path = _resolve_path(args.model_path, "--model_path", args)
    model, config = load_model(args, path, device)
    config["_path"] = str(path)
    _check_bits(model, config, args.wbits, args.abits, "")
    return model, [config]


def make_attack(args: argparse.Namespace, loss: str = "ce"):
    """EMPIR's attack settings; ``loss`` (FGSM/BIM/PGD) comes from the ensemble target."""
    from qrobust.attacks import create_attack

    name = args.attack
    if name == "fgsm":
        return create_attack("fgsm", eps=args.eps, loss=loss)
    if name == "bim":
        return create_attack("bim", eps=args.eps, alpha=args.eps_iter, steps=args.nb_iter, loss=loss)
    if name == "pgd":
        return create_attack("pgd", eps=args.eps, alpha=args.eps_iter, steps=args.nb_iter, random_start=True,
                             seed=args.seed, loss=loss)
    if name == "cw":
        from qrobust.attacks.cw import SEED_START_MARGIN  # the seeds' CW-L2 exactly, start included

        return create_attack("cw", c=10.0, steps=args.attack_iterations, lr=0.1, binary_steps=1,
                             confidence=0.0, abort_early=True, start_margin=SEED_START_MARGIN)
    return create_attack("jsma", theta=1.0, gamma=0.1, seed=args.seed)


def run(args: argparse.Namespace) -> int:
    import torch

    from qrobust.checkpoint import check_labels
    from qrobust.data import check_images, load_dataset
    from qrobust.ensemble import Ensemble, on_target
    from qrobust.evaluate import evaluate_attack
    from qrobust.utils import resolve_device

    used = [f for f in TRAINING_FLAGS if getattr(args, f, None) not in (None, False)]
    if used and used[0].endswith("List"):
        raise QrobustError(f"--{used[0]}: per-layer precisions are not supported; qrobust's EMPIR models use "
                           "one precision (--wbits/--abits) for all conv layers")
    if used:
        raise QrobustError(f"--{used[0]} is a training flag of EMPIR's script; `qrobust empir` only attacks "
                           "trained checkpoints. Train with `qrobust train --model "
                           f"{DATASET_MODEL[args.dataset]} --wbits W --abits A --epochs N --out DIR` "
                           "(see docs/flags.md)")
    if args.targeted:
        raise QrobustError("--targeted is not supported by `qrobust empir` (EMPIR's tables are untargeted); "
                           "use `qrobust attack` for targeted attacks")
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    device = resolve_device(args.device)
    system, configs = build_system(args, device)
    data = load_dataset(args.dataset, root=args.data_dir)
    test = data.test.head(args.nb_samples) if args.nb_samples else data.test
    x, y = test.tensors(device)
    check_images(x, tuple(configs[0]["model"]["input_shape"]), f"dataset {data.name}")
    check_labels(system, test)
    for cfg in configs:
        if cfg.get("dataset") not in (None, args.dataset):
            raise QrobustError(f"checkpoint {cfg['_path']} was trained on {cfg['dataset']}, "
                               f"not {args.dataset}")
    if isinstance(system, Ensemble):
        target = system.attack_target(args.target, args.attack, combine=args.combine)
        attack = on_target(make_attack(args, target.loss), target)
        description = target.description
    else:
        attack = make_attack(args)
        description = "single model, cross-entropy on its logits" if args.attack != "cw" else "single model"
    res = evaluate_attack(system, attack, x, y, labels="pred", batch_size=args.attack_batch_size)
    l0_rate = res.mean_l0_all / x[0].numel() if res.n_attacked else float("nan")
    if not args.json:
        kind = "EMPIR ensemble (" + ", ".join(system.names) + ")" if isinstance(system, Ensemble) else "model"
        print(f"Attacked {kind} with {res.attack}: {description}")
        print(f"Test accuracy on legitimate test examples: {res.clean_accuracy:.4f} (first {res.n} images)")
        print(f"Test accuracy on adversarial examples {res.adversarial_accuracy:.4f}")
        print(f"Avg. L_2 norm of perturbations {res.mean_l2_all:.4f}")
        print(f"Avg. rate of perturbed features {l0_rate:.4f}")
    out = {"dataset": args.dataset, "system": "ensemble" if isinstance(system, Ensemble) else "model",
           "checkpoints": [c["_path"] for c in configs], "target": args.target if isinstance(system, Ensemble)
           else None, "description": description, **res.as_dict(), "rate_perturbed_features": l0_rate}
    if args.json:
        print(json.dumps(out))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from qrobust.ensemble import COMBINES, RULES, THREAT_MODELS

    p = one_line_errors(sub.add_parser(
        "empir", help="EMPIR's attack scripts with EMPIR's flags (mixed-precision ensembles)",
        description=__doc__.splitlines()[0]))
    p.add_argument("dataset", choices=sorted(DATASET_MODEL), help="mnist (mnist_attack.py) or cifar10 "
                   "(cifar10_attack.py)")
    g = p.add_argument_group("models (EMPIR flags)")
    g.add_argument("--ensembleThree", action="store_true", help="attack the ensemble of --model_path1/2/3")
    g.add_argument("--model_path1", help="member 1 checkpoint (a low-precision model)")
    g.add_argument("--model_path2", help="member 2 checkpoint (a low-precision model)")
    g.add_argument("--model_path3", help="member 3 checkpoint (full precision; breaks ties)")
    g.add_argument("--model_path", help="a single model to attack (EMPIR's baseline)")
    g.add_argument("--wbits", type=int, default=0, help="weight bits of model 1 / the single model; checked "
                   "against the checkpoint (0 = take the checkpoint's)")
    g.add_argument("--abits", type=int, default=0, help="activation bits of model 1 / the single model "
                   "(checked)")
    g.add_argument("--wbits2", type=int, default=0, help="weight bits of model 2 (checked)")
    g.add_argument("--abits2", type=int, default=0, help="activation bits of model 2 (checked)")
    g.add_argument("--lowprecision", action="store_true",
                   help="accepted for compatibility (precision is read from the checkpoint)")
    a = p.add_argument_group("attack (EMPIR flags)")
    a.add_argument("--attack", type=parse_attack, default="cw",
                   help="0=CW (default), 1=JSMA, 2=FGSM, 3=PGD (MadryEtAl), 4=BIM, or a name")
    a.add_argument("--eps", type=float, default=0.3,
                   help="L-inf budget (EMPIR default 0.3; its CIFAR table used 0.1)")
    a.add_argument("--eps_iter", type=float, default=0.01, help="BIM/PGD step (EMPIR: 0.01, hard-coded)")
    a.add_argument("--nb_iter", type=positive_int, default=40, help="BIM/PGD iterations (default 40)")
    a.add_argument("--attack_iterations", type=positive_int, default=100,
                   help="CW-L2 iterations (EMPIR default 100; the README table used 50)")
    a.add_argument("--nb_samples", type=nonneg_int, default=10,
                   help="attack the first N test images (EMPIR default 10; 0 = all)")
    a.add_argument("--targeted", action="store_true", help="not supported (error)")
    a.add_argument("--data_dir", "--data-root", dest="data_dir", default=None,
                   help="folder holding mnist.npz / cifar10.npz (default $QROBUST_DATA_DIR)")
    a.add_argument("--gpu", default=None, help="EMPIR's GPU id: --gpu N means --device cuda:N")
    a.add_argument("--viz_enabled", action="store_true", help="ignored (no plots)")
    a.add_argument("--debug", action="store_true", help="ignored")
    a.add_argument("--test", action="store_true", help="ignored")
    q = p.add_argument_group("qrobust additions")
    q.add_argument("--target", choices=THREAT_MODELS, default="legacy",
                   help="what an attack on the ensemble differentiates: legacy = EMPIR's code (default), "
                        "adaptive = the whole ensemble, adaptive_logits = adaptive on the mean logits "
                        "(docs/ensembles.md)")
    q.add_argument("--combine", choices=COMBINES, default=None,
                   help="adaptive target: mean softmax (Tramer et al.; default) or mean logits of all "
                        "members")
    q.add_argument("--rule", choices=RULES, default="vote",
                   help="ensemble prediction rule (EMPIR: vote)")
    q.add_argument("--attack-batch-size", dest="attack_batch_size", type=positive_int, default=100,
                   help="images per attack batch (EMPIR: 100)")
    q.add_argument("--seed", type=int, default=0, help="seed of random starts and JSMA targets")
    q.add_argument("--json", action="store_true", help="print one JSON object instead of EMPIR's lines")
    add_device(p)
    add_trust(p)
    t = p.add_argument_group("EMPIR training flags (rejected: use `qrobust train`)")
    for flag in TRAINING_FLAGS:
        t.add_argument(f"--{flag}", default=None, nargs="?", const=True, help=argparse.SUPPRESS)
    p.set_defaults(func=_run_with_gpu)


def _run_with_gpu(args: argparse.Namespace) -> int:
    if args.gpu is not None:
        if args.device not in ("auto", None):
            raise QrobustError("give --gpu or --device, not both")
        args.device = f"cuda:{args.gpu}"
    return run(args)
