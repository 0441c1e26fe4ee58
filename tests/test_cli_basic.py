"""`qrobust train` / `qrobust eval` end to end on tiny runs, --force semantics, and refused inputs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from qrobust.checkpoint import CONFIG, WEIGHTS, load_checkpoint
from qrobust.cli import main
from qrobust.evaluate import accuracy


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of ``qrobust ARGS`` (argparse errors raise SystemExit)."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory, digits) -> Path:
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    np.savez(path, x_train=digits.train.x[:192, 0].numpy(), y_train=digits.train.y[:192].numpy(),
             x_test=digits.test.x[:64, 0].numpy(), y_test=digits.test.y[:64].numpy())
    return path


def _train_args(data, out, *extra):
    return ["train", "--model", "mnistconv", "--wbits", "2", "--abits", "4", "--data", data, "--epochs", "1",
            "--batch-size", "64", "--out", out, "--quiet", "--device", "cpu", *extra]


def test_train_then_eval(tiny_npz, tmp_path, capsys):
    out = tmp_path / "ck"
    code, stdout, err = run_cli(_train_args(tiny_npz, out), capsys)
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["checkpoint"] == str(out) and 0 <= summary["test_accuracy"] <= 1
    assert "epoch   1" in err
    model, cfg = load_checkpoint(out)
    assert cfg["model"]["kwargs"]["wbits"] == 2 and cfg["dataset"] == str(tiny_npz.resolve())
    assert cfg["train"]["epochs"] == 1 and len(cfg["history"]) == 1
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # training state cleaned up

    # eval finds the dataset from the checkpoint and agrees with an independent computation
    code, stdout, err = run_cli(["eval", out, "--device", "cpu"], capsys)
    assert code == 0, err
    res = json.loads(stdout)
    x = torch.from_numpy(np.load(tiny_npz)["x_test"]).float().div(255).unsqueeze(1)
    y = torch.from_numpy(np.load(tiny_npz)["y_test"]).long()
    assert res["samples"] == 64 and res["clean_accuracy"] == pytest.approx(accuracy(model, x, y))
    assert res["ci95"][0] <= res["clean_accuracy"] <= res["ci95"][1]
    assert res["clean_accuracy"] == pytest.approx(summary["test_accuracy"])
    code, stdout, _ = run_cli(["eval", out, "-n", "10", "--data", tiny_npz], capsys)
    assert code == 0 and json.loads(stdout)["samples"] == 10


def test_force_semantics(tiny_npz, tmp_path, capsys):
    out = tmp_path / "ck"
    assert run_cli(_train_args(tiny_npz, out), capsys)[0] == 0
    before = (out / WEIGHTS).read_bytes()
    code, _, err = run_cli(_train_args(tiny_npz, out, "--seed", "1"), capsys)
    assert code == 2 and "already exists" in err and "--force" in err
    assert (out / WEIGHTS).read_bytes() == before  # untouched
    code, _, err = run_cli(_train_args(tiny_npz, out, "--seed", "1", "--force"), capsys)
    assert code == 0, err
    assert (out / WEIGHTS).read_bytes() != before
    assert json.loads((out / CONFIG).read_text())["train"]["seed"] == 1


def _bad_npz(tmp_path, name, **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def test_train_refusals(tiny_npz, tmp_path, capsys, digits):
    (tmp_path / "file").write_text("")
    nan = np.zeros((4, 28, 28), np.float32)
    nan[0, 0, 0] = np.nan
    nan_npz = _bad_npz(tmp_path, "nan.npz", x_train=nan, y_train=np.zeros(4, int), x_test=nan,
                       y_test=np.zeros(4, int))
    nokeys = _bad_npz(tmp_path, "nokeys.npz", images=np.zeros((4, 28, 28), np.uint8))
    labels = _bad_npz(tmp_path, "labels.npz", x_train=np.zeros((4, 28, 28), np.uint8),
                      y_train=np.arange(4) * 5,
                      x_test=np.zeros((2, 28, 28), np.uint8), y_test=np.zeros(2, int))
    out = tmp_path / "out"
    cases = [
        (["--wbits", "0"], "bits must be from 1 to 32"),
        (["--abits", "33"], "bits must be from 1 to 32"),
        (["--model", "resnet50"], "unknown model 'resnet50'"),
        (["--data", tmp_path / "missing.npz"], "does not exist"),
        (["--data", tmp_path / "missing_dir"], "not found"),
        (["--epochs", "-1"], "--epochs must be >= 0"),
        (["--out", tmp_path / "file" / "ck"], "exists but is a file"),
        (["--data", nan_npz], "contains NaN"),
        (["--model", "cifarconv", "--wbits", "32", "--abits", "32"], "has images of shape (1, 28, 28) but "
                                                                     "cifarconv"),
        (["--data", nokeys], "lacks key(s) x_train"),
        (["--data", labels], "labels up to 15"),
        (["--lr", "-1"], "learning rate must be positive"),
        (["--model", "qnn_fp"], "has no option --wbits"),
        (["--dropout", "1.5"], "dropout rate must be in [0, 1)"),
    ]
    for extra, message in cases:
        args = _train_args(tiny_npz, out)
        for i in range(0, len(extra), 2):  # override options already present
            if extra[i] in args:
                args[args.index(extra[i]) + 1] = extra[i + 1]
            else:
                args += extra[i : i + 2]
        code, stdout, err = run_cli(args, capsys)
        assert code == 2, (extra, err)
        assert message in err, (extra, err)
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
        assert not out.exists()


def test_eval_refusals(tiny_npz, tmp_path, capsys):
    out = tmp_path / "ck"
    assert run_cli(_train_args(tiny_npz, out), capsys)[0] == 0
    cfg = json.loads((out / CONFIG).read_text())

    cfg2 = json.loads(json.dumps(cfg))
    cfg2["model"]["kwargs"]["abits"] = 2  # config no longer matches the weights
    (out / CONFIG).write_text(json.dumps(cfg2))
    code, _, err = run_cli(["eval", out], capsys)
    assert code == 2 and "weights were saved for" in err and err.count("\n") == 1

    (out / CONFIG).write_text(json.dumps(cfg))
    blob = bytearray((out / WEIGHTS).read_bytes())
    blob[200] ^= 0x55
    (out / WEIGHTS).write_bytes(bytes(blob))
    code, _, err = run_cli(["eval", out], capsys)
    assert code == 2 and "SHA-256" in err and "corrupt" in err

    code, _, err = run_cli(["eval", tmp_path / "nothing"], capsys)
    assert code == 2 and "does not exist" in err
    code, _, err = run_cli(["eval", out, "-n", "-3"], capsys)
    assert code == 2 and "must be >= 0" in err and err.count("\n") == 1


def test_models_listing(capsys):
    code, stdout, _ = run_cli(["models"], capsys)
    assert code == 0 and "mnistconv" in stdout and "qnn_rbnn" in stdout


@pytest.mark.parametrize("module", ["qrobust", "qrobust.cli"])
def test_python_dash_m_modules(module, monkeypatch, capsys):
    """What ``python -m MODULE --version`` runs, in-process (a subprocess per module costs seconds)."""
    import runpy

    monkeypatch.setattr(sys, "argv", [module, "--version"])
    with pytest.raises(SystemExit) as info:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    assert info.value.code == 0 and capsys.readouterr().out.startswith("qrobust ")


def test_unwritable_output_directory(tiny_npz, tmp_path, capsys, monkeypatch):
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    # root may write anywhere, so simulate a read-only folder at the probe qrobust performs
    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    code, _, err = run_cli(_train_args(tiny_npz, tmp_path / "ro" / "ck"), capsys)
    assert code == 2 and "is not writable (Permission denied)" in err and "--out" in err


def test_progress_bars_only_on_a_terminal(tiny_npz, tmp_path, capsys, monkeypatch):
    """A log or CI gets one line per epoch, not progress-bar redraws."""
    from qrobust.utils import show_progress

    args = [a for a in _train_args(tiny_npz, tmp_path / "ck", "--epochs", "2") if a != "--quiet"]
    args[args.index("--epochs") + 1] = "2"
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    assert "epoch   1" in err and "epoch   2" in err and "\r" not in err and "it/s" not in err
    assert not show_progress(True)
    monkeypatch.setattr(sys, "stderr", type("Tty", (), {"isatty": staticmethod(lambda: True)})())
    assert show_progress(True) and not show_progress(False)
