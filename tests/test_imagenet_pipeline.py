"""The ImageNet EMPIR pipeline end to end on a generated ImageFolder tree (3 classes, reduced resolution).

configs/empir_imagenet.toml is run as shipped, with overrides only for the data (a tiny tree at 64 px with
the reduced-resolution ``alexnet_small`` members) and the budget (1 epoch, few attack steps): train, attack,
report in one process, then the same under ``torchrun --nproc_per_node 2`` (gloo), image by image equal.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from qrobust.data import load_dataset
from qrobust.experiment import ResultStore, load_config, run_experiment
from test_distributed import _torchrun  # tests/ is on sys.path (pytest's default import mode)

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "empir_imagenet.toml"
CLASSES = ("n01440764", "n01443537", "n01484850")  # ImageNet wnids: the folders' names only


def make_tree(root: Path, train: int = 6, val: int = 4, side: int = 80) -> Path:
    """train/<wnid>/*.png and val/<wnid>/*.png: each class a colour plus noise, so it is learnable."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for part, count in (("train", train), ("val", val)):
        for c, wnid in enumerate(CLASSES):
            folder = root / part / wnid
            folder.mkdir(parents=True)
            for i in range(count):
                base = np.zeros((side, side + 8, 3))  # not square: the resize + centre crop matter
                base[..., c] = 160
                img = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f"{wnid}_{i}.png")
    return root


def overrides(tree: Path) -> list[str]:
    small = [f"models.{i}.arch=alexnet_small" for i in range(3)]
    budget = ["samples=8", "batch_size=4", 'ensembles.0.targets=["adaptive"]', "train.epochs=1",
              "train.batch_size=6", "attacks.0.steps=3", "attacks.2.steps=2", "attacks.3.steps=2",
              "attacks.1.eps=0.05", "attacks.2.eps=0.05", "attacks.3.eps=0.05"]
    return [f"datasets.imagenet.source={tree}", "datasets.imagenet.image_size=64", *small, *budget]


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return make_tree(tmp_path_factory.mktemp("imagenet"))


def test_image_folder_follows_the_seed_preprocessing(tree):
    data = load_dataset(str(tree), image_size=64)
    assert data.train.x.shape == (18, 3, 64, 64) and data.test.x.shape == (12, 3, 64, 64)
    assert data.train.y.tolist() == [0] * 6 + [1] * 6 + [2] * 6
    x, _ = data.test.tensors()
    # class c's colour channel dominates after resize and crop
    assert (x.mean((2, 3)).argmax(1) == data.test.y).all()
    with pytest.raises(Exception, match="ImageFolder trees only"):
        load_dataset("digits", image_size=64)


def test_empir_imagenet_config_trains_attacks_and_reports(tree, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = load_config(CONFIG, overrides(tree), output=str(tmp_path / "one"))
        summary = run_experiment(cfg, progress=False)
    finally:
        torch.set_num_threads(threads)
    # fp and the ensemble (one threat model, for time): clean + 4 attacks; 3 members trained
    assert (summary.total, summary.computed, summary.models_trained) == (2 + 4 + 4, 10, 3)
    assert summary.report is not None and Path(summary.report.index).is_file()
    recs = {(r["row"], r["attack"]): r for r in summary.records}
    assert recs[("AlexNet", "clean")]["n"] == 8
    assert all(len(r["correct_mask"]) == 8 for r in summary.records if r["kind"] == "attack")

    # the same under torchrun, 2 CPU processes: rank 0 trains, every rank attacks its batches
    sets = [a for o in overrides(tree) for a in ("--set", o)]
    proc = _torchrun(["-m", "qrobust", "run", str(CONFIG), *sets, "--out", str(tmp_path / "two"), "--quiet"],
                     tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["computed"] == 10
    with ResultStore(tmp_path / "two" / "store.sqlite") as store:
        two = {r["key"]: r for r in store.results()}
    assert set(two) == {r["key"] for r in summary.records}  # same trained weights, same keys
    for r in summary.records:
        assert (two[r["key"]]["accuracy"], two[r["key"]].get("correct_mask")) == (
            r["accuracy"], r.get("correct_mask")), (r["row"], r["attack"])


def test_cli_train_and_attack_read_the_tree_at_the_model_size(tree, tmp_path, capsys):
    from qrobust.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", "--model", "alexnet_small", "--wbits", "2", "--abits", "2", "--data", str(tree),
                     "--epochs", "1", "--batch-size", "6", "--out", str(tmp_path / "ck"), "--quiet"]) == 0
        capsys.readouterr()
        assert main(["attack", str(tmp_path / "ck"), "--attack", "fgsm", "--eps", "0.05", "--data", str(tree),
                     "--batch-size", "4", "--json", "--quiet"]) == 0
    finally:
        torch.set_num_threads(threads)
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["n"] == record["n_attacked"] == 12  # the 12 val images at 64 px, all attacked (labels pred)
    assert 0 < record["mean_linf_all"] <= 0.05 + 1e-6
