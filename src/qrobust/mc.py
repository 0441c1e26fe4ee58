"""The Monte-Carlo engine: T stochastic forward passes of a randomized model, batched.

It sits below :mod:`qrobust.attacks` (EOT and detector-aware attacks differentiate these passes) and
below :mod:`qrobust.detect` (detection statistics and metrics), so attacks never import detection.

QNN-defense detects adversarial inputs from the spread of T stochastic forward passes (dropout kept on at
inference, or stochastic binary weights). Running the model T times over the data is wasteful: the
part of the network before the first stochastic layer is deterministic. :func:`mc_logits` therefore
runs the deterministic prefix once per input and only the stochastic suffix on T copies:

* the first stochastic layer a batch reaches repeats its input T times along the batch dimension
  (copy-major: row ``t * B + b`` is copy ``t`` of input ``b``), so every later layer sees ``T * B`` rows;
* dropout (:class:`~qrobust.models.common.MCDropout`, ``nn.Dropout`` in training mode) draws an
  independent mask for every row, i.e. for every copy;
* a stochastic-weight layer (:class:`~qrobust.quant.StochasticBinaryWeight` inside
  :class:`~qrobust.quant.QuantConv2d` / :class:`~qrobust.quant.QuantLinear`) normally samples ONE weight
  tensor per forward pass, which would give all T copies the same weights. Here it samples T weight
  tensors (one per copy, shared by the B inputs of that copy exactly as in a plain pass) and applies
  them in one call: a grouped convolution with ``groups = T`` over the copies stacked along channels,
  or a batched matmul for linear layers.

``strategy="repeat"`` repeats the input before the model instead (correct for any per-sample model),
``strategy="loop"`` runs T ordinary passes (the reference). With ``generator`` every stochastic layer
draws from its own stream derived from it, copy after copy, so all three strategies give the SAME
samples (up to float rounding); without it the global RNG is used and results agree in distribution.
A model without active randomness is evaluated once and its output repeated T times.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qrobust.errors import QrobustError
from qrobust.models.common import MCDropout
from qrobust.quant import QuantConv2d, QuantLinear, SignBinarizer, StochasticBinaryWeight, stochastic_binary

STRATEGIES = ("auto", "suffix", "repeat", "loop")
ROWS_PER_CHUNK = 1000  # T * inputs per chunk by default: bounds the memory of the widest activation


# ----------------------------------------------------------------------------------------------------
# Finding the stochastic layers
# ----------------------------------------------------------------------------------------------------


def _dropout_active(m: nn.Module) -> bool:
    if isinstance(m, MCDropout):
        return m.p > 0 and (m.training or m.always_on)
    return type(m) is nn.Dropout and m.p > 0 and m.training


def _unsupported(m: nn.Module) -> bool:
    """Random layers we cannot batch (they would silently be treated as deterministic)."""
    if isinstance(m, nn.Dropout1d | nn.Dropout2d | nn.Dropout3d | nn.AlphaDropout | nn.FeatureAlphaDropout):
        return m.p > 0 and m.training
    return False


def stochastic_modules(model: nn.Module) -> list[nn.Module]:
    """The layers that make ``model``'s output random in its current train/eval mode."""
    found = []
    for m in model.modules():
        quant = isinstance(m, QuantConv2d | QuantLinear)
        if (quant and isinstance(m.weight_quant, StochasticBinaryWeight)) or _dropout_active(m):
            found.append(m)
    return found


def is_stochastic(model: nn.Module) -> bool:
    """True if two forward passes on the same input can differ (dropout on, stochastic weights)."""
    if any(_unsupported(m) for m in model.modules()):
        return True
    stray = [m for m in model.modules() if isinstance(m, StochasticBinaryWeight)]
    return bool(stochastic_modules(model)) or bool(stray)


def _batchable(model: nn.Module) -> bool:
    """Every random layer is one we know how to give per-copy randomness."""
    if any(_unsupported(m) for m in model.modules()):
        return False
    owned = {id(m.weight_quant) for m in model.modules() if isinstance(m, QuantConv2d | QuantLinear)}
    return all(id(m) in owned for m in model.modules() if isinstance(m, StochasticBinaryWeight))


# ----------------------------------------------------------------------------------------------------
# Per-copy sampling
# ----------------------------------------------------------------------------------------------------


def keep_mask(shape: Sequence[int] | torch.Size, keep: float, generator: torch.Generator | None,
              device: torch.device) -> Tensor:
    """Boolean dropout mask, True with probability ``keep``.

    When ``keep * 256`` is a whole number (p = 0.5, 0.25, ...) each element uses one random byte cut
    from 64-bit random words: exact, and about 8x less random-number work than ``bernoulli_`` (which
    dominated the cost of Monte-Carlo dropout on QNN-defense's 36,864-wide layer). Otherwise ``rand < keep``.
    """
    n = math.prod(shape)
    level = keep * 256
    if level == int(level):
        words = torch.randint(-(2**63), 2**63 - 1, ((n + 7) // 8,), dtype=torch.int64, generator=generator,
                              device=device)
        return (words.view(torch.uint8)[:n] < int(level)).view(*shape)
    return torch.rand(tuple(shape), generator=generator, device=device) < keep


def _fast_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


BF16_EXACT_INT = 256  # every integer of magnitude <= 256 is a bfloat16 value (8 significant bits)


def binary_matmul(a: Tensor, b: Tensor) -> Tensor | None:
    """``a @ b`` for entries in {-1, 0, 1}, computed in bfloat16 and still EXACT; None if not applicable.

    The result is returned in bfloat16 (every value an exactly represented integer).

    Products of such entries are exact in bfloat16, the matrix units accumulate in float32 (exact for
    integers), and the result is an integer of magnitude <= K; only rounding it back to bfloat16 could
    lose bits, which cannot happen when every |result| < 256 - checked, with a float32 recomputation
    otherwise. On CPUs with AMX / AVX512-BF16 (and on GPUs) this is about 4x faster than float32: it is
    the stochastic binary conv of the randomized BNN, whose input is sign-binarized. Callers must
    guarantee the value set; returns None (use float32) when bfloat16 is not fast on the device.
    """
    if not _fast_bf16(a.device) or a.dtype != torch.float32:
        return None
    out = torch.matmul(a.to(torch.bfloat16), b.to(torch.bfloat16))
    if out.numel() and a.shape[-1] > BF16_EXACT_INT:  # |result| <= K: nothing to check when K <= 256
        # A true 257 would be stored as 256 and a true value <= 255 is stored exactly, so any stored
        # magnitude >= 256 means a value may have been rounded.
        lo, hi = torch.aminmax(out)
        if max(-lo.item(), hi.item()) >= BF16_EXACT_INT:
            return None
    return out  # bfloat16 holding exact integers; the caller's copy converts it


class _Sampler:
    """Temporarily replaces the forward of every stochastic layer with a per-copy version.

    ``copies`` is the number of Monte-Carlo copies the layers produce per call (T when batched,
    1 in loop mode); ``expand_from`` is the input batch size B at which a layer must first repeat its
    input ``copies`` times (None: the input was already repeated by the caller).
    """

    def __init__(self, model: nn.Module, generators: dict[int, torch.Generator | None]) -> None:
        self.model = model
        self.generators = generators
        self.copies = 1
        self.expand_from: int | None = None
        self.modules = stochastic_modules(model)

    def _expand(self, x: Tensor) -> Tensor:
        if self.expand_from is not None and self.copies > 1:
            if x.shape[0] == self.expand_from:
                return x.repeat(self.copies, *([1] * (x.dim() - 1)))
            if x.shape[0] != self.expand_from * self.copies:
                raise QrobustError(f"Monte-Carlo sampling: a stochastic layer received {x.shape[0]} rows, "
                                   f"expected {self.expand_from} or {self.expand_from * self.copies}; "
                                   "use strategy='repeat' for this model")
        return x

    def _dropout_forward(self, m: nn.Module) -> Callable[[Tensor], Tensor]:
        gen = self.generators.get(id(m))

        def forward(x: Tensor) -> Tensor:
            t = self.copies
            first = t > 1 and self.expand_from is not None and x.shape[0] == self.expand_from
            keep = 1.0 - m.p
            rows = x.shape[0] if first else x.shape[0] // t
            full = (t * rows, *x.shape[1:])
            if gen is None:
                mask = keep_mask(full, keep, None, x.device)
            else:
                shape = (rows, *x.shape[1:])
                mask = torch.cat([keep_mask(shape, keep, gen, x.device) for _ in range(t)])
            if first:
                # Where the copies start, multiply T masks by the shared input broadcast, instead of
                # repeating the input T times first (one full-size pass less).
                scaled = (x * (1.0 / keep)).unsqueeze(0)
                return mask.view(t, *x.shape).to(x.dtype).mul_(scaled).view(full)
            return (x * mask).mul_(1.0 / keep)

        return forward

    def _weights(self, m: nn.Module) -> tuple[Tensor, Tensor | None]:
        """T weight (and bias) samples, drawn in the order T plain passes would draw them."""
        wq: StochasticBinaryWeight = m.weight_quant
        gen = self.generators.get(id(m), wq.generator)

        ws, bs = [], []
        for _ in range(self.copies):
            ws.append(stochastic_binary(m.weight, gen))
            if m.bias is not None:
                bs.append(stochastic_binary(m.bias, gen))
        return torch.stack(ws), (torch.stack(bs) if bs else None)

    def _conv_forward(self, m: QuantConv2d) -> Callable[[Tensor], Tensor]:
        def forward(x: Tensor) -> Tensor:
            if m.padding_mode != "zeros":
                raise QrobustError("Monte-Carlo sampling supports stochastic convolutions with zero padding "
                                   "only")
            t = self.copies
            shared = (t > 1 and x.shape[0] == self.expand_from and m.groups == 1
                      and not isinstance(m.padding, str))
            if shared:
                # All T copies see the same input here (this layer is where they start): unfold it once
                # and apply the T sampled kernels as one matrix product, (T*Cout, Cin*k*k) @ (B, Cin*k*k, L).
                xq = m.input_quant(x)
                w, b = self._weights(m)
                cols = F.unfold(xq, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
                bsz, ck, length = cols.shape
                # One 2-D product (T*Cout, CK) @ (CK, B*L): the fastest GEMM shape, then one copy that
                # reorders (T, Cout, B, L) -> (T, B, Cout, L).
                cols2 = cols.transpose(0, 1).reshape(ck, bsz * length)
                w2 = w.reshape(t * w.shape[1], ck)
                prod = None
                if isinstance(m.input_quant, SignBinarizer) and not torch.is_grad_enabled():
                    prod = binary_matmul(w2, cols2)  # exact bfloat16 product of +-1 entries
                if prod is None:
                    prod = w2 @ cols2
                out = torch.empty(t, bsz, w.shape[1], length, dtype=x.dtype, device=x.device)
                out.copy_(prod.view(t, w.shape[1], bsz, length).transpose(1, 2))
                if b is not None:
                    out += b.reshape(t, 1, -1, 1)
                oh, ow = (
                    (size + 2 * pad - dil * (k - 1) - 1) // st + 1
                    for size, pad, dil, k, st in zip(xq.shape[2:], m.padding, m.dilation, m.kernel_size,
                                                     m.stride, strict=True)
                )
                return out.view(t * bsz, w.shape[1], oh, ow)
            x = m.input_quant(self._expand(x))
            w, b = self._weights(m)
            rows = x.shape[0] // t
            # (T*B, C, H, W) -> (B, T*C, H, W): copy t's channels meet copy t's weights (groups = T).
            xg = x.view(t, rows, *x.shape[1:]).transpose(0, 1).reshape(rows, t * x.shape[1], *x.shape[2:])
            out = F.conv2d(xg, w.reshape(t * w.shape[1], *w.shape[2:]), None if b is None else b.reshape(-1),
                           m.stride, m.padding, m.dilation, m.groups * t)
            out = out.view(rows, t, -1, *out.shape[2:]).transpose(0, 1)
            return out.reshape(t * rows, *out.shape[2:])

        return forward

    def _linear_forward(self, m: QuantLinear) -> Callable[[Tensor], Tensor]:
        def forward(x: Tensor) -> Tensor:
            x = m.input_quant(self._expand(x))
            w, b = self._weights(m)
            t = self.copies
            lead = x.shape[:-1]
            xt = x.reshape(t, -1, x.shape[-1])
            out = torch.bmm(xt, w.transpose(1, 2))
            if b is not None:
                out = out + b[:, None, :]
            return out.reshape(*lead, out.shape[-1])

        return forward

    @contextmanager
    def patched(self):
        for m in self.modules:
            if isinstance(m, QuantConv2d):
                m.forward = self._conv_forward(m)
            elif isinstance(m, QuantLinear):
                m.forward = self._linear_forward(m)
            else:
                m.forward = self._dropout_forward(m)
        try:
            yield
        finally:
            for m in self.modules:
                del m.forward

    def run(self, x: Tensor, copies: int, strategy: str) -> Tensor:
        """Logits of ``copies`` samples for batch ``x``: shape (copies, B, classes)."""
        b = x.shape[0]
        self.copies = copies
        if strategy == "repeat":
            self.expand_from = None
            out = self.model(x.repeat(copies, *([1] * (x.dim() - 1))))
        else:
            self.expand_from = b
            out = self.model(x)
            if out.shape[0] == b and copies > 1:  # no stochastic layer was reached
                out = out.repeat(copies, *([1] * (out.dim() - 1)))
        if out.shape[0] != copies * b:
            raise QrobustError(f"Monte-Carlo sampling: model returned {out.shape[0]} rows for {b} inputs x "
                               f"{copies} copies; use strategy='repeat' or 'loop' for this model")
        return out.view(copies, b, *out.shape[1:])


def _generators(model: nn.Module, generator: torch.Generator | None, device: torch.device
                ) -> dict[int, torch.Generator | None]:
    """One stream per stochastic layer, derived from ``generator`` (same derivation for every strategy)."""
    if generator is None:
        return {}
    mods = stochastic_modules(model)
    seeds = torch.randint(0, 2**62, (max(len(mods), 1),), generator=generator).tolist()
    out: dict[int, torch.Generator | None] = {}
    for m, s in zip(mods, seeds, strict=False):
        g = torch.Generator(device=device)
        g.manual_seed(int(s))
        out[id(m)] = g
    return out


def mc_logits(
    model: nn.Module,
    x: Tensor,
    samples: int = 50,
    *,
    strategy: str = "auto",
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
) -> Tensor:
    """Logits of ``samples`` stochastic forward passes, shape (T, N, classes); keeps autograd.

    The model must already be in the wanted mode (``eval()`` with ``MCDropout(always_on=True)`` for
    QNN-defense). ``batch_size`` is the number of inputs per chunk (default: about 1000 / T), so the
    widest activation holds at most ``T * batch_size`` rows. See the module docstring for strategies.
    """
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise QrobustError(f"number of Monte-Carlo samples must be a positive integer, got {samples!r}")
    if strategy not in STRATEGIES:
        raise QrobustError(f"Monte-Carlo strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if batch_size is not None and batch_size <= 0:
        raise QrobustError(f"batch size must be positive, got {batch_size}")
    n = x.shape[0]
    if n == 0:
        raise QrobustError("no inputs given for Monte-Carlo inference")
    if not is_stochastic(model):
        base = torch.cat([model(x[i : i + (batch_size or 500)]) for i in range(0, n, batch_size or 500)])
        return base.unsqueeze(0).expand(samples, *base.shape)
    if not _batchable(model):
        if strategy in ("suffix", "repeat"):
            raise QrobustError("this model has random layers qrobust cannot batch (e.g. Dropout2d or a "
                               "stochastic weight outside QuantConv2d/QuantLinear); use strategy='loop'")
        strategy = "loop"
    auto = strategy == "auto"
    if auto:
        strategy = "suffix"
    chunk = batch_size or max(1, ROWS_PER_CHUNK // samples)
    outs = []
    while len(outs) * chunk < n:
        i = len(outs) * chunk
        xb = x[i : i + chunk]
        # Fresh per-layer streams for each chunk are derived from `generator` in order, identically
        # for every strategy, so the strategies stay sample-for-sample comparable.
        sampler = _Sampler(model, _generators(model, generator, x.device))
        try:
            with sampler.patched():
                if strategy == "loop":
                    outs.append(torch.cat([sampler.run(xb, 1, "suffix") for _ in range(samples)]))
                else:
                    outs.append(sampler.run(xb, samples, strategy))
        except (RuntimeError, QrobustError):
            # A model whose branches mix T*B and B rows (e.g. a deterministic member beside a stochastic
            # one) cannot share its prefix: auto falls back to repeating the input.
            if not auto or strategy != "suffix" or outs:
                raise
            strategy = "repeat"
    return torch.cat(outs, dim=1)


def mc_probs(model: nn.Module, x: Tensor, samples: int = 50, **kwargs: Any) -> Tensor:
    """Softmax of :func:`mc_logits` without autograd, shape (T, N, classes)."""
    with torch.no_grad():
        return torch.softmax(mc_logits(model, x, samples, **kwargs).float(), dim=-1)


def log_mean_softmax(logits: Tensor, dim: int = 0) -> Tensor:
    """log of the mean softmax over the copies along ``dim``: the Monte-Carlo prediction, usable as logits."""
    return torch.log(torch.softmax(logits, -1).mean(dim).clamp_min(1e-12))


def predictive_variance(probs: Tensor, dim: int = 0) -> Tensor:
    """QNN-defense's uncertainty score: mean over classes of the variance of the softmax across the copies
    along ``dim`` (population variance, numpy's ``var``, as the seed computed it). Differentiable."""
    return probs.var(dim, unbiased=False).mean(-1)


def group_prediction(probs: Tensor) -> Tensor:
    """QNN-defense's group decision from softmaxes (T, N, C): argmax of their sum over the T copies."""
    return probs.sum(0).argmax(-1)


class MCAverage(nn.Module):
    """View of a randomized model: forward returns the log of the mean softmax over ``samples`` copies.

    Lets any attack that expects logits attack "the Monte-Carlo prediction" (QNN-defense's group decision);
    the copies are computed batched by :func:`mc_logits`.
    """

    def __init__(self, model: nn.Module, samples: int, strategy: str = "auto") -> None:
        super().__init__()
        self.model, self.samples, self.strategy = model, samples, strategy

    def forward(self, x: Tensor) -> Tensor:
        logits = mc_logits(self.model, x, self.samples, strategy=self.strategy, batch_size=x.shape[0])
        return log_mean_softmax(logits, 0)


class MCView(nn.Module):
    """View of a randomized model: ``forward(x) -> (B, K, C)``, the logits of ``samples`` copies, so that
    a loss sees every copy of each input (EOT, detector-aware objectives)."""

    def __init__(self, model: nn.Module, samples: int, strategy: str = "auto") -> None:
        super().__init__()
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise QrobustError(f"samples must be a whole number >= 1, got {samples!r}")
        self.model, self.samples, self.strategy = model, samples, strategy

    def forward(self, x: Tensor) -> Tensor:
        out = mc_logits(self.model, x, self.samples, strategy=self.strategy, batch_size=x.shape[0])
        return out.transpose(0, 1)


__all__ = ["BF16_EXACT_INT", "ROWS_PER_CHUNK", "STRATEGIES", "MCAverage", "MCView", "binary_matmul",
           "group_prediction", "is_stochastic", "keep_mask", "log_mean_softmax", "mc_logits", "mc_probs",
           "predictive_variance", "stochastic_modules"]
