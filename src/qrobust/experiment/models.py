"""The models of an experiment: loaded, trained or fetched once, each with the hash its cache keys use.

Trained models are keyed by (architecture + options, training settings, training-data fingerprint),
trained with :func:`qrobust.train.train_to_checkpoint` (saved in a temporary directory renamed
into place; an interrupted training resumes from its last finished epoch). Recipe and checkpoint models
are keyed by their weights' SHA-256.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from qrobust.checkpoint import check_labels
from qrobust.data import Dataset, data_digest, load_dataset
from qrobust.errors import QrobustError
from qrobust.experiment.config import ExperimentConfig, ModelSpec
from qrobust.experiment.store import ResultStore, stable_hash

Log = Callable[[str], None]


# the data identity of a cache key: the same digest as a training resume fingerprint
fingerprint = data_digest


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


class Models:
    """Datasets, models and ensembles of one experiment, each built once; ``hashes[name]`` keys its cells."""

    def __init__(
        self,
        config: ExperimentConfig,
        out: Path,
        device: torch.device,
        *,
        progress: bool = True,
        log: Log | None = None,
        allow_training: bool = True,
        train_missing: bool = False,
    ) -> None:
        self.cfg = config
        self.out = out
        self.device = device
        self.progress = progress
        self.log = log or (lambda _msg: None)
        self.allow_training = allow_training
        self.train_missing = train_missing  # train a `checkpoint = "zoo:<recipe>"` missing from the zoo
        self._data: dict[str, Dataset] = {}
        self.models: dict[str, nn.Module] = {}
        self.hashes: dict[str, str] = {}
        self.bits: dict[str, str] = {}
        self.trained = 0

    # -- data ------------------------------------------------------------------------------------------
    def dataset(self, ds_id: str) -> Dataset:
        if ds_id not in self._data:
            spec = self.cfg.datasets[ds_id]
            self._data[ds_id] = load_dataset(spec.source, root=self.cfg.data_root, image_size=spec.image_size)
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

    def is_ensemble(self, name: str) -> bool:
        return any(e.name == name for e in self.cfg.ensembles)

    def dataset_of(self, name: str) -> str:
        if self.is_ensemble(name):
            return self.cfg.model(self.cfg.ensemble(name).members[0]).dataset
        return self.cfg.model(name).dataset

    # -- models ----------------------------------------------------------------------------------------
    def load(self, spec: ModelSpec, store: ResultStore) -> nn.Module:
        """Return the model for ``spec``, training it first unless a checkpoint with its hash exists."""
        if spec.name in self.models:
            return self.models[spec.name]
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
        try:  # a zoo member or checkpoint on a dataset with more classes than it predicts: 0% by construction
            check_labels(model, data.test)
        except QrobustError as exc:
            raise QrobustError(f"{self.cfg.source}: model {spec.name!r}: {exc}") from exc
        self.models[spec.name] = model
        self.hashes[spec.name] = key
        self.bits[spec.name] = bits_label(getattr(model, "qrobust_config", None))
        return model

    def ensemble(self, name: str, store: ResultStore) -> nn.Module:
        from qrobust.ensemble import Ensemble

        if name not in self.models:
            spec = self.cfg.ensemble(name)
            members = [self.load(self.cfg.model(m), store) for m in spec.members]
            ens = Ensemble(members, names=list(spec.members), **spec.options).eval()
            self.models[name] = ens
            self.hashes[name] = stable_hash(
                {"ensemble": [self.hashes[m] for m in spec.members], "options": spec.options}
            )
            self.bits[name] = "/".join(self.bits[m] for m in spec.members)
        return self.models[name]

    def target(self, name: str, store: ResultStore) -> nn.Module:
        if self.is_ensemble(name):
            return self.ensemble(name, store)
        return self.load(self.cfg.model(name), store)

    def load_all(self, store: ResultStore) -> None:
        for m in self.cfg.models:
            self.load(m, store)
        for e in self.cfg.ensembles:
            self.ensemble(e.name, store)

    def _train_settings(self, spec: ModelSpec) -> dict[str, Any]:
        from qrobust.train import TrainConfig

        merged = {**self.cfg.train, **spec.train}
        ds = self.cfg.datasets[spec.dataset]
        if ds.train_samples is not None and "max_train" not in merged:
            merged["max_train"] = ds.train_samples
        return asdict(TrainConfig(**merged))

    def _may_train(self, name: str) -> None:
        if not self.allow_training:
            raise QrobustError(f"model {name!r} is not trained yet; run without --report-only first")

    def _arch_model(self, spec: ModelSpec, store: ResultStore) -> tuple[nn.Module, str]:
        from qrobust.checkpoint import CONFIG, load_checkpoint
        from qrobust.models import create_model

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
        if (path / CONFIG).is_file():
            model, _ = load_checkpoint(path, self.device)
            if store.get_model(key) is None:  # killed between the rename and the commit: it is complete
                store.put_model(key, spec.name, str(path), described, {"recovered": True})
            return model, key
        self._may_train(spec.name)
        self._train_arch(spec, settings, path, key, described, store)
        model, _ = load_checkpoint(path, self.device)  # exactly what a resumed run will load
        return model, key

    def _train_arch(
        self,
        spec: ModelSpec,
        settings: dict[str, Any],
        path: Path,
        key: str,
        described: dict[str, Any],
        store: ResultStore,
    ) -> None:
        from qrobust.models import create_model
        from qrobust.train import TrainConfig, train_to_checkpoint

        self.log(f"training {spec.name} ({spec.arch} {spec.options or ''}, {settings['epochs']} epochs)")
        data = self.dataset(spec.dataset)
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
        self.trained += 1

    def _recipe_model(self, spec: ModelSpec, store: ResultStore) -> tuple[nn.Module, str]:
        from qrobust.checkpoint import load_checkpoint
        from qrobust.recipes import get_recipe
        from qrobust.zoo import ensure_trained, find_recipe, search_dirs

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
        self._register(store, key, spec, path, {"recipe": spec.recipe, "train": spec.train}, info)
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
        self._register(store, key, spec, path, {"checkpoint": str(path)}, info)
        return model, key

    @staticmethod
    def _register(
        store: ResultStore, key: str, spec: ModelSpec, path: Path, described: dict[str, Any], info: dict
    ) -> None:
        """Record a fetched model in the store once (its training history stays in the checkpoint)."""
        if store.get_model(key) is None:
            kept = {k: v for k, v in info.items() if k != "history"}
            store.put_model(key, spec.name, str(path), described, kept)
