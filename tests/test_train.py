"""Training: EMPIR label smoothing, determinism, exact resume, refusals, adversarial-training hook."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from qrobust.adversary import smoothed_targets
from qrobust.adversary import training_loss as _loss
from qrobust.errors import QrobustError
from qrobust.evaluate import accuracy, wilson_interval
from qrobust.models import create_model
from qrobust.train import TrainConfig, train


def test_smoothed_targets_empir():
    t = smoothed_targets(torch.tensor([2, 0]), 10, 0.1)
    assert t[0, 2].item() == pytest.approx(0.9) and t[1, 0].item() == pytest.approx(0.9)
    others = t[0][torch.arange(10) != 2]
    assert torch.allclose(others, torch.full((9,), 0.1 / 9))
    assert torch.allclose(t.sum(1), torch.ones(2))


def test_smoothed_loss_hand_computed():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 0.0, 3.0]])
    y = torch.tensor([0, 1])
    # K = 3, s = 0.3: targets 0.7 on the label and 0.15 elsewhere
    target = torch.tensor([[0.7, 0.15, 0.15], [0.15, 0.7, 0.15]])
    expected = -(target * F.log_softmax(logits, 1)).sum(1).mean()
    assert _loss(logits, y, 0.3).item() == pytest.approx(expected.item(), rel=1e-6)
    assert _loss(logits, y, 0.0).item() == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)


def _run(digits, seed=0, epochs=1, state_dir=None, n=256, **model_kw):
    torch.manual_seed(seed)
    model = create_model("mnistconv", **model_kw)
    cfg = TrainConfig(epochs=epochs, batch_size=64, seed=seed, max_train=n)
    result = train(model, digits.train, digits.test.head(64), cfg, state_dir=state_dir)
    return model, result


def _same(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_deterministic_for_a_seed(digits):
    a, ra = _run(digits, wbits=2, abits=4, dropout=0.3)
    b, rb = _run(digits, wbits=2, abits=4, dropout=0.3)
    assert _same(a, b)
    assert [r.loss for r in ra.history] == [r.loss for r in rb.history]
    c, _ = _run(digits, seed=1, wbits=2, abits=4, dropout=0.3)
    assert not _same(a, c)


def test_resume_gives_identical_weights(digits, tmp_path):
    # dropout makes the global RNG matter, shuffling the generator: both must be restored
    full, rfull = _run(digits, epochs=2, state_dir=tmp_path / "a", wbits=2, abits=4, dropout=0.3)
    part, rpart = _run(digits, epochs=1, state_dir=tmp_path / "b", wbits=2, abits=4, dropout=0.3)
    assert len(rpart.history) == 1 and not _same(full, part)
    resumed, rres = _run(digits, seed=0, epochs=2, state_dir=tmp_path / "b", wbits=2, abits=4, dropout=0.3)
    assert _same(full, resumed)
    assert [r.loss for r in rres.history] == [r.loss for r in rfull.history]
    meta = json.loads((tmp_path / "b" / "train_state.json").read_text())
    assert meta["epoch"] == 2 and len(meta["history"]) == 2
    # the state holds everything: resuming a finished run trains nothing and keeps the weights,
    # even when the fresh model was initialised differently
    torch.manual_seed(99)
    other_init = create_model("mnistconv", wbits=2, abits=4, dropout=0.3)
    cfg = TrainConfig(epochs=2, batch_size=64, seed=0, max_train=256)
    ragain = train(other_init, digits.train, None, cfg, state_dir=tmp_path / "b")
    assert _same(full, other_init) and len(ragain.history) == 2
    with pytest.raises(QrobustError, match="different model or training settings"):  # another seed
        _run(digits, seed=5, epochs=2, state_dir=tmp_path / "b", wbits=2, abits=4, dropout=0.3)


def test_resume_refuses_other_settings(digits, tmp_path):
    _run(digits, epochs=1, state_dir=tmp_path / "s", wbits=2, abits=4)
    with pytest.raises(QrobustError, match="different model or training settings.*delete"):
        _run(digits, epochs=2, state_dir=tmp_path / "s", wbits=4, abits=4)
    with pytest.raises(QrobustError, match="different model or training settings"):
        _run(digits, epochs=2, state_dir=tmp_path / "s", n=128, wbits=2, abits=4)
    (tmp_path / "s" / "train_state.safetensors").write_bytes(b"garbage")
    with pytest.raises(QrobustError, match="unreadable.*delete"):
        _run(digits, epochs=2, state_dir=tmp_path / "s", wbits=2, abits=4)


@pytest.mark.parametrize(("field", "value"), [("epochs", -1), ("batch_size", 0), ("lr", 0.0),
                                              ("lr", float("nan")),
                                              ("label_smoothing", 1.0), ("max_train", 0)])
def test_config_validation(field, value):
    with pytest.raises(QrobustError):
        TrainConfig(**{field: value}).validate()


def test_diverging_loss_is_reported(digits):
    class Broken(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(784, 10)

        def forward(self, x):
            return self.lin(x.flatten(1)) * float("nan")

    with pytest.raises(QrobustError, match="diverged.*lower --lr"):
        train(Broken(), digits.train, None, TrainConfig(epochs=1, batch_size=64, max_train=64))


def test_adversary_hook(digits):
    calls = []

    def adversary(model, x, y):
        calls.append((model.training, len(x)))
        return x.flip(-1)

    torch.manual_seed(0)
    model = create_model("mnistconv")
    cfg = TrainConfig(epochs=2, batch_size=64, max_train=128, adv_start_epoch=1)
    train(model, digits.train, None, cfg, adversary=adversary)
    assert calls == [(False, 64), (False, 64)]  # epoch 2 only, called in eval mode
    assert model.training is False


def test_training_learns(digits):
    torch.manual_seed(0)
    model = create_model("mnistconv")
    x, y = digits.test.head(300).tensors()
    before = accuracy(model.eval(), x, y)
    cfg = TrainConfig(epochs=1, batch_size=64, max_train=1536)
    result = train(model, digits.train, digits.test.head(300), cfg)
    after = accuracy(model, x, y)
    lo, _ = wilson_interval(round(after * len(y)), len(y))
    assert before < 0.3 and lo > 0.7, (before, after)  # chance is 10 %
    assert result.test_accuracy == pytest.approx(after)


def test_zero_epochs(digits):
    torch.manual_seed(0)
    model = create_model("mnistconv")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train(model, digits.train, None, TrainConfig(epochs=0))
    assert result.history == [] and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_cosine_schedule_hand_computed():
    cfg = TrainConfig(lr=1e-3, lr_schedule="cosine")
    assert cfg.lr_at(0, 100) == pytest.approx(1e-3)
    assert cfg.lr_at(50, 100) == pytest.approx(0.5e-3)
    assert cfg.lr_at(25, 100) == pytest.approx(0.5e-3 * (1 + 2 ** -0.5))
    assert cfg.lr_at(100, 100) == pytest.approx(0.0, abs=1e-15)
    assert TrainConfig(lr=1e-3).lr_at(99, 100) == 1e-3  # constant stays constant


def test_cosine_schedule_reaches_the_optimizer(digits):
    seen = []

    class Spy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(784, 10)

        def forward(self, x):
            return self.lin(x.flatten(1))

    model = Spy()
    real_step = torch.optim.Adam.step

    def spy_step(self, *a, **k):
        seen.append(self.param_groups[0]["lr"])
        return real_step(self, *a, **k)

    torch.optim.Adam.step = spy_step
    try:
        train(model, digits.train, None, TrainConfig(epochs=2, batch_size=64, max_train=256, lr=1e-2,
                                                      lr_schedule="cosine"))
    finally:
        torch.optim.Adam.step = real_step
    total = 2 * 4
    assert seen == pytest.approx([0.5e-2 * (1 + math.cos(math.pi * i / total)) for i in range(total)])


def test_cosine_resume_is_exact_and_epochs_are_pinned(digits, tmp_path):
    def run(epochs, sdir):
        torch.manual_seed(0)
        model = create_model("mnistconv", wbits=2, abits=4)
        cfg = TrainConfig(epochs=epochs, batch_size=64, max_train=256, lr_schedule="cosine")
        train(model, digits.train, None, cfg, state_dir=sdir)
        return model

    full = run(2, tmp_path / "a")
    again = run(2, tmp_path / "b")
    assert _same(full, again)  # deterministic with the schedule
    resumed = run(2, tmp_path / "a")  # a finished state: nothing trained, same weights
    assert _same(full, resumed)
    # with a schedule the epoch count shapes every step, so a state of another length is refused
    with pytest.raises(QrobustError, match="different model or training settings"):
        run(3, tmp_path / "a")


def test_madry_weight_trains_on_adversarial_loss_only(digits):
    """adv_weight 1: the update depends on x_adv only; 0.5 mixes in the clean loss (seed A)."""

    def run(weight, adversary):
        torch.manual_seed(0)
        model = create_model("mnistconv")
        cfg = TrainConfig(epochs=1, batch_size=64, max_train=64, adv_weight=weight)
        train(model, digits.train, None, cfg, adversary=adversary)
        return model

    def flip(model, x, y):
        return x.flip(-1)

    madry = run(1.0, flip)
    # training directly on the flipped images with the clean loss gives the same update
    torch.manual_seed(0)
    direct = create_model("mnistconv")
    flipped = digits.train.head(64)
    opt = torch.optim.Adam(direct.parameters(), lr=1e-3, fused=True)
    direct.train()
    gen = torch.Generator().manual_seed(0)
    for x, y in flipped.batches(64, shuffle=True, generator=gen):
        loss = F.cross_entropy(direct(x.flip(-1)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert _same(madry, direct)
    assert not _same(madry, run(0.5, flip))


@pytest.mark.parametrize(("field", "value"), [("lr_schedule", "step"), ("adv_weight", 0.0),
                                              ("adv_weight", 1.5)])
def test_new_config_fields_are_validated(field, value):
    with pytest.raises(QrobustError, match=field.split("_")[0]):
        TrainConfig(**{field: value}).validate()


def test_channels_last_resume_is_exact(digits, tmp_path):
    """NHWC training resumes bit for bit (the fused Adam state must follow the weights' layout)."""
    def run(epochs, state_dir):
        torch.manual_seed(0)
        model = create_model("mnistconv", wbits=2, abits=4)
        cfg = TrainConfig(epochs=epochs, batch_size=64, seed=0, max_train=256, channels_last=True)
        return model, train(model, digits.train, None, cfg, state_dir=state_dir)

    full, _ = run(2, tmp_path / "a")
    part, _ = run(1, tmp_path / "b")
    assert not _same(full, part)
    resumed, _ = run(2, tmp_path / "b")
    assert _same(full, resumed)
