"""Recipe zoo: train once, reuse, and retrain (keeping the old checkpoint) when a recipe changes."""

from __future__ import annotations

import json
import logging

import torch

from qrobust import recipes, zoo
from qrobust.checkpoint import CONFIG, load_checkpoint


def _tiny(**train):
    return recipes.Recipe("tiny", "mnistconv", {"wbits": 2, "abits": 4}, "digits",
                          {"epochs": 1, "batch_size": 64, "max_train": 64, **train})


def test_recipe_trains_once_then_reuses(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(recipes.RECIPES, "tiny", _tiny())
    caplog.set_level(logging.INFO, logger="qrobust")
    out = zoo.ensure_trained("tiny", zoo_dir=tmp_path)
    assert f"training recipe tiny into {out}" in caplog.text  # says where it trains (a log, not a print)
    assert "tiny epoch 1:" in caplog.text  # one line per epoch
    caplog.clear()
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert zoo.ensure_trained("tiny", zoo_dir=tmp_path) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp  # not retrained
    assert "training recipe" not in caplog.text
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # train state cleaned up
    model, cfg = load_checkpoint(out)
    assert cfg["recipe"] == "tiny" and cfg["train"]["max_train"] == 64


def test_changed_recipe_retrains_and_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setitem(recipes.RECIPES, "tiny", _tiny())
    out = zoo.ensure_trained("tiny", zoo_dir=tmp_path)
    old_bytes = (out / "model.safetensors").read_bytes()
    monkeypatch.setitem(recipes.RECIPES, "tiny", _tiny(lr_schedule="cosine"))
    assert zoo.ensure_trained("tiny", zoo_dir=tmp_path) == out
    assert json.loads((out / CONFIG).read_text())["train"]["lr_schedule"] == "cosine"
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("tiny.superseded-")]
    assert len(kept) == 1 and (kept[0] / "model.safetensors").read_bytes() == old_bytes
    # model options are part of the recipe too
    monkeypatch.setitem(recipes.RECIPES, "tiny", recipes.Recipe(
        "tiny", "mnistconv", {"wbits": 4, "abits": 4}, "digits",
        {"epochs": 1, "batch_size": 64, "max_train": 64, "lr_schedule": "cosine"}))
    zoo.ensure_trained("tiny", zoo_dir=tmp_path)
    assert load_checkpoint(out)[1]["model"]["kwargs"]["wbits"] == 4


def test_init_from_starts_from_the_parent_recipes_weights(tmp_path, monkeypatch):
    """Quantization-aware fine-tuning: the parent is trained first and its weights are the child's start."""
    monkeypatch.setitem(recipes.RECIPES, "parent", recipes.Recipe(
        "parent", "mnistconv", {}, "digits", {"epochs": 1, "batch_size": 64, "max_train": 64}))
    monkeypatch.setitem(recipes.RECIPES, "child", recipes.Recipe(
        "child", "mnistconv", {"wbits": 2, "abits": 4}, "digits",
        {"epochs": 1, "batch_size": 64, "max_train": 64}, init_from="parent"))
    starts = {}
    original = zoo.train_to_checkpoint

    def spy(out, model, *args, **kw):
        starts[out.name] = {k: v.clone() for k, v in model.state_dict().items()}
        return original(out, model, *args, **kw)

    monkeypatch.setattr(zoo, "train_to_checkpoint", spy)
    out = zoo.ensure_trained("child", zoo_dir=tmp_path)
    parent, _ = load_checkpoint(tmp_path / "parent")
    assert set(starts) == {"parent", "child"}  # the missing parent was trained first
    assert all(torch.equal(starts["child"][k], v) for k, v in parent.state_dict().items())
    assert json.loads((out / CONFIG).read_text())["init_from"] == "parent"
