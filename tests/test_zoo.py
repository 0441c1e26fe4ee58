"""The one checkpoint resolver (qrobust.zoo): pretrained zoo first, hashes verified, training on request."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from qrobust import recipes, zoo
from qrobust.checkpoint import CONFIG, WEIGHTS, load_checkpoint
from qrobust.cli import main
from qrobust.errors import QrobustError
from qrobust.zoo import create_model


def _tiny(**train):
    return recipes.Recipe("tiny", "mnistconv", {"wbits": 2, "abits": 4}, "digits",
                          {"epochs": 1, "batch_size": 64, "max_train": 64, **train})


@pytest.fixture
def zoos(tmp_path, monkeypatch):
    """A pretrained zoo holding recipe 'tiny' with its SHA256SUMS, and an empty training cache."""
    monkeypatch.setitem(recipes.RECIPES, "tiny", _tiny())
    pre, cache = tmp_path / "zoo", tmp_path / "cache"
    out = zoo.ensure_trained("tiny", zoo_dir=pre)
    zoo.record_sums(pre, "tiny")
    monkeypatch.setenv(zoo.ENV, str(pre))
    monkeypatch.chdir(tmp_path)  # the default cache (artifacts/zoo) is then inside tmp_path
    return pre, cache, out


def test_sums_file_is_sha256sum_compatible(zoos):
    import hashlib

    pre, _, out = zoos
    lines = (pre / zoo.SUMS).read_text().splitlines()
    want = {f"{hashlib.sha256((out / f).read_bytes()).hexdigest()}  tiny/{f}" for f in (WEIGHTS, CONFIG)}
    assert set(lines) == want


def test_every_spelling_resolves_to_the_pretrained_checkpoint(zoos):
    pre, cache, out = zoos
    assert zoo.search_dirs(cache) == [pre, cache]
    assert zoo.resolve_checkpoint("zoo:tiny") == out
    assert zoo.resolve_checkpoint("tiny", zoo_dir=cache) == out
    assert zoo.resolve_checkpoint(str(out)) == out  # a folder is itself
    # ensure_trained finds it too instead of training into its cache
    assert zoo.ensure_trained("tiny", zoo_dir=cache) == out and not cache.exists()
    model = create_model("tiny", pretrained=True)
    ref, _ = load_checkpoint(out)
    x = torch.rand(3, 1, 28, 28)
    assert not model.training and torch.equal(model(x), ref(x))
    assert torch.equal(create_model("zoo:tiny", pretrained=True, wbits=2)(x), ref(x))
    with pytest.raises(QrobustError, match="wbits=4"):
        create_model("tiny", pretrained=True, wbits=4)
    with pytest.raises(QrobustError, match="pretrained models are named by recipe"):
        create_model("mnistconv", pretrained=True)


@pytest.mark.parametrize("victim", [WEIGHTS, CONFIG])
def test_tampered_file_is_refused(zoos, victim):
    pre, _, out = zoos
    path = out / victim
    blob = bytearray(path.read_bytes())
    blob[-2] ^= 0x01  # one bit; config.json stays valid JSON (its last chars are '}\n')
    path.write_bytes(bytes(blob))
    for call in (lambda: zoo.resolve_checkpoint("zoo:tiny"), lambda: create_model("tiny", pretrained=True),
                 lambda: zoo.ensure_trained("tiny", zoo_dir=pre.parent / "cache")):
        with pytest.raises(QrobustError, match=f"tiny/{victim} does not match its SHA-256"):
            call()


def test_missing_recipe_is_an_error_unless_training_is_asked_for(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(recipes.RECIPES, "tiny", _tiny())
    monkeypatch.setenv(zoo.ENV, str(tmp_path / "empty"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(QrobustError, match=r"not trained yet.*train_zoo.py --only tiny.*--train-missing"):
        zoo.resolve_checkpoint("zoo:tiny")
    with pytest.raises(QrobustError, match="unknown recipe 'nope'"):
        zoo.resolve_checkpoint("zoo:nope")
    with pytest.raises(QrobustError, match="does not exist: no such checkpoint directory"):
        zoo.resolve_checkpoint(str(tmp_path / "nothing"))
    assert main(["eval", "zoo:tiny", "-n", "5"]) == 2
    assert "--train-missing" in capsys.readouterr().err
    # asked: trains into the cache ($QROBUST_ZOO when set), then the CLI evaluates it
    assert main(["eval", "zoo:tiny", "-n", "20", "--train-missing", "--device", "cpu"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["samples"] == 20 and (tmp_path / "empty" / "tiny" / CONFIG).is_file()


def test_stale_pretrained_checkpoint_is_skipped(zoos, monkeypatch, caplog):
    """A zoo trained with other settings than today's recipe is not silently used."""
    monkeypatch.setitem(recipes.RECIPES, "tiny", _tiny(lr_schedule="cosine"))
    with caplog.at_level(logging.WARNING, logger="qrobust"), pytest.raises(QrobustError, match="not trained"):
        zoo.resolve_checkpoint("zoo:tiny")
    assert "other settings" in caplog.text


def test_training_into_a_zoo_with_sums_keeps_them_current(zoos, monkeypatch):
    pre, _, out = zoos
    monkeypatch.setitem(recipes.RECIPES, "tiny2", _tiny(seed=1))
    other = zoo.ensure_trained("tiny2", zoo_dir=pre)
    sums = zoo.read_sums(pre)
    assert {"tiny/model.safetensors", "tiny2/model.safetensors", "tiny2/config.json"} <= set(sums)
    assert zoo.resolve_checkpoint("zoo:tiny2") == other


def test_experiment_checkpoint_accepts_zoo_names(zoos, tmp_path):
    from qrobust.experiment import Runner, load_config

    cfg_path = tmp_path / "e.toml"
    cfg_path.write_text('name = "z"\nsamples = 20\n[[models]]\nname = "a"\ncheckpoint = "zoo:tiny"\n'
                        '[[attacks]]\nname = "fgsm"\neps = [0.1]\n')
    summary = Runner(load_config(cfg_path, output=str(tmp_path / "run")), progress=False, report=False).run()
    assert summary.computed == 2 and summary.models_trained == 0
    bad = tmp_path / "bad.toml"
    bad.write_text(cfg_path.read_text().replace("zoo:tiny", "zoo:nope"))
    with pytest.raises(QrobustError, match=r"models\[0\].checkpoint: unknown recipe 'nope'"):
        load_config(bad)


def _committed() -> list[str]:
    from pathlib import Path

    repo_zoo = Path(__file__).resolve().parents[1] / "zoo"
    return sorted(p.parent.name for p in repo_zoo.glob(f"*/{CONFIG}"))


@pytest.mark.parametrize("name", _committed())
def test_committed_zoo_member_loads_offline_and_scores_what_it_recorded(name, monkeypatch):
    """Each checkpoint committed in zoo/ is listed with matching hashes, was trained by its recipe's CURRENT
    settings (else the resolver would skip it), and scores on the full official test set what its
    config.json recorded at the end of training (an independent recomputation, eval-mode forward)."""
    from conftest import SHARED_DATA
    from qrobust.data import load_dataset
    from qrobust.evaluate import accuracy

    monkeypatch.delenv(zoo.ENV, raising=False)
    pre = zoo.pretrained_dir()
    assert {f"{name}/{CONFIG}", f"{name}/{WEIGHTS}"} <= set(zoo.read_sums(pre) or {})
    assert zoo.find_recipe(name, [pre]) == pre / name, f"zoo/{name} no longer matches recipe {name}"
    model = create_model(name, pretrained=True)
    recorded = json.loads((pre / name / CONFIG).read_text())
    dataset = recipes.get_recipe(name).dataset
    if not (SHARED_DATA / f"{dataset}.npz").is_file():
        pytest.skip(f"{SHARED_DATA}/{dataset}.npz not available")
    x, y = load_dataset(dataset, root=SHARED_DATA).test.tensors()
    with torch.no_grad():
        acc = accuracy(model, x, y)
    assert acc == pytest.approx(recorded["test_accuracy"], abs=6e-4)  # at most 6 of 10,000 images differ


def test_recipe_match_ignores_options_added_later_at_their_default(tmp_path):
    """A checkpoint written before a model family gained an option (recorded kwargs lack it) still matches
    its recipe while the recipe keeps the default; a changed value or training setting does not."""
    import json

    from qrobust.checkpoint import CONFIG
    from qrobust.models.registry import get_entry
    from qrobust.recipes import get_recipe, matches

    recipe = get_recipe("mnistconv_fp")
    kwargs = {**get_entry("mnistconv").params(), **recipe.model_kwargs}
    old_kwargs = {k: v for k, v in kwargs.items() if k != "bias"}

    def write(kw: dict, train: dict) -> None:
        info = {"model": {"name": "mnistconv", "kwargs": kw}, "train": train}
        (tmp_path / CONFIG).write_text(json.dumps(info))

    write(old_kwargs, recipe.train)
    assert matches(tmp_path, recipe)
    write({**old_kwargs, "bias": True}, recipe.train)
    assert not matches(tmp_path, recipe)
    write(old_kwargs, {**recipe.train, "epochs": recipe.train["epochs"] + 1})
    assert not matches(tmp_path, recipe)
