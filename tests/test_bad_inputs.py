"""Hostile but realistic inputs to every command: a table of input -> exit code, message, nothing changed.

The table (:func:`cases`) is the source of truth: ``scripts/bad_inputs.py`` runs the same cases as
real subprocesses and writes ``docs/bad_inputs.md``. Each case must exit with the listed code, print
exactly one line starting with ``error:`` (no traceback), match the message, and leave every file in
the workspace byte-identical. Cases that need more than a command line (a held lock, a full disk, an
interrupted training) are the test functions below the table.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from qrobust.checkpoint import CONFIG, WEIGHTS, load_checkpoint, save_checkpoint
from qrobust.cli import main
from qrobust.errors import QrobustError


@dataclass
class Case:
    klass: str  # the class of bad input (docs/bad_inputs.md groups by it)
    what: str
    argv: list[str]
    pattern: str  # regex the one-line message must match
    code: int = 2  # 2 = refused input or resource, 1 = an OS error no check foresaw
    keep: list[str] = field(default_factory=list)  # extra paths that must stay untouched (outside ws)


def _npz(path: Path, x: np.ndarray, y: np.ndarray, xt: np.ndarray, yt: np.ndarray) -> Path:
    np.savez(path, x_train=x, y_train=y, x_test=xt, y_test=yt)
    return path


def _edit_config(ck: Path, fn: Callable[[dict], None]) -> None:
    cfg = json.loads((ck / CONFIG).read_text())
    fn(cfg)
    (ck / CONFIG).write_text(json.dumps(cfg))


def build_workspace(ws: Path) -> dict[str, Path]:
    """Tiny data (64 training, 32 test digits) and good and broken variants, two tiny checkpoints."""
    from qrobust.data import load_dataset

    d = load_dataset("digits")
    x, y = d.train.x[:64, 0].numpy(), d.train.y[:64].numpy()
    xt, yt = d.test.x[:32, 0].numpy(), d.test.y[:32].numpy()
    p = {"ws": ws, "a": _npz(ws / "a.npz", x, y, xt, yt),
         "b": _npz(ws / "b.npz", x[::-1].copy(), y[::-1].copy(), xt, yt)}
    p["labels"] = _npz(ws / "labels_10_19.npz", x, y, xt, yt + 10)
    p["badtrain"] = _npz(ws / "labels_train_10_19.npz", x, y + 10, xt, yt)
    nan = xt.astype(np.float32) / 255
    nan[0, 3, 3] = np.nan
    p["nan"] = _npz(ws / "nan_pixels.npz", x, y, nan, yt)
    p["float"] = _npz(ws / "float_labels.npz", x, y.astype(np.float32), xt, yt)
    p["rgb"] = _npz(ws / "rgb.npz", np.zeros((4, 32, 32, 3), np.uint8), np.zeros(4, np.int64),
                    np.zeros((4, 32, 32, 3), np.uint8), np.zeros(4, np.int64))
    p["counts"] = _npz(ws / "counts.npz", x, y[:10], xt, yt)
    p["ck"], p["ckq"] = ws / "ck", ws / "ckq"
    for out, model in ((p["ck"], ["mnistconv"]), (p["ckq"], ["qnn_kbit", "--bits", "4", "--dropout", "0.5"])):
        code = main(["train", "--model", *model, "--data", str(p["a"]), "--epochs", "1", "--batch-size", "64",
                     "--quiet", "--device", "cpu", "--out", str(out)])
        assert code == 0
    p["unverified"] = ws / "ck_unverified"  # weights altered, digest removed
    shutil.copytree(p["ck"], p["unverified"])
    model, _ = load_checkpoint(p["ck"])
    with torch.no_grad():
        model.classifier.weight.mul_(-1)
    save_checkpoint(ws / "tmp", model)
    shutil.copy(ws / "tmp" / WEIGHTS, p["unverified"] / WEIGHTS)
    shutil.rmtree(ws / "tmp")
    _edit_config(p["unverified"], lambda c: c.pop("weights_sha256"))
    with torch.no_grad():
        model.classifier.weight[0, 0] = float("nan")
    p["nanw"] = save_checkpoint(ws / "ck_nan_weights", model)  # a correct digest of NaN weights
    p["huge"] = ws / "ck_huge"  # a 40 GB (sparse) model.safetensors: must be refused unread
    shutil.copytree(p["ck"], p["huge"])
    os.truncate(p["huge"] / WEIGHTS, 40 * 2**30)
    p["thesis"] = ws / "thesis"
    (p["thesis"] / "sub").mkdir(parents=True)
    (p["thesis"] / "thesis.tex").write_text("thesis\n")
    p["dir"] = ws / "a_dir"
    p["dir"].mkdir()
    p["npzdir"] = ws / "adv.npz"
    p["npzdir"].mkdir()
    p["foreign"] = ws / "foreign_out"
    p["foreign"].mkdir()
    import sqlite3

    conn = sqlite3.connect(p["foreign"] / "store.sqlite")
    conn.execute("CREATE TABLE thesis_refs (key TEXT, title TEXT)")
    conn.execute("INSERT INTO thesis_refs VALUES ('k', 't')")
    conn.commit()
    conn.close()
    p["toml"] = ws / "exp.toml"
    p["toml"].write_text(f'name = "t"\nsamples = 16\ndata = "{p["a"]}"\noutput = "{ws / "runs" / "t"}"\n'
                         '[train]\nepochs = 1\n[[models]]\nname = "m1"\narch = "mnistconv"\n'
                         '[[models]]\nname = "m2"\narch = "mnistconv"\noptions = {wbits = 2, abits = 4}\n'
                         '[[ensembles]]\nname = "e"\nmembers = ["m1", "m2"]\n'
                         '[[attacks]]\nname = "fgsm"\neps = [0.1]\n')
    return p


FORCE = "--force on a folder qrobust did not write"
LABELS = "labels outside the model's classes"
OUTPUT = "output is a directory or unwritable"


def cases(p: dict[str, Path]) -> list[Case]:
    s = {k: str(v) for k, v in p.items()}
    ws = p["ws"]

    def train(*extra: str, data: str = s["a"], out: str = str(ws / "new_ckpt")) -> list[str]:
        return ["train", "--model", "mnistconv", "--data", data, "--epochs", "1", "--quiet", "--out", out,
                *extra]

    def run(*sets: str) -> list[str]:
        return ["run", s["toml"], "--check", *[t for kv in sets for t in ("--set", kv)]]

    force = "not a qrobust checkpoint; --force only replaces checkpoints qrobust wrote"
    labels = "labels up to 1[89] but .* predicts 10 classes"
    F, L, O = FORCE, LABELS, OUTPUT
    return [
        Case(F, "existing folder, --force", train("--force", out=s["thesis"]),
             force),
        Case(F, "existing folder, no --force", train(out=s["thesis"]), force),
        Case(F, "--out . --force", train("--force", out="."), force),
        Case(F, "--out a file", train("--force", out=s["a"]),
             "exists and is not a checkpoint folder"),
        Case(L, "eval", ["eval", s["ck"], "--data", s["labels"]], labels),
        Case(L, "attack", ["attack", s["ck"], "--attack", "fgsm", "--data",
                                                              s["labels"], "--quiet"], labels),
        Case(L, "attack --labels true",
             ["attack", s["ck"], "--attack", "fgsm", "--labels", "true", "--data", s["labels"]], labels),
        Case(L, "detect", ["detect", s["ckq"], "--data", s["labels"], "-n", "8",
                                                              "--quiet"], labels),
        Case(L, "empir",
             ["empir", "mnist", "--model_path", s["ck"], "--data_dir", str(ws / "mnistdir"), "--attack", "2"],
             labels),
        Case(L, "train", train(data=s["badtrain"]), labels),
        Case(L, "run (checkpoint models)",
             ["run", s["toml"], "--quiet", "--set", f'data="{s["labels"]}"', "--set",
              f'output="{ws.parent / (ws.name + "-run")}"', "--set",
              f'models=[{{name="m1",checkpoint="{s["ck"]}"}},{{name="m2",checkpoint="{s["ck"]}"}}]'], labels),
        Case("bad data", "NaN pixels", ["eval", s["ck"], "--data", s["nan"]], "NaN or infinite pixels"),
        Case("bad data", "float labels", train(data=s["float"]), "labels must be integers"),
        Case("bad data", "images and labels of different counts", train(data=s["counts"]),
             "64 images but labels of shape"),
        Case("bad data", "image shape not the model's", ["eval", s["ck"], "--data", s["rgb"]],
             r"image shape \(3, 32, 32\) but the model expects"),
        Case("unverified or broken checkpoint", "weights altered, digest removed", ["eval", s["unverified"]],
             "no weights_sha256.*--trust-unverified"),
        Case("unverified or broken checkpoint", "NaN weights", ["eval", s["nanw"]], "NaN or infinite values"),
        Case("unverified or broken checkpoint", "40 GB model.safetensors", ["eval", s["huge"]],
             "40960 MB but the weights of mnistconv take"),
        Case(O, "attack --json-out DIR",
             ["attack", s["ck"], "--attack", "fgsm", "--json-out", s["dir"]], "--json-out .* is a directory"),
        Case(O, "attack --save-adv DIR.npz",
             ["attack", s["ck"], "--attack", "fgsm", "--save-adv", s["npzdir"]],
             "--save-adv .* is a directory"),
        Case(O, "detect --out DIR", ["detect", s["ckq"], "--out", s["dir"]],
             "--out .* is a directory"),
        Case(O, "attack --json-out in /sys",
             ["attack", s["ck"], "--attack", "fgsm", "--json-out", "/sys/qrobust/r.json"],
             "cannot create output directory /sys/qrobust"),
        Case(O, "train --out in /sys", train(out="/sys/qrobust-ck"),
             "output directory /sys is not writable"),
        Case("memory-hungry settings", "detect --mc 100000000",
             ["detect", s["ckq"], "--mc", "100000000", "-n", "8"],
             "needs about .* GB of memory but .* available; lower --mc"),
        Case("too few images", "detect -n 1", ["detect", s["ckq"], "-n", "1"], "needs at least 2"),
        Case("experiment file", "option of the wrong type", run('attacks.0.eps="0.1"'), r"attacks\[0\]\.eps"),
        Case("experiment file", "flag of the wrong type", run("models.1.options.mc_dropout=1"),
             r"options\.mc_dropout: must be true or false"),
        Case("experiment file", "invalid ensemble rule", run('ensembles.0.options={rule="majority"}'),
             "unknown ensemble rule 'majority'"),
        Case("experiment file", "name with ../", run('name="../../escape"'), "must be a simple name"),
        Case("experiment file", "labels equal up to case/punctuation",
             run('attacks=[{name="fgsm",eps=0.1,label="FGSM-0.1"},{name="fgsm",eps=0.2,label="fgsm 0.1"}]'),
             "is used twice"),
        Case("experiment file", "model option out of range", run("models.1.options.wbits=0"),
             "wbits must be from 1 to 32"),
        Case("store that is not qrobust's", "run --check on another SQLite db",
             run(f'output="{p["foreign"]}"'), "SQLite database that qrobust did not write"),
        Case("store that is not qrobust's", "run on another SQLite db",
             ["run", s["toml"], "--quiet", "--set", f'output="{p["foreign"]}"'],
             "SQLite database that qrobust did not write"),
        Case("argument errors", "unknown attack", ["attack", s["ck"], "--attack", "nope"], "invalid choice"),
        Case("argument errors", "detect --mc 0", ["detect", s["ckq"], "--mc", "0"], "must be positive"),
        Case("argument errors", "unknown option", ["models", "--bogus"], "unrecognized arguments"),
        Case("argument errors", "negative epochs", train("--epochs", "-1"), "--epochs must be >= 0"),
    ]


def tree_digest(path: Path) -> str:
    """SHA-256 over the names and bytes of every file under ``path`` (files over 64 MB: name and size)."""
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        if f.is_file() and not f.name.endswith((".lock", "-wal", "-shm")):
            h.update(f.relative_to(path).as_posix().encode())
            size = f.stat().st_size
            h.update(str(size).encode() if size > 64 * 2**20 else f.read_bytes())
    return h.hexdigest()


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    p = build_workspace(root)
    (root / "mnistdir").mkdir()  # `empir mnist --data_dir` looks for mnist.npz there
    shutil.copy(p["labels"], root / "mnistdir" / "mnist.npz")
    return p


def _ids() -> list[str]:
    fake = {k: Path(k) for k in ("ws", "a", "b", "labels", "badtrain", "nan", "float", "rgb", "counts", "ck",
                                 "ckq", "unverified", "nanw", "huge", "thesis", "dir", "npzdir", "foreign",
                                 "toml")}
    return [f"{c.klass}: {c.what}" for c in cases(fake)]


@pytest.mark.parametrize("index", range(len(_ids())), ids=_ids())
def test_bad_input_is_refused_clearly_and_nothing_changes(index, ws, capsys, monkeypatch):
    monkeypatch.chdir(ws["ws"])  # so `--out .` means the workspace itself
    case = cases(ws)[index]
    before = tree_digest(ws["ws"])
    code, _, err = run_cli(case.argv, capsys)
    assert code == case.code, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert __import__("re").search(case.pattern, err), err
    assert tree_digest(ws["ws"]) == before, "a refused command changed files"
    assert not (ws["ws"] / "new_ckpt").exists()


def test_force_replaces_a_qrobust_checkpoint_only(ws, tmp_path, capsys):
    out = tmp_path / "ck"
    shutil.copytree(ws["ck"], out)
    code, _, err = run_cli(["train", "--model", "mnistconv", "--data", ws["b"], "--epochs", "1", "--quiet",
                            "--seed", "3", "--out", out, "--force"], capsys)
    assert code == 0, err
    assert json.loads((out / CONFIG).read_text())["dataset"] == str(ws["b"].resolve())
    (out / "notes.txt").write_text("mine")  # a user file inside: no longer only what qrobust wrote
    code, _, err = run_cli(["train", "--model", "mnistconv", "--data", ws["a"], "--epochs", "1", "--quiet",
                            "--out", out, "--force"], capsys)
    assert code == 2 and "not a qrobust checkpoint" in err and (out / "notes.txt").read_text() == "mine"


def test_unverified_checkpoint_loads_only_when_trusted(ws, capsys):
    code, out, err = run_cli(["eval", ws["unverified"], "--trust-unverified"], capsys)
    assert code == 0, err
    _, cfg = load_checkpoint(ws["unverified"], trust_unverified=True)
    assert "weights_sha256" not in cfg


def test_epochs_zero_writes_valid_json(ws, tmp_path, capsys):
    code, out, err = run_cli(["train", "--model", "mnistconv", "--data", ws["a"], "--epochs", "0", "--quiet",
                              "--out", tmp_path / "e0"], capsys)
    assert code == 0, err

    def no_nan(text: str) -> None:
        raise AssertionError(f"non-JSON constant {text}")

    cfg = json.loads((tmp_path / "e0" / CONFIG).read_text(), parse_constant=no_nan)
    assert cfg["test_accuracy"] is None and json.loads(out, parse_constant=no_nan)["test_accuracy"] is None


def test_resume_refuses_other_data_or_adversarial_settings(ws):
    """Interrupted after epoch 1 on a.npz, the same output with b.npz (or another training attack) must
    not resume a.npz's weights; with the same inputs it resumes exactly."""
    from qrobust.adversary import make_adversary, make_attack
    from qrobust.checkpoint import train_state_dir
    from qrobust.data import load_dataset
    from qrobust.models import create_model
    from qrobust.train import TrainConfig, train_to_checkpoint

    class Stop(Exception):
        pass

    def stop(rec):
        raise Stop

    out = ws["ws"] / "resume" / "ck"
    cfg = TrainConfig(epochs=2, batch_size=32)
    a, b = load_dataset(str(ws["a"])), load_dataset(str(ws["b"]))
    with pytest.raises(Stop):
        train_to_checkpoint(out, create_model("mnistconv"), a, cfg, on_epoch=stop)
    with pytest.raises(QrobustError, match="different model or training settings .*training data"):
        train_to_checkpoint(out, create_model("mnistconv"), b, cfg)
    fgsm = make_adversary(make_attack("fgsm", eps=0.1))
    with pytest.raises(QrobustError, match="adversarial training"):
        train_to_checkpoint(out, create_model("mnistconv"), a, cfg, adversary=fgsm)
    assert (train_state_dir(out) / "train_state.safetensors").is_file()  # the interrupted run is kept
    epochs = []
    train_to_checkpoint(out, create_model("mnistconv"), a, cfg, on_epoch=lambda r: epochs.append(r.epoch))
    assert epochs == [2] and not train_state_dir(out).exists()


def test_full_disk_is_a_clear_error_and_old_files_survive(ws, tmp_path, capsys, monkeypatch):
    """ENOSPC while writing a result or a checkpoint: one `error:` line naming the file and the remedy,
    the previous file or checkpoint intact, no temporary files left."""
    res = tmp_path / "r.json"
    res.write_text('{"old": true}\n')
    ck = tmp_path / "ck"
    shutil.copytree(ws["ck"], ck)
    before = tree_digest(ck)
    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    code, _, err = run_cli(["attack", ws["ck"], "--attack", "fgsm", "-n", "4", "--quiet", "--json-out", res],
                           capsys)
    assert code == 2 and err.startswith("error: cannot write") and "No space left" in err
    assert "free disk space" in err and err.count("\n") == 1
    assert res.read_text() == '{"old": true}\n' and [f.name for f in tmp_path.iterdir()] == ["ck", "r.json"]
    monkeypatch.setattr(os, "fsync", real_fsync)

    def full_write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_bytes", full_write)
    code, _, err = run_cli(["train", "--model", "mnistconv", "--data", ws["a"], "--epochs", "1", "--quiet",
                            "--out", ck, "--force"], capsys)
    assert code == 2 and "cannot write checkpoint" in err and "nothing was replaced" in err
    assert tree_digest(ck) == before  # the old checkpoint is intact; the finished epoch is kept for a rerun
    assert sorted(f.name for f in tmp_path.iterdir()) == [".ck.train-state", "ck", "r.json"]


def test_os_errors_that_escape_become_one_line(monkeypatch, capsys):
    """The last resort of `qrobust.cli.main`: an OSError no check foresaw is one `error:` line, exit 1."""

    def boom(args):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), "/ro/file")

    monkeypatch.setattr("qrobust.cli.models.run", boom)
    code, _, err = run_cli(["models"], capsys)
    assert code == 1 and err.startswith("error: Read-only file system /ro/file") and "writable" in err


def test_second_run_on_one_output_refuses_while_the_first_holds_it(ws, capsys):
    from qrobust.utils import output_lock

    out = ws["ws"] / "runs" / "locked"
    out.mkdir(parents=True)
    with output_lock(out):
        code, _, err = run_cli(["run", ws["toml"], "--quiet", "--set", f'output="{out}"'], capsys)
    assert code == 2 and "in use by another qrobust run" in err and err.count("\n") == 1
    assert not (out / "store.sqlite").exists() and not any(out.glob(".*train-state"))


def test_foreign_store_is_left_untouched(ws):
    from qrobust.experiment.store import ResultStore

    db = ws["foreign"] / "store.sqlite"
    before = db.read_bytes()
    with pytest.raises(QrobustError, match="did not write"):
        ResultStore(db)
    with pytest.raises(QrobustError, match="did not write"):
        ResultStore.verify(db)
    assert db.read_bytes() == before and not Path(f"{db}-wal").exists()
