"""Run an experiment grid with caching and resume, then write the report.

The grid is planned into units (:mod:`qrobust.experiment.plan`: clean accuracy, attack x eps x ensemble
threat model, detection), each keyed by the SHA-256 of everything that produced it; each unit is
computed (:mod:`qrobust.experiment.units`) and written to the SQLite store in one transaction when it
finishes. A rerun skips keys already stored, so an interrupted run (even SIGKILL) resumes where it
stopped and nothing is computed twice. Units are seeded from the experiment seed, not from their
position in the run, so a resumed run gives the same numbers as an uninterrupted one. Models are
trained or fetched once (:mod:`qrobust.experiment.models`).
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from qrobust.distributed import is_main
from qrobust.experiment.config import ExperimentConfig, ModelSpec
from qrobust.experiment.models import Models, bits_label, fingerprint
from qrobust.experiment.plan import DETECTION_VERSION, Unit, code_versions, plan
from qrobust.experiment.store import ResultStore, stable_hash
from qrobust.experiment.units import execute
from qrobust.utils import check_writable_dir, output_lock, resolve_device, show_progress
from qrobust.version import __version__

STORE_NAME = "store.sqlite"
Log = Callable[[str], None]


@dataclass
class RunSummary:
    output: Path
    store: Path
    total: int
    computed: int
    skipped: int
    models_trained: int
    seconds: float
    records: list[dict[str, Any]]
    report: Any = None  # qrobust.report.Report

    def as_dict(self) -> dict[str, Any]:
        return {
            "output": str(self.output),
            "store": str(self.store),
            "total": self.total,
            "computed": self.computed,
            "skipped": self.skipped,
            "models_trained": self.models_trained,
            "seconds": round(self.seconds, 2),
            "report": str(self.report.index) if self.report is not None else None,
        }


class Runner:
    """Plans and runs the units of one experiment; see the module docstring."""

    def __init__(
        self,
        config: ExperimentConfig,
        *,
        progress: bool = True,
        log: Log | None = None,
        report: bool = True,
        allow_training: bool = True,
        train_missing: bool = False,
    ) -> None:
        self.cfg = config
        self.progress = progress
        self.log = (log if is_main() else None) or (lambda _msg: None)  # under torchrun rank 0 speaks
        self.write_report = report
        self.device = resolve_device(config.device)
        self.out = check_writable_dir(config.output_dir)
        self.store_path = self.out / STORE_NAME
        self.models = Models(config, self.out, self.device, progress=progress, log=self.log,
                             allow_training=allow_training, train_missing=train_missing)

    @property
    def models_trained(self) -> int:
        return self.models.trained

    def test_tensors(self, ds_id: str, n: int) -> tuple[Tensor, Tensor, str]:
        return self.models.test_tensors(ds_id, n)

    def load_model(self, spec: ModelSpec, store: ResultStore) -> nn.Module:
        return self.models.load(spec, store)

    def target_model(self, name: str, store: ResultStore) -> nn.Module:
        return self.models.target(name, store)

    def plan(self, store: ResultStore) -> list[Unit]:
        """Every unit of the grid with its key (loads or trains the models, which the keys depend on)."""
        return plan(self.cfg, self.models, store)

    def execute(self, u: Unit, store: ResultStore) -> dict[str, Any]:
        """Compute one unit and commit it to the store (one transaction)."""
        return execute(self.cfg, self.models, u, store, self.log)

    def run(self) -> RunSummary:
        """Plan, compute what the store lacks, write the report. Under torchrun every rank computes every
        unit on its share of the images (:mod:`qrobust.distributed`); rank 0 alone holds the output lock,
        trains missing models, writes the store and the report."""
        from qrobust import distributed as dist

        t0 = time.perf_counter()
        main = dist.is_main()
        # one writer per output: a second `qrobust run` on it refuses at once (qrobust.utils.output_lock)
        with output_lock(self.out, "experiment output") if main else contextlib.nullcontext():
            if not main:
                dist.barrier()  # rank 0 plans first: it creates the store and trains what is missing
            with ResultStore(self.store_path) as store:
                with dist.solo():  # rank 0 trains what is missing on its own; the others then load it
                    units = self.plan(store)
                if main:
                    dist.barrier()
                # rank 0's view of what is stored decides, so every rank computes the same units
                todo_keys = set(dist.broadcast([u.key for u in units if not store.has_result(u.key)]))
                todo = [u for u in units if u.key in todo_keys]
                self.log(
                    f"{len(units)} result units, {len(units) - len(todo)} already in {self.store_path}, "
                    f"{len(todo)} to compute"
                )
                self._compute(units, todo, store)
                dist.barrier()  # rank 0 has committed the last unit
                records = store.results([u.key for u in units])
        summary = RunSummary(
            self.out,
            self.store_path,
            len(units),
            len(todo),
            len(units) - len(todo),
            self.models_trained,
            time.perf_counter() - t0,
            records,
        )
        if self.write_report and main:
            summary.report = self.report(records)
        return summary

    def _compute(self, units: list[Unit], todo: list[Unit], store: ResultStore) -> None:
        """Execute ``todo`` with a progress bar (or, without a terminal, one log line per unit)."""
        from tqdm import tqdm

        bar = tqdm(
            total=len(units),
            initial=len(units) - len(todo),
            desc=self.cfg.name,
            unit="unit",
            file=sys.stderr,
            disable=not show_progress(self.progress) or not is_main(),
            dynamic_ncols=True,
        )
        try:
            for i, u in enumerate(todo, len(units) - len(todo) + 1):
                bar.set_postfix_str(u.title[:60])
                if self.progress and bar.disable and is_main():  # a log or CI: one line per unit, no redraws
                    self.log(f"[{i}/{len(units)}] {u.title.strip()}")
                self.execute(u, store)
                bar.update(1)
        finally:
            bar.close()

    def report(self, records: list[dict[str, Any]]) -> Any:
        from qrobust.report import write_report
        from qrobust.utils import atomic_write_json

        columns = [(a.label, a.table_eps) for a in self.cfg.attacks]
        meta = {
            "experiment": self.cfg.name,
            "file": self.cfg.source,
            "experiment_hash": stable_hash(self.cfg.raw),
            "qrobust_version": __version__,
            "samples": self.cfg.samples,
            "seed": self.cfg.seed,
            "device": str(self.device),
            "store": str(self.store_path),
            "generated": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "effective_config": "experiment.json",
        }
        # the effective config, after --set/--data overrides
        atomic_write_json(self.out / "report" / "experiment.json", self.cfg.raw)
        return write_report(
            records,
            self.out / "report",
            columns=columns,
            sanity_options=self.cfg.sanity,
            meta=meta,
            title=f"qrobust report: {self.cfg.name}",
        )


def run_experiment(
    config: ExperimentConfig, *, progress: bool = True, log: Log | None = None, report: bool = True
) -> RunSummary:
    """Run (or resume) ``config`` and write its report; see :class:`Runner`."""
    return Runner(config, progress=progress, log=log, report=report).run()


__all__ = ["DETECTION_VERSION", "STORE_NAME", "RunSummary", "Runner", "Unit", "bits_label", "code_versions",
           "fingerprint", "run_experiment"]
