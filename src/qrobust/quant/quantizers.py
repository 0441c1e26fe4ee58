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


def quantize_unit(x: Tensor, bits: int) -> Tensor:
    """DoReFa Q_k on [0, 1]: round(x * n) / n with n = 2^k - 1 levels above zero (STE)."""
    n = float(2**bits - 1)
    return round_ste(x * n) / n


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
        return 2 * quantize_unit(t, self.bits) - 1

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


class DoReFaActivation(nn.Module):
    """DoReFa k-bit activations: Q_k(clip(x, 0, 1)); the clip has its normal gradient, rounding is STE."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = check_bits(bits, "activation bits")

    def forward(self, x: Tensor) -> Tensor:
        if self.bits == FULL_PRECISION:
            return x
        return quantize_unit(torch.clamp(x, 0.0, 1.0), self.bits)

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

    ``ste="hardtanh"`` passes the gradient where |x| <= 1 (BinaryNet); ``ste="clip"`` is seed A's
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


class SeedAQuantizer(nn.Module):
    """Seed A's k-bit quantizer: clip(round(x * 2^(k-1)) / 2^(k-1), -1, 1) -> 2^k + 1 levels on [-1, 1].

    Rounding is straight-through; the clip keeps its normal gradient.
    """

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = check_bits(bits, "bits")

    def forward(self, x: Tensor) -> Tensor:
        if self.bits == FULL_PRECISION:
            return x
        scale = float(2 ** (self.bits - 1))
        return torch.clamp(round_ste(x * scale) / scale, -1.0, 1.0)

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


def hard_sigmoid(x: Tensor) -> Tensor:
    """clip((x + 1) / 2, 0, 1), the BinaryConnect hard sigmoid."""
    return torch.clamp((x + 1.0) / 2.0, 0.0, 1.0)


class StochasticBinaryWeight(nn.Module):
    """Stochastic binary weights 2 * Bernoulli(hard_sigmoid(w)) - 1, resampled at every forward pass.

    The backward pass uses the gradient of the expectation 2 * hard_sigmoid(w) - 1 (straight-through),
    which is what an EOT attack averages over. Pass ``generator`` for reproducible sampling.
    """

    bits = 1

    def __init__(self) -> None:
        super().__init__()
        self.generator: torch.Generator | None = None

    def forward(self, w: Tensor) -> Tensor:
        p = hard_sigmoid(w)
        sample = torch.bernoulli(p.detach(), generator=self.generator)
        expected = 2 * p - 1
        return expected + (2 * sample - 1 - expected).detach()


class ScaledReLU(nn.Module):
    """ReLU(x) * alpha with a learnable scalar alpha (init 0.05): seed A's SReLU for randomized BNNs."""

    def __init__(self, init: float = 0.05) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor(float(init)))

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x) * self.alpha
