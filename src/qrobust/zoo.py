"""The one resolver for "a checkpoint folder, a recipe name or ``zoo:<recipe>``", offline.

Pretrained recipe checkpoints live in the repository's ``zoo/<recipe>/`` (``model.safetensors`` +
``config.json``) next to a ``zoo/SHA256SUMS`` list; nothing is ever downloaded. A recipe is looked up
in this order:

1. the pretrained zoo: ``$QROBUST_ZOO`` if set, else ``zoo/`` of the source tree qrobust runs from
   (an editable install);
2. the training cache (``artifacts/zoo`` in the working directory, or the experiment's ``zoo``), where
   :func:`ensure_trained` trains recipes.

A zoo that has a ``SHA256SUMS`` file must list the recipe's files with matching hashes (a tampered
file is refused); without one, the weight hash in ``config.json`` is what :func:`load_checkpoint`
checks. A checkpoint trained with other settings than the current recipe is skipped. Training
happens only when asked (``train_missing=True`` / ``--train-missing``); otherwise a missing recipe is
an error saying how to get it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qrobust import models
from qrobust.checkpoint import CONFIG, WEIGHTS, load_checkpoint
from qrobust.data import load_dataset
from qrobust.errors import QrobustError
from qrobust.recipes import RECIPES, get_recipe, matches
from qrobust.train import train_to_checkpoint
from qrobust.train_config import EpochRecord, TrainConfig
from qrobust.utils import atomic_write_text

log = logging.getLogger(__name__)

PREFIX = "zoo:"
SUMS = "SHA256SUMS"
ENV = "QROBUST_ZOO"


def pretrained_dir() -> Path | None:
    """``$QROBUST_ZOO``, else the ``zoo/`` folder of the source tree (None for an installed wheel)."""
    env = os.environ.get(ENV)
    if env:
        return Path(env)
    root = Path(__file__).resolve().parents[2]  # src/qrobust/zoo.py -> repository
    return root / "zoo" if (root / "pyproject.toml").is_file() else None


def cache_dir() -> Path:
    """Where recipes are trained on demand: ``$QROBUST_ZOO`` if set (one shared zoo), else
    ``artifacts/zoo`` in the working directory."""
    env = os.environ.get(ENV)
    return Path(env) if env else Path.cwd() / "artifacts" / "zoo"


def search_dirs(cache: str | os.PathLike | None = None) -> list[Path]:
    """The zoo folders searched for a recipe, in order (pretrained first, then the training cache)."""
    dirs = [pretrained_dir(), Path(cache) if cache is not None else cache_dir()]
    out: list[Path] = []
    for d in dirs:
        if d is not None and all(d.resolve() != o.resolve() for o in out):
            out.append(d)
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_sums(zoo: str | os.PathLike) -> dict[str, str] | None:
    """``{relative path: sha256}`` from ``zoo/SHA256SUMS`` (``sha256sum`` format), None if absent."""
    path = Path(zoo) / SUMS
    if not path.is_file():
        return None
    sums = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        digest, _, name = line.partition(" ")
        name = name.strip().lstrip("*")
        if len(digest) != 64 or not name:
            raise QrobustError(f"{path}:{n}: expected '<sha256>  <recipe>/<file>', got {line!r}; restore the "
                               f"file or rewrite it with qrobust.zoo.record_sums")
        sums[name] = digest.lower()
    return sums


def record_sums(zoo: str | os.PathLike, *names: str) -> Path:
    """Record the hashes of checkpoint folders ``names`` in ``zoo/SHA256SUMS`` (created if missing),
    keeping the other entries: run it after training recipes into a zoo that is shared or committed."""
    zoo = Path(zoo)
    sums = read_sums(zoo) or {}
    for name in names:
        for fname in (WEIGHTS, CONFIG):
            path = zoo / name / fname
            if not path.is_file():
                raise QrobustError(f"{path} does not exist; train recipe {name} into {zoo} first")
            sums[f"{name}/{fname}"] = _sha256(path)
    atomic_write_text(zoo / SUMS, "".join(f"{d}  {k}\n" for k, d in sorted(sums.items())))
    return zoo / SUMS


def verify(zoo: str | os.PathLike, name: str) -> None:
    """Refuse ``zoo/name`` if ``zoo/SHA256SUMS`` lists its files with other hashes (tampered or corrupt)."""
    zoo = Path(zoo)
    sums = read_sums(zoo)
    if sums is None:
        return
    listed = [f for f in (WEIGHTS, CONFIG) if f"{name}/{f}" in sums]
    if not listed:
        log.warning("%s is not listed in %s; only the weight hash in its %s is checked",
                    zoo / name, zoo / SUMS, CONFIG)
        return
    for fname in (WEIGHTS, CONFIG):
        rel = f"{name}/{fname}"
        path = zoo / rel
        if rel not in sums or not path.is_file() or _sha256(path) != sums[rel]:
            raise QrobustError(
                f"{path} does not match its SHA-256 in {zoo / SUMS}: the file is missing, corrupt or was "
                f"replaced. Restore it (e.g. `git checkout -- {zoo.name}/{name}`) or retrain it with "
                f"`python scripts/train_zoo.py --only {name}`"
            )


def find_recipe(name: str, dirs: list[Path]) -> Path | None:
    """The first verified checkpoint of recipe ``name`` (trained with its current settings) in ``dirs``."""
    recipe = get_recipe(name)
    for zoo in dirs:
        path = zoo / name
        if not (path / CONFIG).is_file():
            continue
        verify(zoo, name)
        if not matches(path, recipe):
            log.warning("%s was trained with other settings than recipe %s now has; ignoring it", path, name)
            continue
        return path
    return None


def resolve_checkpoint(
    text: str | os.PathLike,
    *,
    flag: str | None = None,
    hint: str = "",
    train_missing: bool = False,
    zoo_dir: str | os.PathLike | None = None,
    data_root: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> Path:
    """The checkpoint folder named by ``text``: a folder, ``zoo:<recipe>`` or a bare recipe name.

    ``flag`` prefixes error messages (e.g. ``--model_path``); ``hint`` ends the not-found message.
    ``zoo_dir`` replaces the training cache (searched after the pretrained zoo, trained into).
    """
    text = str(text)
    where = f"{flag} {text}: " if flag else ""
    if text.startswith(PREFIX):
        name = text[len(PREFIX):]
        try:
            get_recipe(name)
        except QrobustError as exc:
            raise QrobustError(f"{where}{exc}") from exc
    elif Path(text).is_dir():
        return Path(text)
    elif text in RECIPES:
        name = text
    else:
        raise QrobustError(
            f"{where}checkpoint {text} does not exist: no such checkpoint directory, and not a recipe name "
            f"or zoo:<recipe>{'; ' + hint if hint else ''}"
        )
    dirs = search_dirs(zoo_dir)
    found = find_recipe(name, dirs)
    if found is not None:
        return found
    if train_missing:
        return ensure_trained(name, zoo_dir=zoo_dir, data_root=data_root, device=device, progress=progress)
    raise QrobustError(
        f"{where}recipe {name!r} is not trained yet (searched {', '.join(str(d) for d in dirs)}); train it "
        f"with `python scripts/train_zoo.py --only {name}`, pass --train-missing (Python: "
        f"train_missing=True), or set {ENV} to a zoo that has it"
    )


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
    cache = Path(zoo_dir) if zoo_dir is not None else cache_dir()
    out = cache / f"{name}{suffix}"
    if not overrides:  # the pretrained zoo first; it only holds full recipes
        found = find_recipe(name, [d for d in search_dirs(cache) if d.resolve() != cache.resolve()])
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
    model = models.create_model(recipe.model, **recipe.model_kwargs)
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
    if (cache / SUMS).is_file():  # a zoo with a hash list keeps it current
        record_sums(cache, out.name)
    return out


def create_model(name: str, *, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Build a registered model (:func:`qrobust.models.create_model`), or with ``pretrained=True`` recipe
    ``name`` (or ``zoo:<recipe>``) with its trained weights from the zoo, verified, offline."""
    return load_pretrained(name, **kwargs) if pretrained else models.create_model(name, **kwargs)


def load_pretrained(name: str, device: torch.device | str = "cpu", *, train_missing: bool = False,
                    **kwargs: Any) -> nn.Module:
    """Recipe ``name``'s trained model from the zoo, in eval mode (``create_model(name, pretrained=True)``).

    ``kwargs`` are model options; they must agree with the recipe's (a pretrained model is fixed).
    """
    name = name[len(PREFIX):] if name.startswith(PREFIX) else name
    if name not in RECIPES:
        raise QrobustError(f"no pretrained weights for {name!r}: pretrained models are named by recipe, one "
                           f"of {', '.join(sorted(RECIPES))}; or build it untrained with pretrained=False")
    recipe = RECIPES[name]
    wanted = {**models.get_entry(recipe.model).params(), **recipe.model_kwargs}
    differ = sorted(k for k, v in kwargs.items() if wanted.get(k, object()) != v)
    if differ:
        raise QrobustError(f"recipe {name} is {recipe.model} with {recipe.model_kwargs}; option(s) "
                           f"{', '.join(f'{k}={kwargs[k]!r}' for k in differ)} differ. Drop them, or train "
                           "such a model (pretrained=False)")
    path = resolve_checkpoint(PREFIX + name, train_missing=train_missing, device=device)
    model, _ = load_checkpoint(path, device)
    return model
