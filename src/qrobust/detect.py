"""Monte-Carlo inference for randomized models, per-input uncertainty statistics, detection metrics.

Seed A detects adversarial inputs from the spread of T stochastic forward passes (dropout kept on at
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qrobust.errors import QrobustError
from qrobust.models.common import MCDropout
from qrobust.quant import QuantConv2d, QuantLinear, SignBinarizer, StochasticBinaryWeight, stochastic_binary

STRATEGIES = ("auto", "suffix", "repeat", "loop")
ROWS_PER_CHUNK = 1000  # T * inputs per chunk by default: bounds the memory of the widest activation
STAT_NAMES = ("seed_variance", "entropy", "mutual_info", "pred_var")


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
    dominated the cost of Monte-Carlo dropout on seed A's 36,864-wide layer). Otherwise ``rand < keep``.
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
    seed A). ``batch_size`` is the number of inputs per chunk (default: about 1000 / T), so the
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


class MCAverage(nn.Module):
    """Wraps a randomized model: forward returns log of the mean softmax over ``samples`` copies.

    Handy for attacking or evaluating "the Monte-Carlo prediction" (seed A's group decision) with any
    attack that expects logits; the copies are computed batched by :func:`mc_logits`.
    """

    def __init__(self, model: nn.Module, samples: int, strategy: str = "auto") -> None:
        super().__init__()
        self.model, self.samples, self.strategy = model, samples, strategy

    def forward(self, x: Tensor) -> Tensor:
        logits = mc_logits(self.model, x, self.samples, strategy=self.strategy, batch_size=x.shape[0])
        return torch.log(torch.softmax(logits, -1).mean(0).clamp_min(1e-12))


# ----------------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------------


def _entropy(p: Tensor, dim: int = -1) -> Tensor:
    return -(p * torch.log(p.clamp_min(1e-12))).sum(dim)


def uncertainty(probs: Tensor) -> dict[str, Tensor]:
    """Per-input statistics of Monte-Carlo softmaxes ``probs`` (T, N, C); each value has shape (N,).

    * ``seed_variance``: seed A's score, mean over classes of the per-class variance across passes
      (population variance, numpy's ``var``, as the seed computed it);
    * ``entropy``: predictive entropy H[mean_t p_t] (nats);
    * ``mutual_info``: H[mean_t p_t] - mean_t H[p_t] (the epistemic part, >= 0);
    * ``pred_var``: variance across passes of the probability of the Monte-Carlo predicted class.
    """
    if probs.dim() != 3:
        raise QrobustError(f"expected Monte-Carlo probabilities of shape (T, N, classes), got "
                           f"{tuple(probs.shape)}")
    probs = probs.double()
    mean = probs.mean(0)
    var = probs.var(0, unbiased=False)
    pred = mean.argmax(1)
    ent = _entropy(mean)
    mi = (ent - _entropy(probs).mean(0)).clamp_min(0.0)
    return {
        "seed_variance": var.mean(1),
        "entropy": ent,
        "mutual_info": mi,
        "pred_var": var.gather(1, pred[:, None])[:, 0],
    }


def mc_accuracy(probs: Tensor, y: Tensor) -> dict[str, float]:
    """Accuracy of a single pass (mean over passes, and the last pass as the seed logged it) and of
    the Monte-Carlo average ("group accuracy": argmax of the summed softmaxes)."""
    y = y.to(probs.device)
    per_pass = (probs.argmax(-1) == y[None]).double().mean(1)
    return {
        "single_pass": per_pass.mean().item(),
        "last_pass": per_pass[-1].item(),
        "group": (probs.sum(0).argmax(-1) == y).double().mean().item(),
    }


def group_predictions(probs: Tensor) -> Tensor:
    return probs.sum(0).argmax(-1)


# ----------------------------------------------------------------------------------------------------
# Detection metrics
# ----------------------------------------------------------------------------------------------------


def _np(a: Tensor | np.ndarray | Sequence[float]) -> np.ndarray:
    if isinstance(a, Tensor):
        a = a.detach().cpu().double().numpy()
    return np.asarray(a, dtype=np.float64).reshape(-1)


def rank_auc(neg: np.ndarray | Tensor, pos: np.ndarray | Tensor) -> float:
    """ROC-AUC as the Mann-Whitney probability P(score_pos > score_neg) + 0.5 P(equal).

    Used for fast bootstrap resampling; equals scikit-learn's ``roc_auc_score`` (tested).
    """
    neg, pos = _np(neg), _np(pos)
    if len(neg) == 0 or len(pos) == 0:
        return float("nan")
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([neg, pos]))
    return float((ranks[len(neg):].sum() - len(pos) * (len(pos) + 1) / 2) / (len(neg) * len(pos)))


def tpr_at_fpr(neg: np.ndarray | Tensor, pos: np.ndarray | Tensor, fpr: float = 0.05) -> float:
    """Largest true-positive rate over ROC points whose false-positive rate is <= ``fpr``
    (no interpolation: an operating point that really exists on the held-out data)."""
    from sklearn.metrics import roc_curve

    neg, pos = _np(neg), _np(pos)
    if len(neg) == 0 or len(pos) == 0:
        return float("nan")
    f, t, _ = roc_curve(np.r_[np.zeros(len(neg)), np.ones(len(pos))], np.r_[neg, pos])
    return float(t[f <= fpr + 1e-12].max())


def detection_metrics(neg: np.ndarray | Tensor, pos: np.ndarray | Tensor, *, fpr: float = 0.05,
                      bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """ROC-AUC (scikit-learn) and TPR at ``fpr`` for a score that should be higher on ``pos``,
    with a 95% percentile bootstrap interval for the AUC (negatives and positives resampled apart)."""
    from sklearn.metrics import roc_auc_score

    neg, pos = _np(neg), _np(pos)
    out: dict[str, Any] = {"n_neg": len(neg), "n_pos": len(pos)}
    if len(neg) == 0 or len(pos) == 0:
        return {**out, "auc": float("nan"), "auc_ci95": [float("nan")] * 2, f"tpr@{fpr:g}fpr": float("nan")}
    out["auc"] = float(roc_auc_score(np.r_[np.zeros(len(neg)), np.ones(len(pos))], np.r_[neg, pos]))
    out[f"tpr@{fpr:g}fpr"] = tpr_at_fpr(neg, pos, fpr)
    if bootstrap:
        rng = np.random.default_rng(seed)
        aucs = [rank_auc(neg[rng.integers(0, len(neg), len(neg))], pos[rng.integers(0, len(pos), len(pos))])
                for _ in range(bootstrap)]
        out["auc_ci95"] = [float(np.percentile(aucs, 2.5)), float(np.percentile(aucs, 97.5))]
    return out


def seed_lr_score(clean_var: np.ndarray | Tensor, adv_var: np.ndarray | Tensor) -> float:
    """Seed A's detection number: TRAINING accuracy of a 1-D logistic regression on the variance.

    ``LogisticRegression(random_state=0, solver='lbfgs')`` fitted and scored on the same points (no
    held-out split); the seed feeds all attacked inputs, failed attacks included. Kept only to compare
    with the seed's logs; the ROC-AUC on a held-out split is the number to trust.
    """
    from sklearn.linear_model import LogisticRegression

    c, a = _np(clean_var), _np(adv_var)
    feats = np.r_[a, c].reshape(-1, 1)
    labels = np.r_[np.ones(len(a)), np.zeros(len(c))]
    return float(LogisticRegression(random_state=0, solver="lbfgs").fit(feats, labels).score(feats, labels))


def heldout_split(n: int, fraction: float = 0.5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices (fit, held-out) over n inputs; a clean image and its adversarial version stay together."""
    perm = np.random.default_rng(seed).permutation(n)
    k = int(round(n * fraction))
    return np.sort(perm[:k]), np.sort(perm[k:])


@dataclass
class DetectionReport:
    """Everything :func:`evaluate_detection` measured; ``as_dict`` is JSON-ready."""

    samples: int
    n: int
    clean_accuracy: dict[str, float]
    adv_accuracy: dict[str, float]
    mean_stats_clean: dict[str, float]
    mean_stats_adv: dict[str, float]
    seed_lr_score: float
    heldout_all: dict[str, dict[str, Any]]
    heldout_success: dict[str, dict[str, Any]]
    heldout_lr_accuracy: float
    attack_success: int
    n_heldout: int

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def evaluate_detection(
    probs_clean: Tensor, probs_adv: Tensor, y: Tensor, *, heldout_fraction: float = 0.5, seed: int = 0,
    fpr: float = 0.05, bootstrap: int = 1000,
) -> tuple[DetectionReport, dict[str, np.ndarray]]:
    """Compare Monte-Carlo statistics of clean inputs and of their adversarial versions.

    ROC-AUC / TPR are computed on a held-out half of the images (the score itself needs no fitting;
    the split keeps it comparable with the held-out logistic regression fitted on the other half):
    * ``heldout_all``: every attacked input vs every clean input;
    * ``heldout_success``: only images the model got right (group prediction) whose adversarial
      version it gets wrong, vs the clean versions of those same images.
    Returns the report and the per-input statistics (numpy) for plotting.
    """
    from sklearn.linear_model import LogisticRegression

    n = probs_clean.shape[1]
    if probs_adv.shape != probs_clean.shape or len(y) != n:
        raise QrobustError(f"clean and adversarial Monte-Carlo outputs must match: "
                           f"{tuple(probs_clean.shape)} vs {tuple(probs_adv.shape)} for {len(y)} labels")
    sc = {k: v.cpu().numpy() for k, v in uncertainty(probs_clean).items()}
    sa = {k: v.cpu().numpy() for k, v in uncertainty(probs_adv).items()}
    y = y.to(probs_clean.device)
    ok = (group_predictions(probs_clean) == y).cpu().numpy()
    fooled = (group_predictions(probs_adv) != y).cpu().numpy()
    success = ok & fooled
    fit, held = heldout_split(n, 1 - heldout_fraction, seed)
    held_s = held[success[held]]
    all_m = {k: detection_metrics(sc[k][held], sa[k][held], fpr=fpr, bootstrap=bootstrap, seed=seed)
             for k in STAT_NAMES}
    succ_m = {k: detection_metrics(sc[k][held_s], sa[k][held_s], fpr=fpr, bootstrap=bootstrap, seed=seed)
              for k in STAT_NAMES}
    # Honest counterpart of the seed's score: fit the 1-D logistic regression on one half, score the other.
    # The variance is standardized first (on the fit half): raw variances of ~1e-3 leave sklearn's
    # L2-regularized fit at a constant prediction (50%), which is what the seed's raw fit can show.
    f = np.r_[sa["seed_variance"][fit], sc["seed_variance"][fit]].reshape(-1, 1)
    mu, sd = f.mean(), f.std() or 1.0
    lab = np.r_[np.ones(len(fit)), np.zeros(len(fit))]
    lr = LogisticRegression(random_state=0, solver="lbfgs").fit((f - mu) / sd, lab)
    fh = (np.r_[sa["seed_variance"][held], sc["seed_variance"][held]].reshape(-1, 1) - mu) / sd
    heldout_lr = float(lr.score(fh, np.r_[np.ones(len(held)), np.zeros(len(held))]))
    report = DetectionReport(
        samples=probs_clean.shape[0], n=n,
        clean_accuracy=mc_accuracy(probs_clean, y), adv_accuracy=mc_accuracy(probs_adv, y),
        mean_stats_clean={k: float(v.mean()) for k, v in sc.items()},
        mean_stats_adv={k: float(v.mean()) for k, v in sa.items()},
        seed_lr_score=seed_lr_score(sc["seed_variance"], sa["seed_variance"]),
        heldout_all=all_m, heldout_success=succ_m, heldout_lr_accuracy=heldout_lr,
        attack_success=int(success.sum()), n_heldout=len(held),
    )
    curves = {"clean_" + k: v for k, v in sc.items()} | {"adv_" + k: v for k, v in sa.items()}
    curves["heldout"] = held
    curves["success"] = success
    return report, curves


def save_roc_png(path: str | Path, curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str) -> Path:
    """ROC curves (label -> (negative scores, positive scores)) as a PNG, with the AUC in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(4.2, 4.0), dpi=110)
    for label, (neg, pos) in curves.items():
        neg, pos = _np(neg), _np(pos)
        if len(neg) == 0 or len(pos) == 0:
            continue
        ylab = np.r_[np.zeros(len(neg)), np.ones(len(pos))]
        s = np.r_[neg, pos]
        f, t, _ = roc_curve(ylab, s)
        ax.plot(f, t, label=f"{label} (AUC {roc_auc_score(ylab, s):.3f})")
    ax.plot([0, 1], [0, 1], ":", color="grey", lw=0.8)
    ax.axvline(0.05, color="grey", lw=0.5, ls="--")
    ax.set_xlabel("false-positive rate (clean flagged)")
    ax.set_ylabel("true-positive rate (adversarial flagged)")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def seed_variance_loss(logits: Tensor) -> Tensor:
    """Seed A's per-input score from logits of shape (K, B, C), differentiable: used by attacks that
    push the Monte-Carlo uncertainty down."""
    return torch.softmax(logits, -1).var(0, unbiased=False).mean(-1)



@dataclass
class DetectionRun:
    """Result of :func:`run_detection`: the report, per-input statistics, adversarial inputs, timings."""

    report: DetectionReport
    per_input: dict[str, np.ndarray]
    x_adv: Tensor
    probs_clean: Tensor
    probs_adv: Tensor
    attack_seconds: float
    mc_seconds: float
    linf: float
    mean_l2: float


def run_detection(
    model: nn.Module,
    attack: Callable[..., Tensor],
    x: Tensor,
    y: Tensor,
    *,
    samples: int = 50,
    attack_batch: int = 100,
    seed: int = 0,
    probs_clean: Tensor | None = None,
    bootstrap: int = 1000,
    progress: Callable[[int, int], None] | None = None,
) -> DetectionRun:
    """Attack ``x`` (untargeted, the model's own predictions as labels: ``attack(model, xb)``), then
    run ``samples`` Monte-Carlo passes on clean and adversarial inputs and measure detection.

    The model's mode is left as set (seed A: ``eval()`` with dropout kept on by ``MCDropout``). The
    global RNG is seeded with ``seed`` before attacking (dropout masks of single-pass attacks); the
    Monte-Carlo passes use generators seeded ``seed + 1`` (clean) and ``seed + 2`` (adversarial).
    """
    import time

    if len(x) != len(y):
        raise QrobustError(f"{len(x)} images but {len(y)} labels")
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    advs = []
    for i in range(0, len(x), attack_batch):
        advs.append(attack(model, x[i : i + attack_batch]).detach())
        if progress is not None:
            progress(min(i + attack_batch, len(x)), len(x))
    x_adv = torch.cat(advs)
    t1 = time.perf_counter()
    if probs_clean is None:
        probs_clean = mc_probs(model, x, samples, generator=torch.Generator().manual_seed(seed + 1))
    probs_adv = mc_probs(model, x_adv, samples, generator=torch.Generator().manual_seed(seed + 2))
    t2 = time.perf_counter()
    report, per = evaluate_detection(probs_clean, probs_adv, y, seed=seed, bootstrap=bootstrap)
    d = (x_adv - x).flatten(1)
    return DetectionRun(report, per, x_adv, probs_clean, probs_adv, t1 - t0, t2 - t1,
                        float(d.abs().max()) if d.numel() else 0.0, float(d.norm(dim=1).mean()))
