"""Quantizers: exact level sets, straight-through gradients (hand-computed), stochastic binary weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qrobust.errors import QrobustError
from qrobust.quant import (
    DoReFaActivation,
    DoReFaWeight,
    Identity,
    QuantConv2d,
    QuantLinear,
    ScaledReLU,
    SeedAQuantizer,
    SignBinarizer,
    StochasticBinaryWeight,
    check_bits,
    hard_sigmoid,
    quantize_unit,
    round_ste,
)

KS = [1, 2, 3, 4, 5, 8]


def _dense(lo: float, hi: float, n: int = 20001) -> torch.Tensor:
    return torch.linspace(lo, hi, n)


# ---------------------------------------------------------------- levels


@pytest.mark.parametrize("k", KS)
def test_dorefa_weight_levels(k):
    w = _dense(-3, 3)
    q = DoReFaWeight(k)(w)
    levels = torch.unique(q)
    n = 2**k - 1
    assert len(levels) == 2**k
    assert levels.min().item() == -1.0 and levels.max().item() == 1.0
    expected = torch.tensor([2 * j / n - 1 for j in range(n + 1)])
    assert torch.allclose(levels, expected, atol=1e-6)


def test_dorefa_weight_formula_per_element():
    # max|tanh(w)| is taken over the whole tensor, so scaling up the largest weight moves the others.
    w = torch.tensor([0.1, -0.4, 0.7, 2.0])
    t = np.tanh(w.numpy().astype(np.float64))
    u = t / (2 * np.abs(t).max()) + 0.5
    expected = 2 * np.round(u * 3) / 3 - 1
    assert np.allclose(DoReFaWeight(2)(w).numpy(), expected, atol=1e-6)
    w2 = w.clone()
    w2[3] = 0.5  # smaller max -> the small weights now reach higher levels
    assert DoReFaWeight(2)(w2)[2].item() == 1.0


def test_dorefa_weight_all_zero_tensor_rounds_half_to_even():
    # A zero-initialised bias gives u = 0.5 exactly; round-half-to-even (torch.round, like tf.round) maps
    # it to level round(n / 2): +1/3 at 2 bits, +1/15 at 4 bits, -1 at 1 bit. A seed quirk, pinned.
    z = torch.zeros(5)
    assert DoReFaWeight(2)(z).tolist() == pytest.approx([1 / 3] * 5)
    assert DoReFaWeight(4)(z).tolist() == pytest.approx([1 / 15] * 5)
    assert DoReFaWeight(1)(z).tolist() == [-1.0] * 5


@pytest.mark.parametrize("k", KS)
def test_dorefa_activation_levels(k):
    x = _dense(-0.5, 1.5)
    q = DoReFaActivation(k)(x)
    levels = torch.unique(q)
    n = 2**k - 1
    assert len(levels) == 2**k
    assert levels.min().item() == 0.0 and levels.max().item() == 1.0
    assert torch.allclose(levels, torch.arange(n + 1) / n, atol=1e-7)


@pytest.mark.parametrize("k", KS)
def test_seed_a_levels(k):
    x = _dense(-2, 2)
    q = SeedAQuantizer(k)(x)
    levels = torch.unique(q)
    s = 2 ** (k - 1)
    assert len(levels) == 2**k + 1
    assert levels.min().item() == -1.0 and levels.max().item() == 1.0
    assert torch.equal(levels, torch.arange(-s, s + 1) / s)


def test_sign_levels_and_zero():
    x = torch.tensor([-2.0, -1e-6, 0.0, 1e-6, 3.0])
    for ste in ("hardtanh", "clip"):
        assert SignBinarizer(ste)(x).tolist() == [-1.0, -1.0, 1.0, 1.0, 1.0]


def test_full_precision_is_identity():
    x = torch.randn(100) * 3
    for q in (DoReFaWeight(32), DoReFaActivation(32), SeedAQuantizer(32), Identity()):
        assert torch.equal(q(x), x)


@pytest.mark.parametrize("bad", [0, 33, -1, 2.5, True, "4"])
def test_check_bits_refuses(bad):
    with pytest.raises(QrobustError, match="1 to 32|from 1 to 32"):
        check_bits(bad)
    with pytest.raises(QrobustError):
        DoReFaWeight(bad)


def test_sign_ste_name_checked():
    with pytest.raises(QrobustError, match="hardtanh"):
        SignBinarizer("identity")


# ---------------------------------------------------------------- gradients


def _grad(fn, x, upstream=None):
    x = x.clone().requires_grad_(True)
    out = fn(x)
    out.backward(upstream if upstream is not None else torch.ones_like(out))
    return x.grad


def test_round_ste_gradient_is_identity():
    x = torch.tensor([-1.7, -0.2, 0.4, 2.5])
    assert torch.equal(round_ste(x), torch.round(x))
    assert _grad(round_ste, x).tolist() == [1.0] * 4
    assert _grad(lambda v: quantize_unit(v, 3), x, torch.tensor([1.0, -2.0, 3.0, 0.5])).tolist() == [
        1.0, -2.0, 3.0, 0.5]


def test_dorefa_activation_gradient_clip_window():
    x = torch.tensor([-0.5, 0.0, 0.3, 1.0, 1.2])
    g = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    # d/dx Q(clip(x, 0, 1)) = 1 on [0, 1] (tf.clip_by_value's gradient, boundaries included), 0 outside.
    # torch.clamp would give 0 at x = 0 and x = 1: black/white pixels would lose their input gradient.
    assert _grad(DoReFaActivation(2), x, g).tolist() == [0.0, 2.0, 3.0, 4.0, 0.0]


def test_input_gradient_reaches_black_pixels():
    from qrobust.models import create_model

    torch.manual_seed(0)
    model = create_model("mnistconv", wbits=2, abits=4).eval()
    img = torch.zeros(1, 1, 28, 28)
    img[..., 8:20, 12:16] = 1.0  # a white bar on black: every pixel sits on a clip boundary
    x = img.clone().requires_grad_(True)
    model(x)[0, 3].backward()
    assert (x.grad[img == 0] != 0).sum() > 50 and (x.grad[img == 1] != 0).sum() > 5


def test_dorefa_weight_gradient_hand_computed():
    w = torch.tensor([0.5, -1.0, 0.2, 0.8], dtype=torch.float64)
    g = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    t = np.tanh(w.numpy())
    m = np.abs(t).max()
    j = int(np.abs(t).argmax())
    # out = 2 * STE(t / (2m) + 1/2) - 1  =>  dL/dt_i = g_i / m - [i == j] sign(t_j) sum_k g_k t_k / m^2
    dt = g.numpy() / m
    dt[j] -= np.sign(t[j]) * (g.numpy() * t).sum() / m**2
    expected = dt * (1 - t**2)
    got = _grad(DoReFaWeight(3), w, g)
    assert np.allclose(got.numpy(), expected, rtol=1e-12, atol=1e-12)


def test_seed_a_gradient_hand_computed():
    # clip(round(2x)/2, -1, 1): rounded values -1.5 (outside), -0.5, 1, 1, 2 (outside): TF's clip passes
    # the gradient on [-1, 1] only. The seed's Round override clips the gradient of round(2x) -- g / 2 --
    # to [-1, 1]; times 2 back: the gradient reaching x is clip(g, -2, 2).
    x = torch.tensor([-1.5, -0.3, 0.9, 1.2, 2.0])
    g = torch.tensor([5.0, -3.0, 0.5, 2.5, 1.0])
    assert SeedAQuantizer(2)(x).tolist() == [-1.0, -0.5, 1.0, 1.0, 1.0]
    assert _grad(SeedAQuantizer(2), x, g).tolist() == [0.0, -2.0, 0.5, 2.0, 0.0]
    assert _grad(SeedAQuantizer(2, "identity"), x, g).tolist() == [0.0, -3.0, 0.5, 2.5, 0.0]
    # 4 bits: scale 8, so only |g| > 8 is clipped
    x4 = torch.tensor([0.1, -0.2, 0.3, 1.1])
    g4 = torch.tensor([20.0, -9.0, 7.5, 3.0])
    assert _grad(SeedAQuantizer(4), x4, g4).tolist() == [8.0, -8.0, 7.5, 0.0]
    with pytest.raises(QrobustError, match="STE"):
        SeedAQuantizer(2, "hardtanh")


def test_sign_hardtanh_gradient():
    x = torch.tensor([-2.0, -1.0, -0.3, 0.0, 0.7, 1.5])
    g = torch.tensor([3.0, 3.0, -2.0, 0.5, 4.0, 1.0])
    assert _grad(SignBinarizer("hardtanh"), x, g).tolist() == [0.0, 3.0, -2.0, 0.5, 4.0, 0.0]


def test_sign_clip_gradient_is_seed_a_override():
    # seed A: grad = clip(upstream, -1, 1), whatever x is (even far outside [-1, 1]).
    x = torch.tensor([-5.0, -0.3, 0.0, 0.7, 9.0])
    g = torch.tensor([3.0, -0.4, -7.0, 0.25, -1.5])
    assert _grad(SignBinarizer("clip"), x, g).tolist() == pytest.approx([1.0, -0.4, -1.0, 0.25, -1.0])


# Reference composites (the straightforward formulas): the fused implementations must match them
# bit for bit, in values and in gradients, so the speed-ups change no result.
def _ref_weight(w, k):
    n = float(2**k - 1)
    t = torch.tanh(w)
    t = t / (2 * t.abs().max().clamp_min(1e-12)) + 0.5
    return 2 * (round_ste(t * n) / n) - 1


def _clip_tf(x, lo, hi):
    """Clip with TensorFlow's gradient: 1 on [lo, hi] (boundaries included), 0 outside."""
    return torch.where((x >= lo) & (x <= hi), x, x.clamp(lo, hi).detach())


def _ref_act(x, k):
    n = float(2**k - 1)
    return round_ste(_clip_tf(x, 0.0, 1.0) * n) / n


def _ref_seed_a(x, k, clip_grad=True):
    """The seed's TF graph: clip_by_value(round(x * s) / s, -1, 1) with Round's gradient clipped."""
    s = float(2 ** (k - 1))
    t = x * s
    if clip_grad and t.requires_grad:
        t.register_hook(lambda g: g.clamp(-1.0, 1.0))  # gradient_override_map({"Round": "QuantizeGrad"})
    return _clip_tf(round_ste(t) / s, -1.0, 1.0)


@pytest.mark.parametrize("k", [1, 2, 4, 7])
def test_fused_quantizers_bit_identical_to_reference(k):
    gen = torch.Generator().manual_seed(k)
    for shape in [(64, 1, 8, 8), (32, 16, 3, 3), (777,)]:
        w = torch.randn(shape, generator=gen) * 0.3
        g = torch.randn(shape, generator=gen)
        w1, w2 = w.clone().requires_grad_(), w.clone().requires_grad_()
        a, b = DoReFaWeight(k)(w1), _ref_weight(w2, k)
        (a * g).sum().backward()
        (b * g).sum().backward()
        assert torch.equal(a, b) and torch.equal(w1.grad, w2.grad)
        x = torch.randn(shape, generator=gen) * 0.8 + 0.4
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        a, b = DoReFaActivation(k)(x1), _ref_act(x2, k)
        (a * g).sum().backward()
        (b * g).sum().backward()
        assert torch.equal(a, b) and torch.equal(x1.grad, x2.grad)
        assert torch.equal(quantize_unit(x.clamp(0, 1), k), _ref_act(x, k))
        x = torch.cat([x.flatten(), torch.tensor([0.0, 1.0, -1.0, 1.25, 0.75])]) * 1.3
        up = torch.randn(x.shape, generator=gen) * 2 ** k  # large enough for the gradient clip to act
        for ste in ("clip", "identity"):
            x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
            a, b = SeedAQuantizer(k, ste)(x1), _ref_seed_a(x2, k, ste == "clip")
            (a * up).sum().backward()
            (b * up).sum().backward()
            assert torch.equal(a, b) and torch.equal(x1.grad, x2.grad)


# ---------------------------------------------------------------- stochastic binary weights


def test_hard_sigmoid():
    x = torch.tensor([-3.0, -1.0, 0.0, 0.5, 1.0, 2.0])
    assert hard_sigmoid(x).tolist() == [0.0, 0.0, 0.5, 0.75, 1.0, 1.0]


def test_stochastic_binary_mean_matches_expectation():
    w = torch.tensor([-1.5, -0.8, -0.3, 0.0, 0.2, 0.6, 0.95, 1.3])
    q = StochasticBinaryWeight()
    q.generator = torch.Generator().manual_seed(0)
    n = 4000
    samples = torch.stack([q(w) for _ in range(n)])
    assert set(torch.unique(samples).tolist()) <= {-1.0, 1.0}
    expected = 2 * hard_sigmoid(w) - 1
    sd = torch.sqrt((1 - expected**2).clamp_min(1e-12) / n)
    assert torch.all((samples.mean(0) - expected).abs() <= 5 * sd + 1e-9)
    assert samples[:, 0].eq(-1).all() and samples[:, -1].eq(1).all()  # p = 0 and p = 1 are certain


def test_stochastic_binary_resampled_and_reproducible():
    w = torch.zeros(2000)
    q = StochasticBinaryWeight()
    q.generator = torch.Generator().manual_seed(123)
    a, b = q(w), q(w)
    assert not torch.equal(a, b)  # resampled at every pass
    q.generator = torch.Generator().manual_seed(123)
    assert torch.equal(q(w), a) and torch.equal(q(w), b)  # same generator seed -> same sequence
    torch.manual_seed(5)
    q.generator = None
    c = q(w)
    torch.manual_seed(5)
    assert torch.equal(q(w), c)  # without a generator it follows the global seed


def test_stochastic_binary_gradient_is_expectation_gradient():
    w = torch.tensor([-1.5, -0.5, 0.0, 0.4, 1.2])
    g = torch.tensor([2.0, 2.0, -1.0, 3.0, 5.0])
    # d/dw (2 * hard_sigmoid(w) - 1) = 1 on [-1, 1], 0 outside
    assert _grad(StochasticBinaryWeight(), w, g).tolist() == [0.0, 2.0, -1.0, 3.0, 0.0]


def test_stochastic_binary_without_gradient_is_seed_a():
    # seed A samples with a comparison of uniforms against hard_sigmoid(w): no gradient reaches w.
    conv = QuantConv2d(2, 3, 3, bias=False, weight_quant=StochasticBinaryWeight("none"))
    x = torch.rand(2, 2, 5, 5, requires_grad=True)
    conv(x).sum().backward()
    assert conv.weight.grad is None and x.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(QrobustError, match="gradient"):
        StochasticBinaryWeight("clip")


def test_scaled_relu():
    m = ScaledReLU()
    assert m.alpha.item() == pytest.approx(0.05)
    x = torch.tensor([-1.0, 2.0])
    out = m(x)
    assert out.tolist() == pytest.approx([0.0, 0.1])
    out.sum().backward()
    assert m.alpha.grad.item() == pytest.approx(2.0)


# ---------------------------------------------------------------- layers


def test_quant_conv_matches_functional():
    torch.manual_seed(0)
    conv = QuantConv2d(3, 4, 3, padding=1, weight_quant=DoReFaWeight(2), input_quant=DoReFaActivation(3))
    x = torch.rand(2, 3, 8, 8)
    wq = DoReFaWeight(2)
    expected = F.conv2d(DoReFaActivation(3)(x), wq(conv.weight), wq(conv.bias), padding=1)
    assert torch.equal(conv(x), expected)
    plain = QuantConv2d(3, 4, 3, padding=1)
    ref = torch.nn.Conv2d(3, 4, 3, padding=1)
    ref.load_state_dict(plain.state_dict())
    assert torch.equal(plain(x), ref(x))


def test_full_precision_bias_quant_leaves_the_bias_alone():
    """bias_quant=Identity(): weights quantized, bias exact (a zero bias stays zero; DoReFa would map it
    to a nonzero level), and its gradient is the plain one."""
    torch.manual_seed(0)
    conv = QuantConv2d(3, 4, 3, padding=1, weight_quant=DoReFaWeight(2), input_quant=DoReFaActivation(4),
                       bias_quant=Identity())
    with torch.no_grad():
        conv.bias.zero_()
    x = torch.rand(2, 3, 8, 8)
    out = conv(x)
    assert torch.equal(out, F.conv2d(DoReFaActivation(4)(x), DoReFaWeight(2)(conv.weight), None, padding=1))
    assert DoReFaWeight(2)(torch.zeros(4)).abs().min() > 0  # what the default would have done to it
    out.sum().backward()
    assert torch.allclose(conv.bias.grad, torch.full((4,), 2 * 8 * 8.0))


def test_mnistconv_with_biases_keeps_them_full_precision():
    from qrobust.models.registry import create_model

    m = create_model("mnistconv", wbits=2, abits=4, bias=True).eval()
    conv1 = m.features[0]
    with torch.no_grad():
        conv1.bias.copy_(torch.linspace(-0.05, 0.05, 64))
    x = torch.rand(2, 1, 28, 28)
    wq = DoReFaWeight(2)(conv1.weight)
    expected = F.conv2d(DoReFaActivation(4)(x), wq, conv1.bias, stride=2, padding=3)
    assert torch.equal(conv1(x), expected)


def test_quant_linear_matches_functional():
    torch.manual_seed(0)
    lin = QuantLinear(6, 3, weight_quant=SeedAQuantizer(2), input_quant=SignBinarizer())
    x = torch.randn(4, 6)
    q = SeedAQuantizer(2)
    expected = F.linear(torch.where(x >= 0, 1.0, -1.0), q(lin.weight), q(lin.bias))
    assert torch.equal(lin(x), expected)
