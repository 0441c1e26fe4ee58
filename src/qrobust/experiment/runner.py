"""Run an experiment grid with caching and resume, then write the report.

A run is a list of *units*: train (or fetch) each model, then for every model/ensemble row the clean
accuracy, every attack x eps (x ensemble threat model), and every detection setting. Each unit has a
key — the SHA-256 of everything that produced it (model hash, attack settings, samples, seed, data
fingerprint, and the version of the attack / detection code, see :func:`code_versions`) — and is
written to the SQLite store in one transaction when it finishes. A rerun skips keys already stored,
so an interrupted run (even SIGKILL) resumes where it stopped and nothing is computed twice. Units are
seeded from the experiment seed, not from their position in the run, so a resumed run gives the same
numbers as an uninterrupted one.

Trained models are keyed by (architecture + options, training settings, training-data fingerprint),
trained with :func:`qrobust.checkpoint.train_to_checkpoint` (saved in a temporary directory renamed
into place; an interrupted training resumes from its last finished epoch).
"""

from __future__ import annotations

import hashlib
import sqlite3
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import qrobust
from qrobust.data import Dataset, check_images, load_dataset
from qrobust.errors import QrobustError
from qrobust.evaluate import accuracy, wilson_interval
from qrobust.experiment.config import AttackSpec, ExperimentConfig, ModelSpec
from qrobust.experiment.store import ResultStore, stable_hash
from qrobust.utils import check_writable_dir, resolve_device, show_progress

STORE_NAME = "store.sqlite"
Log = Callable[[str], None]
# Version of the detection pipeline (MC sampling, statistics, held-out split, ROC): bump it when a
# change alters detection results, so stored detection cells are recomputed and nothing else.
DETECTION_VERSION = "1"


def code_versions(attack: Any, *, detection: bool = False) -> dict[str, Any]:
    """The versions of the code computing a cell, for its cache key (``Attack.version``, and
    :data:`DETECTION_VERSION` for detection cells): bumping one recomputes exactly the cells it computes.

    Versions still at "1" are left out, so keys (and stores) from before versioning stay valid.
    """
    versions = {"attack": str(getattr(attack, "version", "1"))}
    if detection:
        versions["detection"] = DETECTION_VERSION
    versions = {k: v for k, v in versions.items() if v != "1"}
    return {"code": versions} if versions else {}


@dataclass
class Unit:
    """One cacheable piece of work."""

    key: str
    kind: str  # clean | attack | detection
    target: str  # model or ensemble name
    row: str  # report row label
    attack: str  # attack label ("clean" for clean accuracy)
    eps: float | None = None
    mode: str | None = None  # ensemble threat model: legacy | adaptive | adaptive_logits
    spec: AttackSpec | None = None
    samples: int = 0
    describe: dict[str, Any] = field(default_factory=dict)

    @property
    def title(self) -> str:
        eps = "" if self.eps is None else f" eps={self.eps:g}"
        return f"{self.kind} {self.row} {self.attack if self.kind != 'clean' else ''}{eps}".replace("  ", " ")


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


def fingerprint(x: Tensor, y: Tensor) -> str:
    """SHA-256 of the raw uint8 images and labels: what "the same data" means for the cache."""
    h = hashlib.sha256()
    h.update(str(tuple(x.shape)).encode())
    h.update(x.contiguous().numpy().tobytes())
    h.update(y.contiguous().numpy().tobytes())
    return h.hexdigest()


def bits_label(config: dict[str, Any] | None) -> str:
    """``a4w2``, ``5-bit``, ``1-bit`` or ``FP`` from a model's ``qrobust_config``."""
    cfg = config or {}
    kw = cfg.get("kwargs", {})
    name = cfg.get("name", "")
    if "wbits" in kw or "abits" in kw:
        w, a = int(kw.get("wbits", 32)), int(kw.get("abits", 32))
        return "FP" if w == a == 32 else f"a{a}w{w}"
    if name in ("qnn_bnn", "qnn_rbnn"):
        return "1-bit"
    if "bits" in kw:
        return "FP" if int(kw["bits"]) >= 32 else f"{int(kw['bits'])}-bit"
    return "FP"


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
        self.allow_training = allow_training
        self.train_missing = train_missing  # train a `checkpoint = "zoo:<recipe>"` missing from the zoo
        self.progress = progress
        self.log = log or (lambda _msg: None)
        self.write_report = report
        self.device = resolve_device(config.device)
        self.out = check_writable_dir(config.output_dir)
        self.store_path = self.out / STORE_NAME
        self._data: dict[str, Dataset] = {}
        self._models: dict[str, nn.Module] = {}
        self._hashes: dict[str, str] = {}
        self._bits: dict[str, str] = {}
        self.models_trained = 0

    # -- data ------------------------------------------------------------------------------------------
    def dataset(self, ds_id: str) -> Dataset:
        if ds_id not in self._data:
            spec = self.cfg.datasets[ds_id]
            self._data[ds_id] = load_dataset(spec.source, root=self.cfg.data_root)
        return self._data[ds_id]

    def test_tensors(self, ds_id: str, n: int) -> tuple[Tensor, Tensor, str]:
        test = self.dataset(ds_id).test
        if n > len(test):
            raise QrobustError(
                f"{self.cfg.source}: samples = {n} but dataset {ds_id!r} has only {len(test)} test "
                "images; lower samples"
            )
        part = test.head(n)
        x, y = part.tensors(self.device)
        return x, y, fingerprint(part.x, part.y)

    # -- models ----------------------------------------------------------------------------------------
    def _train_settings(self, spec: ModelSpec) -> dict[str, Any]:
        from qrobust.train import TrainConfig

        merged = {**self.cfg.train, **spec.train}
        ds = self.cfg.datasets[spec.dataset]
        if ds.train_samples is not None and "max_train" not in merged:
            merged["max_train"] = ds.train_samples
        return asdict(TrainConfig(**merged))

    def load_model(self, spec: ModelSpec, store: ResultStore) -> nn.Module:
        """Return the model for ``spec``, training it first unless a checkpoint with its hash exists."""
        if spec.name in self._models:
            return self._models[spec.name]
        if spec.kind == "arch":
            model, key = self._arch_model(spec, store)
        elif spec.kind == "recipe":
            model, key = self._recipe_model(spec, store)
        else:
            model, key = self._checkpoint_model(spec, store)
        data = self.dataset(spec.dataset)
        shape = tuple(getattr(model, "qrobust_config", {}).get("input_shape", data.image_shape))
        if tuple(shape) != tuple(data.image_shape):
            raise QrobustError(
                f"{self.cfg.source}: model {spec.name!r} expects images {shape} but dataset "
                f"{spec.dataset!r} has {data.image_shape}; pick a matching model or dataset"
            )
        model.eval()
        self._models[spec.name] = model
        self._hashes[spec.name] = key
        self._bits[spec.name] = bits_label(getattr(model, "qrobust_config", None))
        return model

    def _arch_model(self, spec: ModelSpec, store: ResultStore) -> tuple[nn.Module, str]:
        from qrobust.checkpoint import CONFIG, load_checkpoint, train_to_checkpoint
        from qrobust.models import create_model
        from qrobust.train import TrainConfig

        settings = self._train_settings(spec)
        probe = create_model(spec.arch, **spec.options)
        data = self.dataset(spec.dataset)
        train_split = data.train.head(settings["max_train"]) if settings.get("max_train") else data.train
        described = {
            "arch": spec.arch,
            "options": probe.qrobust_config["kwargs"],
            "train": settings,
            "data": fingerprint(train_split.x, train_split.y),
        }
        key = stable_hash(described)
        path = self.out / "models" / f"{spec.name}-{key[:12]}"
        row = store.get_model(key)
        if (path / CONFIG).is_file():
            model, _ = load_checkpoint(path, self.device)
            if row is None:  # killed between the rename and the commit: the checkpoint is complete
                store.put_model(key, spec.name, str(path), described, {"recovered": True})
            return model, key
        self._may_train(spec.name)
        self.log(f"training {spec.name} ({spec.arch} {spec.options or ''}, {settings['epochs']} epochs)")
        torch.manual_seed(settings["seed"])
        model = create_model(spec.arch, **spec.options)
        info = {"dataset": data.name, "experiment": self.cfg.name, "model_hash": key}
        result = train_to_checkpoint(
            path,
            model,
            data,
            TrainConfig(**settings),
            test=data.test.head(min(len(data.test), self.cfg.samples)),
            info=info,
            device=self.device,
            progress=self.progress,
            on_epoch=lambda r: self.log(
                f"  {spec.name} epoch {r.epoch}: loss {r.loss:.4f} "
                f"test acc {r.test_accuracy:.4f} ({r.seconds:.1f}s)"
            ),
            overwrite=True,
        )
        store.put_model(key, spec.name, str(path), described, {**info, "train": settings, **result.as_dict()})
        self.models_trained += 1
        model, _ = load_checkpoint(path, self.device)  # exactly what a resumed run will load
        return model, key

    def _may_train(self, name: str) -> None:
        if not self.allow_training:
            raise QrobustError(f"model {name!r} is not trained yet; run without --report-only first")

    def _recipe_model(self, spec: ModelSpec, store: ResultStore) -> tuple[nn.Module, str]:
        from qrobust.checkpoint import load_checkpoint
        from qrobust.recipes import ensure_trained, get_recipe
        from qrobust.zoo import find_recipe, search_dirs

        recipe = get_recipe(spec.recipe or "")
        root = self.cfg.data_root
        source = Path(self.cfg.datasets[spec.dataset].source)
        if root is None and source.suffix == ".npz" and source.stem == recipe.dataset:
            root = str(source.parent)
        zoo = Path(self.cfg.zoo) if self.cfg.zoo else None
        path = None
        if not spec.train:  # the pretrained zoo, then the cache; training only when neither has it
            path = find_recipe(recipe.name, search_dirs(zoo))
            if path is None:
                self._may_train(spec.name)
                self.log(f"training recipe {spec.recipe} (cached in the zoo for later runs)")
        if path is None:
            path = ensure_trained(
                recipe.name,
                zoo_dir=zoo,
                data_root=root,
                device=self.device,
                progress=self.progress,
                overrides=spec.train or None,
            )
        model, info = load_checkpoint(path, self.device)
        key = info.get("weights_sha256") or stable_hash({"checkpoint": str(path)})
        if store.get_model(key) is None:
            store.put_model(
                key,
                spec.name,
                str(path),
                {"recipe": spec.recipe, "train": spec.train},
                {k: v for k, v in info.items() if k != "history"},
            )
        return model, key

    def _checkpoint_model(self, spec: ModelSpec, store: ResultStore) -> tuple[nn.Module, str]:
        from qrobust.checkpoint import WEIGHTS, load_checkpoint
        from qrobust.zoo import resolve_checkpoint

        path = resolve_checkpoint(
            spec.checkpoint or "",
            flag=f"{self.cfg.source}: model {spec.name!r}:",
            train_missing=self.train_missing and self.allow_training,
            zoo_dir=self.cfg.zoo,
            data_root=self.cfg.data_root,
            device=self.device,
            progress=self.progress,
        )
        model, info = load_checkpoint(path, self.device)
        key = info.get("weights_sha256") or hashlib.sha256((path / WEIGHTS).read_bytes()).hexdigest()
        if store.get_model(key) is None:
            store.put_model(
                key,
                spec.name,
                str(path),
                {"checkpoint": str(path)},
                {k: v for k, v in info.items() if k != "history"},
            )
        return model, key

    def ensemble(self, name: str, store: ResultStore) -> nn.Module:
        from qrobust.ensemble import Ensemble

        if name not in self._models:
            spec = self.cfg.ensemble(name)
            members = [self.load_model(self.cfg.model(m), store) for m in spec.members]
            ens = Ensemble(members, names=list(spec.members), **spec.options).eval()
            self._models[name] = ens
            self._hashes[name] = stable_hash(
                {"ensemble": [self._hashes[m] for m in spec.members], "options": spec.options}
            )
            self._bits[name] = "/".join(self._bits[m] for m in spec.members)
        return self._models[name]

    def target_model(self, name: str, store: ResultStore) -> nn.Module:
        if any(e.name == name for e in self.cfg.ensembles):
            return self.ensemble(name, store)
        return self.load_model(self.cfg.model(name), store)

    def dataset_of(self, name: str) -> str:
        if any(e.name == name for e in self.cfg.ensembles):
            return self.cfg.model(self.cfg.ensemble(name).members[0]).dataset
        return self.cfg.model(name).dataset

    # -- planning --------------------------------------------------------------------------------------
    def _attack_params(
        self, spec: AttackSpec, eps: float | None, mode: str | None, target_name: str
    ) -> dict[str, Any]:
        from qrobust.attacks import attack_params

        params = {**spec.params}
        params.setdefault("seed", self.cfg.seed)
        if eps is not None:
            params["eps"] = eps
        if mode is not None and "loss" in attack_params(spec.name):
            ens = self._models[target_name]
            if mode == "legacy" or "loss" not in params:
                params["loss"] = ens.attack_target(mode, spec.name).loss
        return params

    def plan(self, store: ResultStore) -> list[Unit]:
        """Every unit of the grid with its key (loads or trains the models, which the keys depend on)."""
        from qrobust.attacks import create_attack

        cfg = self.cfg
        units: list[Unit] = []
        rows: list[tuple[str, str, str | None]] = []  # (target, row label, mode)
        for m in cfg.models:
            self.load_model(m, store)
        for e in cfg.ensembles:
            self.ensemble(e.name, store)
        targets = [m.name for m in cfg.models] + [e.name for e in cfg.ensembles]
        labels = {m.name: m.label for m in cfg.models} | {e.name: e.label for e in cfg.ensembles}
        detected = set(cfg.detection.models) if cfg.detection is not None else set()
        for t in targets:
            attacked = [a for a in cfg.attacks if a.models is None or t in a.models]
            if not attacked and t not in detected:
                continue
            ds = self.dataset_of(t)
            x_fp_cache: dict[int, str] = {}

            def data_fp(n: int, ds: str = ds, cache: dict[int, str] = x_fp_cache) -> str:
                if n not in cache:
                    cache[n] = self.test_tensors(ds, n)[2]
                return cache[n]

            is_ens = any(e.name == t for e in cfg.ensembles)
            modes: list[str | None] = list(cfg.ensemble(t).targets) if is_ens else [None]
            n = cfg.samples
            units.append(
                Unit(
                    stable_hash(
                        {
                            "kind": "clean",
                            "model": self._hashes[t],
                            "samples": n,
                            "seed": cfg.seed,
                            "data": data_fp(n),
                        }
                    ),
                    "clean",
                    t,
                    labels[t],
                    "clean",
                    samples=n,
                )
            )
            for a in attacked:
                a_modes = [m for m in modes if a.targets is None or m is None or m in a.targets]
                for mode in a_modes:
                    row = labels[t] if mode is None else f"{labels[t]} [{mode}]"
                    if (t, row, mode) not in rows:
                        rows.append((t, row, mode))
                    n = a.samples or cfg.samples
                    for eps in a.eps:
                        params = self._attack_params(a, eps, mode, t)
                        atk = create_attack(a.name, **params)
                        atk_cfg = atk.config()
                        described = {
                            "kind": "attack",
                            "model": self._hashes[t],
                            "mode": mode,
                            "attack": atk_cfg,
                            "labels": a.labels,
                            "samples": n,
                            "seed": cfg.seed,
                            "data": data_fp(n),
                            **code_versions(atk),
                        }
                        units.append(
                            Unit(
                                stable_hash(described),
                                "attack",
                                t,
                                row,
                                a.label,
                                eps,
                                mode,
                                a,
                                n,
                                {"attack_config": atk_cfg},
                            )
                        )
        if cfg.detection is not None:
            det = cfg.detection
            for name in det.models:
                model = self.load_model(cfg.model(name), store)
                from qrobust.mc import is_stochastic

                if not is_stochastic(model):
                    raise QrobustError(
                        f"{cfg.source}: detection.models: {name!r} is deterministic at inference "
                        "(no dropout kept on, no stochastic weights), so Monte-Carlo detection "
                        "has nothing to measure; use a model with options.mc_dropout = true "
                        "and dropout > 0"
                    )
                ds = cfg.model(name).dataset
                for label in det.attacks:
                    a = cfg.attack(label)
                    eps = det.eps if det.eps is not None else a.table_eps
                    n = det.samples or a.samples or cfg.samples
                    params = self._attack_params(a, eps, None, name)
                    atk = create_attack(a.name, **params)
                    atk_cfg = atk.config()
                    described = {
                        **code_versions(atk, detection=True),
                        "kind": "detection",
                        "model": self._hashes[name],
                        "attack": atk_cfg,
                        "labels": a.labels,
                        "mc_samples": det.mc_samples,
                        "samples": n,
                        "seed": cfg.seed,
                        "data": self.test_tensors(ds, n)[2],
                    }
                    units.append(
                        Unit(
                            stable_hash(described),
                            "detection",
                            name,
                            cfg.model(name).label,
                            a.label,
                            eps,
                            None,
                            a,
                            n,
                            {"attack_config": atk_cfg},
                        )
                    )
        seen: dict[str, Unit] = {}
        for u in units:
            if u.key in seen:
                first = seen[u.key]
                raise QrobustError(
                    f"{cfg.source}: {first.row!r} and {u.row!r} would produce the same result "
                    f"({u.title.strip()}): they are the same model (same weights, or same architecture, "
                    "training and data) evaluated the same way; remove one of them"
                )
            seen[u.key] = u
        return units

    # -- execution -------------------------------------------------------------------------------------
    def _base_record(self, u: Unit) -> dict[str, Any]:
        is_ens = any(e.name == u.target for e in self.cfg.ensembles)
        return {
            "key": u.key,
            "kind": u.kind,
            "target": u.target,
            "row": u.row,
            "attack": u.attack,
            "attack_name": u.spec.name if u.spec else None,
            "eps": u.eps,
            "mode": u.mode,
            "labels": u.spec.labels if u.spec else None,
            "samples": u.samples,
            "seed": self.cfg.seed,
            "model_hash": self._hashes[u.target],
            "config_hash": self._hashes[u.target],
            "bits": self._bits.get(u.target, ""),
            "ensemble": is_ens,
            "dataset": self.cfg.datasets[self.dataset_of(u.target)].source,
            "qrobust_version": qrobust.__version__,
            "device": str(self.device),
            **u.describe,
        }

    def execute(self, u: Unit, store: ResultStore) -> dict[str, Any]:
        """Compute one unit and commit it to the store (one transaction)."""
        x, y, data_fp = self.test_tensors(self.dataset_of(u.target), u.samples)
        model = self._models[u.target]
        check_images(x, None, f"dataset {self.dataset_of(u.target)}")
        torch.manual_seed(self.cfg.seed)  # units are seeded by the experiment, not by their order
        t0 = time.perf_counter()
        rec = self._base_record(u)
        rec["data_fingerprint"] = data_fp
        if u.kind == "clean":
            acc = accuracy(model, x, y, self.cfg.batch_size)
            correct = round(acc * len(y))
            rec.update(accuracy=acc, n=len(y), correct=correct, ci95=list(wilson_interval(correct, len(y))))
        elif u.kind == "attack":
            rec.update(self._attack_unit(u, model, x, y))
        else:
            rec.update(self._detection_unit(u, model, x, y))
        rec["seconds"] = time.perf_counter() - t0
        try:
            store.put_result(rec)
        except sqlite3.IntegrityError:  # another process sharing this output finished the same unit first
            self.log(f"{u.title.strip()}: already stored by another run; keeping the stored result")
        return rec

    def _attack_unit(self, u: Unit, model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Any]:
        from qrobust.attacks import create_attack
        from qrobust.evaluate import evaluate_attack

        spec = u.spec
        assert spec is not None
        atk: Any = create_attack(spec.name, **self._attack_params(spec, u.eps, u.mode, u.target))
        if u.mode is not None:
            from qrobust.ensemble import on_target

            atk = on_target(atk, model.attack_target(u.mode, spec.name))
        res = evaluate_attack(model, atk, x, y, labels=spec.labels, batch_size=self.cfg.batch_size)
        d = res.as_dict()
        n = d["n"]
        correct = round(d["adversarial_accuracy"] * n)
        return {
            "accuracy": d["adversarial_accuracy"],
            "n": n,
            "correct": correct,
            "ci95": d["adversarial_ci95"],
            "attack_config": atk.config(),
            "attack_result": _jsonable(d),
        }

    def _detection_unit(self, u: Unit, model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Any]:
        from qrobust.attacks import create_attack
        from qrobust.detect import roc_points, run_detection

        spec = u.spec
        det = self.cfg.detection
        assert spec is not None and det is not None
        atk = create_attack(spec.name, **self._attack_params(spec, u.eps, None, u.target))
        gen = torch.Generator(device=x.device).manual_seed(self.cfg.seed)
        run = run_detection(model, atk, x, y, samples=det.mc_samples, attack_batch=self.cfg.batch_size,
                            seed=self.cfg.seed, labels=spec.labels, mc_generator=gen, bootstrap=200)
        report, curves, res = run.report, run.per_input, run.attack_result
        held = curves["heldout"]
        roc = roc_points(curves["clean_seed_variance"][held], curves["adv_seed_variance"][held])
        metrics = report.heldout_all["seed_variance"]
        rd = report.as_dict()
        detection = {
            "statistic": "seed_variance",
            "mc_samples": det.mc_samples,
            "auc": metrics["auc"],
            "auc_ci95": metrics.get("auc_ci95"),
            "lr_score": rd["seed_lr_score"],
            "heldout_lr_accuracy": rd["heldout_lr_accuracy"],
            "clean_accuracy": rd["clean_accuracy"]["group"],
            "adv_accuracy": rd["adv_accuracy"]["group"],
            "uncertainty_clean": rd["mean_stats_clean"]["seed_variance"],
            "uncertainty_adv": rd["mean_stats_adv"]["seed_variance"],
            "attack_success": rd["attack_success"],
            "n_heldout": rd["n_heldout"],
            "roc": {"fpr": roc["fpr"], "tpr": roc["tpr"]} if roc else {"fpr": [], "tpr": []},
            "report": _jsonable(rd),
        }
        d = res.as_dict()
        return {
            "accuracy": d["adversarial_accuracy"],
            "n": d["n"],
            "correct": round(d["adversarial_accuracy"] * d["n"]),
            "ci95": d["adversarial_ci95"],
            "attack_config": atk.config(),
            "attack_result": _jsonable(d),
            "detection": detection,
        }

    def run(self) -> RunSummary:
        t0 = time.perf_counter()
        with ResultStore(self.store_path) as store:
            units = self.plan(store)
            todo = [u for u in units if not store.has_result(u.key)]
            self.log(
                f"{len(units)} result units, {len(units) - len(todo)} already in {self.store_path}, "
                f"{len(todo)} to compute"
            )
            from tqdm import tqdm

            bar = tqdm(
                total=len(units),
                initial=len(units) - len(todo),
                desc=self.cfg.name,
                unit="unit",
                file=sys.stderr,
                disable=not show_progress(self.progress),
                dynamic_ncols=True,
            )
            try:
                for i, u in enumerate(todo, len(units) - len(todo) + 1):
                    bar.set_postfix_str(u.title[:60])
                    if self.progress and bar.disable:  # a log or CI: one line per unit, no bar redraws
                        self.log(f"[{i}/{len(units)}] {u.title.strip()}")
                    self.execute(u, store)
                    bar.update(1)
            finally:
                bar.close()
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
        if self.write_report:
            summary.report = self.report(records)
        return summary

    def report(self, records: list[dict[str, Any]]) -> Any:
        from qrobust.report import write_report

        columns = [(a.label, a.table_eps) for a in self.cfg.attacks]
        meta = {
            "experiment": self.cfg.name,
            "file": self.cfg.source,
            "experiment_hash": stable_hash(self.cfg.raw),
            "qrobust_version": qrobust.__version__,
            "samples": self.cfg.samples,
            "seed": self.cfg.seed,
            "device": str(self.device),
            "store": str(self.store_path),
            "generated": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        }
        from qrobust.utils import atomic_write_json

        meta["effective_config"] = "experiment.json"
        atomic_write_json(
            self.out / "report" / "experiment.json", self.cfg.raw
        )  # after --set/--data overrides
        return write_report(
            records,
            self.out / "report",
            columns=columns,
            sanity_options=self.cfg.sanity,
            meta=meta,
            title=f"qrobust report: {self.cfg.name}",
        )


def _jsonable(obj: Any) -> Any:
    import math

    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Tensor):
        return _jsonable(obj.tolist())
    if hasattr(obj, "item") and callable(obj.item):
        try:
            return _jsonable(obj.item())
        except (TypeError, ValueError):
            return str(obj)
    if isinstance(obj, int | str | bool) or obj is None:
        return obj
    return str(obj)


def run_experiment(
    config: ExperimentConfig, *, progress: bool = True, log: Log | None = None, report: bool = True
) -> RunSummary:
    """Run (or resume) ``config`` and write its report; see :class:`Runner`."""
    return Runner(config, progress=progress, log=log, report=report).run()
