"""Named training recipes: the models the seeds' tables were made with, trained here on demand.

The seeds shipped pretrained checkpoints on a file host; qrobust cannot download them, so a recipe
records exactly how to train an equivalent model, and :func:`ensure_trained` returns the pretrained
checkpoint from the repository's zoo (:mod:`qrobust.zoo`) or trains it once into a cache folder
(skipping work already done, resuming an interrupted run).

Epoch counts are below the seeds' 15 where two CPU cores make that impractical; each recipe says so.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qrobust import zoo
from qrobust.checkpoint import CONFIG, load_checkpoint, train_to_checkpoint
from qrobust.data import load_dataset
from qrobust.errors import QrobustError
from qrobust.models import create_model
from qrobust.models.registry import get_entry
from qrobust.train import EpochRecord, TrainConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recipe:
    name: str
    model: str
    model_kwargs: dict[str, Any]
    dataset: str
    train: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    init_from: str = ""  # start from this recipe's trained weights (quantization-aware fine-tuning)

    def train_config(self) -> TrainConfig:
        return TrainConfig(**self.train)


def _r(name: str, model: str, dataset: str, note: str = "", train: dict | None = None, *, init_from: str = "",
       **kw: Any) -> Recipe:
    return Recipe(name, model, kw, dataset, train or {}, note, init_from)


_MNIST = {"epochs": 6, "batch_size": 128, "lr": 1e-3}
# a4w2 members learn slowly (DoReFa weights have fixed magnitude, so most layer inputs saturate the
# [0, 1] activation clip): EMPIR's 15 epochs with cosine decay gave 98.49 / 98.38%, so 25 epochs.
_MNIST_Q = {**_MNIST, "epochs": 25, "lr_schedule": "cosine"}
_CIFAR = {"epochs": 8, "batch_size": 128, "lr": 1e-3, "label_smoothing": 0.1}
_CIFAR_Q = {**_CIFAR, "epochs": 6}
_SEEDA = {"epochs": 1, "batch_size": 64, "lr": 1e-3}
# Full-precision and k-bit variants: full MNIST, cosine decay (fits more accuracy into few CPU epochs).
_SEEDA_FP = {**_SEEDA, "epochs": 2, "lr_schedule": "cosine"}
_SEEDA_KBIT = {**_SEEDA, "epochs": 1, "lr_schedule": "cosine"}

RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in [
        # EMPIR MNIST: baseline MNISTconv and two a4w2 members (EMPIR trained 15 epochs).
        _r("mnistconv_fp", "mnistconv", "mnist", "EMPIR baseline / member 3", {**_MNIST, "seed": 0}),
        *[
            _r(f"mnistconv_a4w2_m{i}", "mnistconv", "mnist", f"EMPIR member {i}", {**_MNIST_Q, "seed": i},
               wbits=2, abits=4)
            for i in (1, 2)
        ],
        # EMPIR CIFAR-10: a2w4, a2w2, FP with label smoothing 0.1.
        _r("cifarconv_fp", "cifarconv", "cifar10", "EMPIR baseline / member 3", {**_CIFAR, "seed": 0}),
        *[
            _r(f"cifarconv_a2w{w}", "cifarconv", "cifar10", f"EMPIR member {i}", {**_CIFAR_Q, "seed": i},
               wbits=w, abits=2)
            for i, w in ((1, 4), (2, 2))
        ],
        # Seed A's MNIST family (the seed trained 15 epochs with batch 64).
        _r("qnn_fp", "qnn_fp", "mnist", "seed A full precision, no dropout", {**_SEEDA_FP}, dropout=0.0),
        _r(
            "qnn_fp_d05",
            "qnn_fp",
            "mnist",
            "seed A full precision + dropout 0.5 at inference",
            {**_SEEDA_FP, "epochs": 3},
            dropout=0.5,
            mc_dropout=True,
        ),
        *[
            _r(
                f"qnn_{k}bit_d05",
                "qnn_kbit",
                "mnist",
                f"seed A {k}-bit + dropout 0.5 at inference",
                {**_SEEDA_KBIT},
                bits=k,
                dropout=0.5,
                mc_dropout=True,
            )
            for k in (2, 3, 4, 5)
        ],
        _r(
            "qnn_5bit",
            "qnn_kbit",
            "mnist",
            "seed A 5-bit, no dropout",
            {**_SEEDA_KBIT},
            bits=5,
            dropout=0.0,
        ),
        _r("qnn_bnn", "qnn_bnn", "mnist", "seed A BNN, no dropout", {**_SEEDA}, dropout=0.0),
        _r("qnn_rbnn", "qnn_rbnn", "mnist", "seed A randomized BNN, no dropout", {**_SEEDA}, dropout=0.0),
    ]
}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise QrobustError(f"unknown recipe {name!r}; known: {', '.join(sorted(RECIPES))}")
    return RECIPES[name]


def default_zoo_dir() -> Path:
    """Where :func:`ensure_trained` trains recipes by default (see :func:`qrobust.zoo.cache_dir`)."""
    return zoo.cache_dir()


def matches(ckpt: Path, recipe: Recipe, cfg: dict[str, Any] | None = None) -> bool:
    """Was the checkpoint in ``ckpt`` trained by this recipe's current model and training settings
    (``cfg``: the recipe's training settings with any overrides)?"""
    try:
        info = json.loads((ckpt / CONFIG).read_text())
        trained = vars(TrainConfig(**info["train"]))
        kwargs = info["model"]["kwargs"]
    except (OSError, ValueError, KeyError, TypeError):
        return True  # not a recipe checkpoint we can judge; loading it will report what is wrong
    wanted = {**get_entry(recipe.model).params(), **recipe.model_kwargs}  # as create_model records them
    return trained == vars(TrainConfig(**(recipe.train if cfg is None else cfg))) and kwargs == wanted


def ensure_trained(
    name: str,
    *,
    zoo_dir: str | os.PathLike | None = None,
    data_root: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    overrides: dict[str, Any] | None = None,
) -> Path:
    """Return the checkpoint directory of recipe ``name``, training it first if it is not there yet.

    ``overrides`` changes training settings (e.g. ``{"epochs": 1, "max_train": 2000}`` for a smoke
    run); the checkpoint name then carries a suffix so it never shadows the full recipe.
    """
    recipe = get_recipe(name)
    cfg = {**recipe.train, **(overrides or {})}
    suffix = "" if not overrides else "-" + "-".join(f"{k}{v}" for k, v in sorted(overrides.items()))
    cache = Path(zoo_dir) if zoo_dir is not None else default_zoo_dir()
    out = cache / f"{name}{suffix}"
    if not overrides:  # the pretrained zoo first; it only holds full recipes
        found = zoo.find_recipe(name, [d for d in zoo.search_dirs(cache) if d.resolve() != cache.resolve()])
        if found is not None:
            return found
    if (out / CONFIG).is_file():
        if matches(out, recipe, cfg):
            return out
        # The recipe changed since this checkpoint was trained: keep the old one beside, train anew.
        stamp = time.strftime("%Y%m%d-%H%M%S")
        old = out.with_name(f"{out.name}.superseded-{stamp}")
        n = 1
        while old.exists():
            n += 1
            old = out.with_name(f"{out.name}.superseded-{stamp}-{n}")
        out.rename(old)
    # Say where: a caller in another directory would otherwise retrain silently (set QROBUST_ZOO to reuse).
    log.info("qrobust: training recipe %s into %s (no matching checkpoint there; QROBUST_ZOO or zoo_dir "
             "point at another zoo)", name, out)
    data = load_dataset(recipe.dataset, root=data_root)
    torch.manual_seed(cfg.get("seed", 0))
    model = create_model(recipe.model, **recipe.model_kwargs)
    info = {"dataset": recipe.dataset, "recipe": name, "note": recipe.note}
    if recipe.init_from:  # that recipe is trained first if it is missing
        start = ensure_trained(recipe.init_from, zoo_dir=zoo_dir, data_root=data_root, device=device)
        model.load_state_dict(load_checkpoint(start)[0].state_dict())
        info["init_from"] = recipe.init_from
    if on_epoch is None:
        def on_epoch(r: EpochRecord) -> None:
            log.info("  %s epoch %d: loss %.4f  test acc %.4f  (%.1fs)", name, r.epoch, r.loss,
                     r.test_accuracy, r.seconds)
    train_to_checkpoint(out, model, data, TrainConfig(**cfg), info=info, device=device, progress=progress,
                        on_epoch=on_epoch, overwrite=True)
    if (cache / zoo.SUMS).is_file():  # a zoo with a hash list keeps it current
        zoo.record_sums(cache, out.name)
    return out
