"""``qrobust worst-case CHECKPOINT|zoo:NAME|ENSEMBLE...``: per-image worst case of a suite of attacks.

One checkpoint is attacked alone; several form an EMPIR ensemble (majority vote, the last full-precision
member breaks ties). See :class:`qrobust.attacks.WorstCase` for the suite.
"""

from __future__ import annotations

import argparse
import json

from qrobust.cli.common import (
    add_data,
    add_device,
    add_train_missing,
    add_trust,
    checkpoint_path,
    load_model,
    load_test_split,
    nonneg_int,
    one_line_errors,
    positive_int,
)
from qrobust.distributed import is_main


def _suite(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def _load(args: argparse.Namespace, device):
    """(model, config of the first member) of one checkpoint or of an ensemble of several."""
    from qrobust.ensemble import Ensemble

    loaded = [load_model(args, checkpoint_path(args, text), device) for text in args.models]
    if len(loaded) == 1:
        return loaded[0]
    ens = Ensemble([m for m, _ in loaded])
    ens.member_configs = [c for _, c in loaded]
    datasets = {c.get("dataset") for c in ens.member_configs if c.get("dataset")}
    if len(datasets) > 1:
        from qrobust.errors import QrobustError

        raise QrobustError("ensemble members were trained on different datasets "
                           f"({', '.join(sorted(datasets))}); combine models of one dataset")
    return ens.eval(), ens.member_configs[0]


def run(args: argparse.Namespace) -> int:
    from qrobust.suite import worst_case
    from qrobust.utils import atomic_write_json, check_output_file, resolve_device, seed_everything

    if args.json_out:
        check_output_file(args.json_out, "--json-out")
    device = resolve_device(args.device)
    seed_everything(args.seed)
    model, config = _load(args, device)
    data, x, y = load_test_split(args, model, config, args.n, device)
    settings = {"eps": args.eps, "norm": args.norm, "steps": args.steps, "n_queries": args.queries,
                "n_target_classes": args.target_classes, "restarts": args.restarts,
                "mc_samples": args.mc_samples, "seed": args.seed}
    if args.suite is not None:
        settings["suite"] = args.suite
    report = worst_case(model, x, y, batch_size=args.batch_size, **settings)
    lo, hi = report.as_dict()["ci95"]
    print(f"worst case of {' + '.join(args.models)} on {report.n} images of {data.name}, {report.norm} "
          f"eps {report.eps:g}\n\n{report.markdown()}\n\n"
          f"worst-case robust accuracy {report.accuracy:.4f} [95% CI {lo:.4f}, {hi:.4f}]")
    record = {"models": list(args.models), "dataset": data.name, "settings": settings, **report.as_dict()}
    if args.json_out and is_main():  # under torchrun every rank holds the gathered report; rank 0 writes
        atomic_write_json(args.json_out, record)
    if args.json:
        print(json.dumps(record))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = one_line_errors(sub.add_parser(
        "worst-case", help="per-image worst case of APGD-CE, APGD-T and Square (ensembles: every threat "
                           "model and the vote-aware objective)"))
    p.add_argument("models", nargs="+", metavar="CHECKPOINT",
                   help="checkpoint folder, recipe name or zoo:<recipe>; several = an EMPIR ensemble")
    add_train_missing(p)
    add_trust(p)
    p.add_argument("--eps", type=float, default=0.3, help="radius of the threat model (default 0.3)")
    p.add_argument("--norm", default="Linf", choices=("Linf", "L2"))
    p.add_argument("--suite", type=_suite, default=None,
                   help="comma-separated attacks to run, in order (default: the model's full suite): "
                        "apgd_ce, apgd_t, square; ensembles also apgd_vote, apgd_ce_legacy, apgd_ce_adaptive")
    p.add_argument("--steps", type=positive_int, default=100, help="APGD steps (default 100)")
    p.add_argument("--queries", type=positive_int, default=5000, help="Square queries (default 5000)")
    p.add_argument("--target-classes", dest="target_classes", type=positive_int, default=9,
                   help="APGD-T target classes (default 9)")
    p.add_argument("--restarts", type=positive_int, default=1, help="APGD restarts (default 1)")
    p.add_argument("--mc-samples", dest="mc_samples", type=positive_int, default=10,
                   help="Monte-Carlo copies for a randomized net (judge and EOT; default 10)")
    add_data(p, default=None)
    p.add_argument("-n", type=nonneg_int, default=1000, help="first N test images (0 = all; default 1000)")
    p.add_argument("--batch-size", type=positive_int, default=500)
    p.add_argument("--seed", type=nonneg_int, default=0)
    add_device(p)
    p.add_argument("--json-out", help="write the report (JSON, with the attack that broke each image)")
    p.add_argument("--json", action="store_true", help="also print the report as one JSON line")
    p.set_defaults(func=run)


__all__ = ["register", "run"]
