"""``qrobust empir``: EMPIR's flags on qrobust checkpoints, and the errors users hit."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from qrobust.checkpoint import save_checkpoint
from qrobust.cli import main
from qrobust.cli.empir import parse_attack
from qrobust.data import load_npz
from qrobust.ensemble import Ensemble, vote
from qrobust.evaluate import accuracy


@pytest.fixture(scope="module")
def empir_zoo(tmp_path_factory, trained_mnistconv, trained_mnistconv_a4w2):
    """Three checkpoints (a4w2, a4w2, FP) saved as if trained on MNIST."""
    root = tmp_path_factory.mktemp("zoo")
    paths = {}
    members = (("m1", trained_mnistconv_a4w2), ("m2", trained_mnistconv_a4w2), ("fp", trained_mnistconv))
    for name, model in members:
        paths[name] = save_checkpoint(root / name, model, {"dataset": "mnist"})
    return paths


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _ensemble_args(zoo, data_dir) -> list[str]:
    return ["empir", "mnist", "--ensembleThree", "--model_path1", str(zoo["m1"]),
            "--model_path2", str(zoo["m2"]), "--model_path3", str(zoo["fp"]),
            "--wbits", "2", "--abits", "4", "--wbits2", "2", "--abits2", "4",
            "--data_dir", str(data_dir), "--device", "cpu"]


def test_attack_codes_follow_empir():
    assert [parse_attack(str(i)) for i in range(5)] == ["cw", "jsma", "fgsm", "pgd", "bim"]
    assert parse_attack("MadryEtAl") == "pgd" and parse_attack("CW-L2") == "cw"
    assert parse_attack("FGM") == "fgsm" and parse_attack("BasicIterativeMethod") == "bim"
    assert parse_attack("SaliencyMapMethod") == "jsma" and parse_attack("carlini_wagner_l2") == "cw"
    for bad in ("7", "fgsm_random", "eot_pgd"):  # EMPIR's five attacks only
        with pytest.raises(argparse.ArgumentTypeError, match="unknown attack"):
            parse_attack(bad)


def test_ensemble_fgsm_legacy_and_adaptive(capsys, empir_zoo, mnist_npz, trained_mnistconv,
                                           trained_mnistconv_a4w2):
    args = _ensemble_args(empir_zoo, mnist_npz.parent) + ["--attack", "2", "--nb_samples", "40", "--json"]
    code, out, err = _run(capsys, *args)
    assert code == 0, err
    legacy = json.loads(out)
    assert legacy["system"] == "ensemble" and legacy["target"] == "legacy" and legacy["n"] == 40
    assert legacy["attack"] == "fgsm" and legacy["params"]["loss"] == "ce_prob"
    # clean accuracy is the EMPIR vote's, computed independently here
    x, y = load_npz(mnist_npz).test.head(40).tensors()
    with torch.no_grad():
        preds = torch.stack([m(x).argmax(1) for m in (trained_mnistconv_a4w2, trained_mnistconv_a4w2,
                                                       trained_mnistconv)])
    expected = (vote(preds, 2, num_classes=10) == y).float().mean().item()
    assert legacy["clean_accuracy"] == pytest.approx(expected)
    assert abs(legacy["mean_linf_all"] - 0.3) < 1e-5  # FGSM moves (almost) every pixel by eps
    code, out, err = _run(capsys, *args, "--target", "adaptive")
    assert code == 0, err
    adaptive = json.loads(out)
    assert adaptive["params"]["loss"] == "ce" and "adaptive" in adaptive["description"]


def test_single_model_prints_empir_lines(capsys, empir_zoo, mnist_npz, trained_mnistconv):
    code, out, err = _run(capsys, "empir", "mnist", "--model_path", str(empir_zoo["fp"]), "--attack", "4",
                          "--nb_iter", "5", "--nb_samples", "20", "--data_dir", str(mnist_npz.parent))
    assert code == 0, err
    assert "Test accuracy on legitimate test examples" in out and "Avg. L_2 norm" in out
    x, y = load_npz(mnist_npz).test.head(20).tensors()
    clean = float(out.split("legitimate test examples: ")[1].split()[0])
    assert clean == pytest.approx(accuracy(trained_mnistconv, x, y), abs=1e-4)


def test_legacy_bim_equals_bim_on_the_fp_member_with_vote_labels(empir_zoo, mnist_npz):
    from qrobust.attacks import BIM
    from qrobust.ensemble import ensemble_attack

    ens = Ensemble.from_checkpoints([empir_zoo["m1"], empir_zoo["m2"], empir_zoo["fp"]])
    x, _ = load_npz(mnist_npz).test.head(16).tensors()
    adv = ensemble_attack(ens, "bim", "legacy", eps=0.3, alpha=0.01, steps=5)(ens, x)
    ref = BIM(eps=0.3, alpha=0.01, steps=5, loss="ce")(ens.members[2], x, ens.predict(x))
    assert torch.equal(adv, ref)


@pytest.mark.parametrize("extra, message", [
    (["--wbits", "3"], "--wbits 3 does not match"),
    (["--nb_epochs", "3"], "training flag"),
    (["--targeted"], "not supported"),
])
def test_user_errors(capsys, empir_zoo, mnist_npz, extra, message):
    args = _ensemble_args(empir_zoo, mnist_npz.parent)
    if extra[0] == "--wbits":
        i = args.index("--wbits")
        args = args[:i] + args[i + 2 :]
    code, _, err = _run(capsys, *args, *extra)
    assert code == 2 and message in err


def test_missing_members_is_an_error(capsys, empir_zoo):
    code, _, err = _run(capsys, "empir", "mnist", "--ensembleThree", "--model_path1", str(empir_zoo["m1"]))
    assert code == 2 and "--model_path2, --model_path3" in err
    code, _, err = _run(capsys, "empir", "mnist", "--model_path", str(empir_zoo["m1"]) + "-nope")
    assert code == 2 and "no such checkpoint" in err
