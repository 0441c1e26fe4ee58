"""``qrobust run FILE``: run (or resume) an experiment file and write its report.

    qrobust run configs/quickstart.toml --data-root ../shared/data
    qrobust run configs/empir_mnist.toml --data-root ../shared/data
    qrobust run configs/empir_mnist.toml --set data=../shared/data/mnist.npz --set samples=500

Also runnable as ``python -m qrobust.cli.run FILE ...``.
"""

from __future__ import annotations

import argparse
import json
import sys

from qrobust.cli.common import add_train_missing, one_line_errors, positive_int


def _log(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    from qrobust.experiment import Runner, load_config

    cfg = load_config(
        args.file,
        args.set,
        data=args.data,
        data_root=args.data_root,
        output=args.out,
        device=args.device,
        samples=args.samples,
        only=args.only,
    )
    if args.check:
        check_outputs(cfg)
        print(
            f"{args.file}: ok ({len(cfg.models)} models, {len(cfg.ensembles)} ensembles, "
            f"{len(cfg.attacks)} attacks, detection {'on' if cfg.detection else 'off'}; output {cfg.output})"
        )
        return 0
    runner = Runner(cfg, progress=not args.quiet, log=_log, report=True, allow_training=not args.report_only,
                    train_missing=args.train_missing)
    if args.report_only:
        from qrobust.experiment.store import ResultStore

        with ResultStore(runner.store_path) as store:
            units = runner.plan(store)
            records = store.results([u.key for u in units])
        missing = len(units) - len(records)
        report = runner.report(records)
        print(report.summary.markdown())
        print(f"\nreport: {report.index} ({missing} of {len(units)} results not computed yet)")
        return 0
    summary = runner.run()
    report = summary.report
    if report is None:  # a torchrun rank other than 0: it computed its share; rank 0 reports
        return 0
    print(report.summary.markdown())
    if report.detection.rows:
        print()
        print(report.detection.markdown())
    print()
    print(report.sanity.markdown())
    print()
    print(f"report: {report.index}")
    print(json.dumps(summary.as_dict()))
    return 0


def check_outputs(cfg) -> None:  # noqa: ANN001
    """What ``run`` would refuse about its output and data, checked without computing or writing results:
    the output folder (writable, not in use by another run), its store (ours or absent) and each dataset."""
    from qrobust.data import load_dataset
    from qrobust.experiment.runner import STORE_NAME
    from qrobust.experiment.store import ResultStore
    from qrobust.utils import check_writable_dir, output_lock

    out = cfg.output_dir.expanduser().absolute()
    existing = next(d for d in (out, *out.parents) if d.exists())
    check_writable_dir(existing)  # an existing folder is only probed; a missing one is not created
    if existing == out:
        ResultStore.verify(out / STORE_NAME)
        with output_lock(out, "experiment output"):
            pass
    for spec in cfg.datasets.values():
        load_dataset(spec.source, root=cfg.data_root, image_size=spec.image_size)


def register(sub: argparse._SubParsersAction) -> None:
    p = one_line_errors(sub.add_parser(
        "run",
        help="run an experiment file (TOML): train, attack, detect, report",
        description="Run (or resume) an experiment file (TOML) and write its report (docs/experiments.md).",
    ))
    p.add_argument("file", help="experiment file, e.g. configs/quickstart.toml (see docs/experiments.md)")
    p.add_argument(
        "--out", default=None, help="output directory (default: the file's `output`, else runs/<name>)"
    )
    p.add_argument(
        "--data",
        default=None,
        help="source of the experiment's dataset: digits, mnist, cifar10, a .npz path or a folder",
    )
    p.add_argument("--data-root", default=None, help="folder holding <name>.npz files (e.g. ../shared/data)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key of the file, e.g. --set samples=100 --set attacks.0.eps=[0.1,0.3] "
        "(repeatable; data=... sets the dataset source)",
    )
    p.add_argument(
        "--samples", type=positive_int, default=None, help="first N test images (overrides samples)"
    )
    p.add_argument(
        "--only", nargs="+", default=None, metavar="NAME",
        help="run only these models/ensembles of the file (an ensemble brings its members); results keep "
        "their keys, so stores of parts merge and the full file finds them",
    )
    p.add_argument("--check", action="store_true", help="only validate the file")
    p.add_argument("--report-only", action="store_true", help="rebuild the report from stored results")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_train_missing(p)
    p.add_argument(
        "--device",
        default=None,
        help="auto (CUDA if available), cpu or cuda[:N] (default: the file's device, else auto)",
    )
    p.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    from qrobust.cli import main as cli_main

    return cli_main(["run", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
