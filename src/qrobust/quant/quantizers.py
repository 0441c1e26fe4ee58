"""Quantizers as small composable modules (Brevitas-style), separate from the layers that use them.

All quantizers pass gradients straight through their rounding step (STE), so white-box attacks
and training see useful gradients. Formulas follow ``shared/spec/seed-systems.md``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qrobust.errors import QrobustError

FULL_PRECISION = 32


def check_bits(bits: int, what: str = "bits") -> int:
    """Validate a bit width: 1..32, where 32 means full precision (no quantization)."""
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise QrobustError(f"{what} must be an integer from 1 to 32 (32 = full precision), got {bits!r}")
    if not 1 <= bits <= FULL_PRECISION:
        raise QrobustError(f"{what} must be from 1 to 32 (32 = full precision), got {bits}")
    return bits


def round_ste(x: Tensor) -> Tensor:
    """round(x) in the forward pass, identity in the backward pass."""
    return x + (torch.round(x) - x).detach()


class _AffineRoundSTE(torch.autograd.Function):
    """``scale * round(x * n) / n + shift`` with the gradient of ``scale * x + shift`` (STE).

    One fused function instead of the ``x + (round(x) - x).detach()`` composite: fewer temporaries,
    same values. The backward pass performs exactly the operations autograd performs on the composite
    ``scale * round_ste(x * n) / n + shift`` (``((g * scale) / n) * n``), so gradients are bit-identical.
    """

    @staticmethod
    def forward(ctx, x: Tensor, n: float, scale: float, shift: float) -> Tensor:  # type: ignore[override]
        ctx.n, ctx.scale = n, scale
        out = torch.mul(x, n).round_().div_(n)
        if scale != 1.0:
            out.mul_(scale)
        if shift != 0.0:
            out.add_(shift)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        g = grad * ctx.scale if ctx.scale != 1.0 else grad
        return torch.div(g, ctx.n).mul_(ctx.n), None, None, None


class _ClampQuantizeUnitSTE(torch.autograd.Function):
    """DoReFa activation ``round(clip(x, 0, 1) * n) / n``: rounding STE, clip gradient as in TensorFlow.

    TensorFlow's ``clip_by_value`` passes the gradient at the boundaries (0 <= x <= 1), the seeds'
    behaviour; ``torch.clamp`` (torch >= 2.x) zeroes it there, which would mask the input gradient of
    every pixel that is exactly 0 or 1 (most of an MNIST image) for attacks on EMPIR models.
    """

    @staticmethod
    def forward(ctx, x: Tensor, n: float) -> Tensor:  # type: ignore[override]
        c = torch.clamp(x, 0.0, 1.0)
        # 0 <= x <= 1 exactly where the clip left x unchanged; a bool mask is saved (a quarter of the
        # memory of x, and the backward pass needs no comparisons).
        ctx.save_for_backward(torch.eq(c, x))
        ctx.n = n
        return c.mul_(n).round_().div_(n)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (inside,) = ctx.saved_tensors
        return torch.where(inside, torch.div(grad, ctx.n).mul_(ctx.n), 0.0), None


def _levels(bits: int) -> float:
    return float(2**bits - 1)


def quantize_unit(x: Tensor, bits: int) -> Tensor:
    """DoReFa Q_k on [0, 1]: round(x * n) / n with n = 2^k - 1 levels above zero (STE)."""
    return _AffineRoundSTE.apply(x, _levels(bits), 1.0, 0.0)


class Identity(nn.Module):
    """The full-precision quantizer (bits = 32)."""

    bits = FULL_PRECISION

    def forward(self, x: Tensor) -> Tensor:
        return x


class DoReFaWeight(nn.Module):
    """DoReFa k-bit weights: 2 * Q_k(tanh(w) / (2 max|tanh(w)|) + 0.5) - 1, max over the whole tensor."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = check_bits(bits, "weight bits")

    def forward(self, w: Tensor) -> Tensor:
        if self.bits == FULL_PRECISION:
            return w
        t = torch.tanh(w)
        t = t / (2 * t.abs().max().clamp_min(1e-12)) + 0.5
        # = 2 * quantize_unit(t) - 1, fused (same values and gradients, fewer temporaries).
        return _AffineRoundSTE.apply(t, _levels(self.bits), 2.0, -1.0)

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


class DoReFaActivation(nn.Module):
    """DoReFa k-bit activations: Q_k(clip(x, 0, 1)); rounding is STE, the clip has TensorFlow's gradient.

    The gradient is 1 on [0, 1] *including* the boundaries (as ``tf.clip_by_value`` in the seeds), and 0
    outside; pixels at exactly 0 or 1 thus keep their input gradient.
    """

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = check_bits(bits, "activation bits")

    def forward(self, x: Tensor) -> Tensor:
        if self.bits == FULL_PRECISION:
            return x
        # = quantize_unit(torch.clamp(x, 0, 1)), fused (same values and gradients, fewer temporaries).
        return _ClampQuantizeUnitSTE.apply(x, _levels(self.bits))

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


class _SignHardtanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1).to(grad.dtype)


class _SignClipGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        return grad.clamp(-1.0, 1.0)


class SignBinarizer(nn.Module):
    """sign(x) in {-1, +1} (sign(0) = +1) with a straight-through gradient.

    ``ste="hardtanh"`` passes the gradient where |x| <= 1 (BinaryNet); ``ste="clip"`` is QNN-defense's
    override, which clips the upstream gradient to [-1, 1] regardless of x.
    """

    bits = 1

    def __init__(self, ste: str = "hardtanh") -> None:
        super().__init__()
        if ste not in ("hardtanh", "clip"):
            raise QrobustError(f"sign STE must be 'hardtanh' or 'clip', got {ste!r}")
        self.ste = ste

    def forward(self, x: Tensor) -> Tensor:
        fn = _SignHardtanh if self.ste == "hardtanh" else _SignClipGrad
        return fn.apply(x)

    def extra_repr(self) -> str:
        return f"ste={self.ste}"


class _SeedAQuantizeSTE(torch.autograd.Function):
    """clip(round(x * s) / s, -1, 1); gradient where the rounded value lies in [-1, 1] (TF clip), else 0.

    ``clip_grad``: QNN-defense's ``Round`` gradient override clip(g, -1, 1) acts on the gradient of
    round(x * s), i.e. on g / s; scaled back by s, the gradient reaching x is clip(g, -s, s) (exact in
    floating point: s is a power of two). Without it the gradient is g itself (plain STE).
    """

    @staticmethod
    def forward(ctx, x: Tensor, s: float, clip_grad: bool) -> Tensor:  # type: ignore[override]
        r = torch.mul(x, s).round_()
        ctx.save_for_backward(torch.abs(r).le(s))  # |round(x s) / s| <= 1, exactly (s = 2^j)
        ctx.s, ctx.clip_grad = s, clip_grad
        return r.div_(s).clamp_(-1.0, 1.0)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (inside,) = ctx.saved_tensors
        g = grad.clamp(-ctx.s, ctx.s) if ctx.clip_grad else grad
        return torch.where(inside, g, 0.0), None, None


SEED_A_STES = ("clip", "identity")


class SeedAQuantizer(nn.Module):
    """QNN-defense's k-bit quantizer: clip(round(x * 2^(k-1)) / 2^(k-1), -1, 1) -> 2^k + 1 levels on [-1, 1].

    The clip keeps TensorFlow's gradient (passed on [-1, 1], boundaries included, unlike ``torch.clamp``),
    so a value rounded to exactly +-1 still gets a gradient. ``ste="clip"`` is the seed's: its ``Round``
    gradient override clips the gradient to [-1, 1] at the rounding, which bounds the gradient reaching x
    to +-2^(k-1); ``ste="identity"`` passes it unclipped (qrobust before issue 12).
    """

    def __init__(self, bits: int, ste: str = "clip") -> None:
        super().__init__()
        self.bits = check_bits(bits, "bits")
        if ste not in SEED_A_STES:
            raise QrobustError(f"k-bit STE must be one of {', '.join(SEED_A_STES)}, got {ste!r}")
        self.ste = ste

    def forward(self, x: Tensor) -> Tensor:
        if self.bits == FULL_PRECISION:
            return x
        return _SeedAQuantizeSTE.apply(x, float(2 ** (self.bits - 1)), self.ste == "clip")

    def extra_repr(self) -> str:
        return f"bits={self.bits}, ste={self.ste}"


def hard_sigmoid(x: Tensor) -> Tensor:
    """clip((x + 1) / 2, 0, 1), the BinaryConnect hard sigmoid."""
    return torch.clamp((x + 1.0) / 2.0, 0.0, 1.0)


RAND_GRADS = ("ste", "none")


class _StochasticBinarySTE(torch.autograd.Function):
    """Forward: exactly +-1 (2 * Bernoulli(p) - 1); backward: the gradient of 2 * hard_sigmoid(w) - 1."""

    @staticmethod
    def forward(ctx, w: Tensor, generator: torch.Generator | None) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(w)
        return torch.bernoulli(hard_sigmoid(w), generator=generator).mul_(2.0).sub_(1.0)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (w,) = ctx.saved_tensors
        inside = (w >= -1.0).logical_and_(w <= 1.0)  # TF clip gradient: boundaries included
        return torch.where(inside, grad, 0.0), None


def stochastic_binary(w: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One draw of 2 * Bernoulli(hard_sigmoid(w)) - 1, exactly +-1, with the straight-through gradient."""
    return _StochasticBinarySTE.apply(w, generator)


class StochasticBinaryWeight(nn.Module):
    """Stochastic binary weights 2 * Bernoulli(hard_sigmoid(w)) - 1, resampled at every forward pass.

    The backward pass uses the gradient of the expectation 2 * hard_sigmoid(w) - 1 (straight-through),
    which is what an EOT attack averages over. Pass ``generator`` for reproducible sampling.
    ``grad="none"`` is QNN-defense's actual behaviour: its Bernoulli sample (a comparison of uniforms with
    the probabilities) has no gradient, so the latent weights never train; inputs still get gradients.
    """

    bits = 1

    def __init__(self, grad: str = "ste") -> None:
        super().__init__()
        if grad not in RAND_GRADS:
            raise QrobustError(f"stochastic weight gradient must be one of {', '.join(RAND_GRADS)}, "
                               f"got {grad!r}")
        self.grad = grad
        self.generator: torch.Generator | None = None

    def forward(self, w: Tensor) -> Tensor:
        if self.grad == "none":
            with torch.no_grad():
                return stochastic_binary(w, self.generator)
        # A custom function rather than ``expected + (sample - expected).detach()``: that composite is
        # not exactly +-1 in floating point (e.g. 0.99999994), so the weights would not be binary.
        return stochastic_binary(w, self.generator)

    def extra_repr(self) -> str:
        return f"grad={self.grad}"


class ScaledReLU(nn.Module):
    """ReLU(x) * alpha with a learnable scalar alpha (init 0.05): QNN-defense's SReLU for randomized BNNs."""

    def __init__(self, init: float = 0.05) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor(float(init)))

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x) * self.alpha
