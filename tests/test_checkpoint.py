"""Checkpoints: exact round trips, no silent overwrite, and clear refusals of corrupt or mismatched files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save as st_save

from qrobust.checkpoint import CONFIG, WEIGHTS, load_checkpoint, read_config, save_checkpoint
from qrobust.errors import QrobustError
from qrobust.models import create_model


def _model(name="mnistconv", seed=0, **kw):
    torch.manual_seed(seed)
    return create_model(name, **kw)


@pytest.mark.parametrize(("name", "kwargs"), [("mnistconv", {"wbits": 2, "abits": 4}), ("cifarconv", {}),
                                              ("qnn_bnn", {}), ("qnn_kbit", {"bits": 3})])
def test_round_trip_identical_logits(tmp_path, name, kwargs):
    model = _model(name, **kwargs)
    shape = model.qrobust_config["input_shape"]
    x = torch.rand(4, *shape)
    if any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()):
        model.train()
        model(torch.rand(8, *shape))  # move BN running statistics away from their defaults
    model.eval()
    expected = model(x)
    save_checkpoint(tmp_path / "ck", model, {"note": "hi"})
    loaded, config = load_checkpoint(tmp_path / "ck")
    assert not loaded.training
    assert torch.equal(loaded(x), expected)
    assert config["model"] == model.qrobust_config and config["note"] == "hi"
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [CONFIG, WEIGHTS]
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temporary leftovers


def test_config_fields_cannot_be_shadowed(tmp_path):
    model = _model()
    info = {"model": "evil", "format": "x", "weights_sha256": "0", "acc": 0.5}
    save_checkpoint(tmp_path / "ck", model, info)
    cfg = read_config(tmp_path / "ck")
    assert cfg["model"]["name"] == "mnistconv" and cfg["format"] == "qrobust-checkpoint/1"
    assert cfg["acc"] == 0.5
    load_checkpoint(tmp_path / "ck")  # the real SHA-256 is recorded


def test_no_overwrite_without_permission(tmp_path):
    a, b = _model(seed=0), _model(seed=1)
    save_checkpoint(tmp_path / "ck", a)
    before = (tmp_path / "ck" / WEIGHTS).read_bytes()
    with pytest.raises(QrobustError, match="already exists.*--force"):
        save_checkpoint(tmp_path / "ck", b)
    assert (tmp_path / "ck" / WEIGHTS).read_bytes() == before
    save_checkpoint(tmp_path / "ck", b, overwrite=True)
    loaded, _ = load_checkpoint(tmp_path / "ck")
    assert torch.equal(loaded.classifier.weight, b.classifier.weight)
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]


def test_save_refusals(tmp_path):
    with pytest.raises(QrobustError, match="create_model"):
        save_checkpoint(tmp_path / "x", torch.nn.Linear(2, 2))
    (tmp_path / "afile").write_text("")
    with pytest.raises(QrobustError, match="afile exists but is a file"):
        save_checkpoint(tmp_path / "afile" / "ck", _model())


@pytest.fixture
def saved(tmp_path):
    save_checkpoint(tmp_path / "ck", _model(wbits=2, abits=4))
    return tmp_path / "ck"


def _edit_config(path, fn):
    cfg = json.loads((path / CONFIG).read_text())
    fn(cfg)
    (path / CONFIG).write_text(json.dumps(cfg))


def test_corrupt_weights_refused(saved):
    blob = bytearray((saved / WEIGHTS).read_bytes())
    blob[-10] ^= 0xFF
    (saved / WEIGHTS).write_bytes(bytes(blob))
    with pytest.raises(QrobustError, match="does not match the SHA-256.*corrupt"):
        load_checkpoint(saved)
    _edit_config(saved, lambda c: c.pop("weights_sha256"))  # without a digest: refused unless trusted
    with pytest.raises(QrobustError, match="no weights_sha256.*--trust-unverified"):
        load_checkpoint(saved)
    (saved / WEIGHTS).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(QrobustError, match="not a valid safetensors"):  # trusted, the header is still checked
        load_checkpoint(saved, trust_unverified=True)


def test_missing_and_garbled_files(saved, tmp_path):
    with pytest.raises(QrobustError, match="does not exist"):
        load_checkpoint(tmp_path / "nothing")
    (saved / WEIGHTS).rename(tmp_path / "w")
    with pytest.raises(QrobustError, match="has no model.safetensors"):
        load_checkpoint(saved)
    (saved / CONFIG).write_text("{ broken")
    with pytest.raises(QrobustError, match="not valid JSON"):
        read_config(saved)
    (saved / CONFIG).write_text(json.dumps({"format": "something-else", "model": {}}))
    with pytest.raises(QrobustError, match="not a qrobust checkpoint"):
        read_config(saved)
    (saved / CONFIG).write_text(json.dumps({"format": "qrobust-checkpoint/1", "model": ["mnistconv"]}))
    with pytest.raises(QrobustError, match="field 'model'"):
        read_config(saved)
    (saved / CONFIG).unlink()
    with pytest.raises(QrobustError, match="has no config.json"):
        read_config(saved)


def test_config_describing_other_model_refused(saved):
    # same tensor shapes, different quantization: only the description stored in the weights reveals it
    _edit_config(saved, lambda c: c["model"]["kwargs"].update(wbits=32))
    with pytest.raises(QrobustError, match=r"describes mnistconv .*'wbits': 32.*weights were saved for"):
        load_checkpoint(saved)
    _edit_config(saved, lambda c: c["model"]["kwargs"].update(wbits=0))
    with pytest.raises(QrobustError):
        load_checkpoint(saved)


def test_shape_mismatch_refused_for_files_without_description(tmp_path):
    """Weights written without the embedded description (older files) are checked tensor by tensor."""
    model = _model("mnistconv")
    save_checkpoint(tmp_path / "ck", model)
    blob = st_save({k: v.contiguous() for k, v in _model("cifarconv").state_dict().items()})
    (tmp_path / "ck" / WEIGHTS).write_bytes(blob)
    _edit_config(tmp_path / "ck", lambda c: c.pop("weights_sha256"))
    with pytest.raises(QrobustError, match=r"do not match the model described in config.json \(mnistconv"):
        load_checkpoint(tmp_path / "ck", trust_unverified=True)
    blob = st_save({k: v.contiguous() for k, v in model.state_dict().items()})
    (tmp_path / "ck" / WEIGHTS).write_bytes(blob)
    loaded, _ = load_checkpoint(tmp_path / "ck", trust_unverified=True)  # and still load when they fit
    assert torch.equal(loaded.classifier.weight, model.classifier.weight)


class _Stop(Exception):
    pass


def test_train_to_checkpoint_resumes_an_interrupted_run_and_cleans_up(tmp_path, digits):
    """The one train-to-checkpoint path: killed after epoch 1, rerun finishes with the same weights."""
    from dataclasses import asdict

    from qrobust.checkpoint import train_state_dir
    from qrobust.data import Dataset
    from qrobust.train import TrainConfig, train_to_checkpoint

    data = Dataset(digits.train.head(128), digits.test.head(32), "digits")
    cfg = TrainConfig(epochs=2, batch_size=64, seed=0)
    ref = tmp_path / "ref"
    train_to_checkpoint(ref, _model(wbits=2, abits=4), data, cfg)

    out = tmp_path / "ck"

    def stop(rec):
        if rec.epoch == 1:
            raise _Stop

    with pytest.raises(_Stop):
        train_to_checkpoint(out, _model(wbits=2, abits=4), data, cfg, on_epoch=stop)
    assert not out.exists() and (train_state_dir(out) / "train_state.safetensors").is_file()
    epochs = []
    result = train_to_checkpoint(out, _model(seed=9, wbits=2, abits=4), data, cfg, info={"note": "x"},
                                 on_epoch=lambda r: epochs.append(r.epoch))
    assert epochs == [2] and len(result.history) == 2  # resumed, not restarted
    assert not train_state_dir(out).exists()
    got, want = load_checkpoint(out)[0].state_dict(), load_checkpoint(ref)[0].state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    info = read_config(out)
    assert info["note"] == "x" and info["train"] == asdict(cfg) and info["test_samples"] == 32
    # an existing checkpoint is refused before any training, unless overwriting is asked for
    with pytest.raises(QrobustError, match="already exists"):
        train_to_checkpoint(out, _model(wbits=2, abits=4), data, cfg, on_epoch=stop)


def test_check_model_data_refuses_mismatches(digits):
    from qrobust.checkpoint import check_model_data
    from qrobust.data import Dataset, Split

    check_model_data(_model(), digits)  # fits
    with pytest.raises(QrobustError, match=r"has images of shape \(1, 28, 28\) but cifarconv expects"):
        check_model_data(_model("cifarconv"), digits)
    empty = Split(digits.train.x[:0], digits.train.y[:0], "train")
    with pytest.raises(QrobustError, match="train holds no images"):
        check_model_data(_model(), Dataset(empty, digits.test, "digits"))
    wide = Split(digits.train.x[:8], torch.arange(8) * 2, "train")
    with pytest.raises(QrobustError, match=r"labels up to 14 but mnistconv predicts 10 classes"):
        check_model_data(_model(), Dataset(wide, digits.test, "digits"))


def test_force_target_must_be_a_checkpoint_qrobust_wrote(tmp_path):
    from qrobust.checkpoint import check_checkpoint_target, is_checkpoint_dir

    ck = save_checkpoint(tmp_path / "ck", _model())
    assert is_checkpoint_dir(ck) and check_checkpoint_target(ck, overwrite=True) == ck.resolve()
    (tmp_path / "empty").mkdir()
    assert check_checkpoint_target(tmp_path / "empty") == (tmp_path / "empty").resolve()  # nothing to lose
    save_checkpoint(tmp_path / "empty", _model())
    assert is_checkpoint_dir(tmp_path / "empty")
    (ck / "notes.txt").write_text("mine")  # a user's file inside: no longer only what qrobust wrote
    assert not is_checkpoint_dir(ck)
    with pytest.raises(QrobustError, match="not a qrobust checkpoint"):
        save_checkpoint(ck, _model(), overwrite=True)
    assert (ck / "notes.txt").read_text() == "mine"
    with pytest.raises(QrobustError, match="not a qrobust checkpoint"):
        check_checkpoint_target(tmp_path, overwrite=True)


def test_non_finite_results_become_null_in_config(tmp_path):
    ck = save_checkpoint(tmp_path / "ck", _model(), {"test_accuracy": float("nan"), "h": [float("inf"), 1.0]})
    cfg = json.loads((ck / CONFIG).read_text(), parse_constant=lambda c: pytest.fail(f"{c} in config.json"))
    assert cfg["test_accuracy"] is None and cfg["h"] == [None, 1.0]


def test_training_refused_up_front_when_the_disk_is_too_full(tmp_path, digits, monkeypatch):
    import shutil
    from collections import namedtuple

    from qrobust.train import TrainConfig, train_to_checkpoint

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    epochs = []
    with pytest.raises(QrobustError, match="needs about .* MB but .* free; free disk space"):
        train_to_checkpoint(tmp_path / "ck", _model(), digits, TrainConfig(epochs=1, max_train=32),
                            on_epoch=epochs.append)
    assert epochs == [] and list(tmp_path.iterdir()) == []
