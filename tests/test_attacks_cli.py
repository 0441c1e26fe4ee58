"""``qrobust attack`` and ``qrobust train --adv`` end to end on the embedded digits."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qrobust.cli import main


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("ck") / "fgsm_trained"
    rc = main(["train", "--model", "mnistconv", "--data", "digits", "--epochs", "1", "--max-train", "600",
               "--max-test", "50", "--adv", "fgsm", "--adv-eps", "0.1", "--out", str(out), "--quiet"])
    assert rc == 0
    return out


def test_train_records_adversarial_training(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    record = config["adversarial_training"]
    assert record["kind"] == "fgsm" and record["eps"] == 0.1


def test_attack_cli_outputs(checkpoint, tmp_path, capsys):
    out_json, out_npz = tmp_path / "r.json", tmp_path / "adv.npz"
    rc = main(["attack", str(checkpoint), "--attack", "bim", "--eps", "0.2", "--alpha", "0.05",
               "--steps", "5", "-n", "40", "--json-out", str(out_json), "--save-adv", str(out_npz),
               "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "adversarial accuracy" in printed and "success rate" in printed
    record = json.loads(out_json.read_text())
    assert record["n"] == 40 and record["params"]["attack"] == "bim" and record["params"]["eps"] == 0.2
    assert record["labels"] == "pred"
    assert 0 <= record["adversarial_accuracy"] <= record["clean_accuracy"] + 0.1
    with np.load(out_npz) as z:
        assert z["x_adv"].shape == (40, 1, 28, 28)
        assert z["x_adv"].min() >= 0 and z["x_adv"].max() <= 1
        assert np.abs(z["x_adv"] - z["x"]).max() <= 0.2 + 1e-6


@pytest.mark.parametrize("argv, message", [
    (["--attack", "pgd", "--theta", "1"], "--theta does not apply"),
    (["--attack", "fgsm", "--cw-c", "1"], "--cw-c does not apply"),
    (["--attack", "pgd", "--eps", "-1"], "eps"),
    (["--attack", "jsma", "--gamma", "2"], "gamma"),
    (["--attack", "fgsm", "--target", "12"], "not a class"),
])
def test_attack_cli_errors(checkpoint, capsys, argv, message):
    assert main(["attack", str(checkpoint), "-n", "5", "--quiet", *argv]) == 2
    assert message in capsys.readouterr().err


def test_attack_cli_targeted_and_jsma(checkpoint, tmp_path):
    import torch

    from qrobust.checkpoint import load_checkpoint
    from qrobust.evaluate import predict

    out_json, out_npz = tmp_path / "t.json", tmp_path / "t.npz"
    assert main(["attack", str(checkpoint), "--attack", "jsma", "--gamma", "0.05", "--target", "3",
                 "-n", "10", "--json-out", str(out_json), "--save-adv", str(out_npz), "--quiet"]) == 0
    record = json.loads(out_json.read_text())
    assert record["params"]["targeted"] is True
    with np.load(out_npz) as z:
        x, x_adv = torch.from_numpy(z["x"]), torch.from_numpy(z["x_adv"])
        assert (z["targets"] == 3).all()
    # recompute the record from the saved images: success = clean prediction != 3 and adversarial one == 3
    model, _ = load_checkpoint(checkpoint)
    pred, pred_adv = predict(model, x), predict(model, x_adv)
    success = (pred != 3) & (pred_adv == 3)
    assert record["success_rate"] == pytest.approx(success.sum().item() / (pred != 3).sum().item())
    d = (x_adv - x).flatten(1)
    assert success.any()
    assert record["mean_linf"] == pytest.approx(d.abs().amax(1)[success].mean().item(), abs=1e-6)
    l0 = (d.abs() > 0.5 / 255).sum(1)  # changes under half a grey level do not count
    assert record["mean_l0"] == pytest.approx(l0[success].float().mean().item())
    # JSMA theta 1 sets the pixels it changes to 1, at most 2 * floor(784 * 0.05 / 2) = 38 of them per image
    changed = d.abs() > 0
    assert (x_adv.flatten(1)[changed] == 1).all() and changed.sum(1).max() <= 38


def test_train_cli_madry_weight_and_cosine_are_recorded(tmp_path, capsys):
    out = tmp_path / "madry"
    rc = main(["train", "--model", "mnistconv", "--data", "digits", "--epochs", "1", "--max-train", "128",
               "--max-test", "20", "--adv", "pgd", "--adv-steps", "2", "--adv-alpha", "0.1",
               "--adv-weight", "1", "--lr-schedule", "cosine", "--out", str(out), "--quiet"])
    assert rc == 0
    train_cfg = json.loads((out / "config.json").read_text())["train"]
    assert train_cfg["adv_weight"] == 1.0 and train_cfg["lr_schedule"] == "cosine"
    rc = main(["train", "--model", "mnistconv", "--data", "digits", "--epochs", "1", "--adv", "pgd",
               "--adv-weight", "2", "--out", str(tmp_path / "bad"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "adversarial loss weight must be in (0, 1]" in err
    assert not (tmp_path / "bad").exists()


def test_train_cli_fgsm_rs_with_biases_cyclic_and_guard(tmp_path, capsys):
    """Wong et al.'s recipe from the command line: --adv fgsm-rs, --lr-schedule cyclic, --co-guard, and the
    full-precision biases of mnistconv(bias=True); the checkpoint records all of it and reloads with them."""
    from qrobust.checkpoint import load_checkpoint

    out = tmp_path / "wong"
    rc = main(["train", "--model", "mnistconv", "--wbits", "2", "--abits", "4", "--bias", "--data", "digits",
               "--epochs", "1", "--max-train", "160", "--max-test", "20", "--batch-size", "32",
               "--adv", "fgsm-rs", "--co-guard", "--co-guard-samples", "32", "--lr-schedule", "cyclic",
               "--out", str(out), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    cfg = json.loads((out / "config.json").read_text())
    train_cfg = cfg["train"]
    assert (train_cfg["adv_method"], train_cfg["lr_schedule"], train_cfg["co_guard"]) == ("fgsm_rs", "cyclic",
                                                                                           True)
    assert train_cfg["adv_weight"] == 1.0  # Wong et al.'s loss on adversarial inputs only
    model, _ = load_checkpoint(out)
    assert model.features[0].bias is not None and model.classifier.bias is not None
    rc = main(["train", "--model", "qnn_bnn", "--bias", "--data", "digits", "--epochs", "1",
               "--out", str(tmp_path / "bad"), "--quiet"])
    assert rc != 0 and "has no option --bias" in capsys.readouterr().err
