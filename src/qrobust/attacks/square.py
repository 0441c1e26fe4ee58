"""Square Attack (Andriushchenko et al. 2020): a score-based random search that needs no gradient.

Each query changes one random square window per image (side shrinking on the paper's schedule of
``p_init``) and keeps the change if the score improved; an image stops being queried once the model is
fooled (per-image early stop). Since it only reads scores, it defeats gradient masking: rounding layers,
quantized activations, and anything a gradient attack cannot move.

Scores: by default the model's output, success on its argmax and the score ``loss(output, y)``
(default the CW margin). A model may instead expose ``attack_scores(x) -> (decision, score)``: success
is judged on ``decision`` (e.g. an ensemble's vote counts) and the score on ``score`` (e.g. the members'
mean logits); ``Scored`` builds such a model from two callables. ``eot_samples=K`` averages both over K
passes (a randomized net's expected score).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from itertools import chain
from typing import Any

import torch
from torch import Tensor, nn

from qrobust.attacks.apgd import check_norm, per_sample_norm
from qrobust.attacks.base import Attack, check_count, check_nonneg, check_positive
from qrobust.attacks.losses import check_per_sample
from qrobust.errors import QrobustError

_SCHEDULE = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)  # p halves after each, out of 10,000 queries


@contextmanager
def nhwc_weights(model: Any) -> Iterator[None]:
    """The model's 4-D CPU weights in channels-last (NHWC) layout while an attack runs, restored after.

    Square is nothing but forward passes, and on CPU oneDNN runs a convolution with NHWC weights about
    1.3x faster forward (MNISTconv, batch 20-100; the backward gains nothing, so APGD does not do this).
    Values are unchanged; outputs move only by float rounding (~1e-6).
    """
    tensors = [] if not isinstance(model, nn.Module) else [
        t for t in chain(model.parameters(), model.buffers())
        if t.dim() == 4 and t.device.type == "cpu" and not t.is_contiguous(memory_format=torch.channels_last)]
    for t in tensors:
        t.data = t.data.contiguous(memory_format=torch.channels_last)
    try:
        yield
    finally:
        for t in tensors:
            t.data = t.data.contiguous()


class Scored(nn.Module):
    """A model whose success is decided by one output and whose attack score comes from another.

    ``forward`` returns ``decide(x)`` (so labels and evaluation use the decision); ``attack_scores``
    returns both, for score-based attacks.
    """

    def __init__(self, decide: Callable[[Tensor], Tensor], score: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.decide, self.score = decide, score

    def forward(self, x: Tensor) -> Tensor:
        return self.decide(x)

    def attack_scores(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.decide(x), self.score(x)


@torch.no_grad()
def decision_and_score(model: Any, x: Tensor, samples: int = 1) -> tuple[Tensor, Tensor]:
    """``model.attack_scores(x)`` if the model has it, else ``(model(x), model(x))``; averaged over
    ``samples`` passes."""
    fn = getattr(model, "attack_scores", None)
    dec = score = None
    for _ in range(samples):
        d, s = fn(x) if fn is not None else (model(x),) * 2
        dec, score = (d, s) if dec is None else (dec + d, score + s)
    return (dec / samples, score / samples) if samples > 1 else (dec, score)


def p_schedule(p_init: float, it: int, n_queries: int) -> float:
    """The paper's fraction of pixels to change at iteration ``it``, its schedule rescaled to the budget."""
    it = int(it / n_queries * 10000)
    return p_init / 2 ** sum(it > t for t in _SCHEDULE)


def _gaussian_rect(rows: int, cols: int) -> Tensor:
    """The paper's pseudo-Gaussian bump: nested rectangles weighted 1/(k+1)^2, unit L2 norm."""
    r, c = torch.arange(rows), torch.arange(cols)
    ring = torch.maximum((r[:, None] - rows // 2).abs(), (c[None, :] - cols // 2).abs())  # Chebyshev
    terms = 1.0 / (torch.arange(max(rows, cols) // 2 + 1, dtype=torch.float64) + 1) ** 2
    bump = terms.flip(0).cumsum(0).flip(0)[ring]  # sum over the rectangles k >= ring of 1 / (k + 1)^2
    return bump / bump.norm()


def square_bump(s: int) -> Tensor:
    """An s x s window: a positive bump on the top half, a negative one on the bottom, unit norm."""
    top = _gaussian_rect(s // 2, s)
    bump = torch.cat([top, -_gaussian_rect(s - s // 2, s)]) if s > 1 else torch.ones(1, 1)
    return (bump / bump.norm()).float()


def window_mask(rows: Tensor, cols: Tensor, h: int, w: int) -> Tensor:
    """(N, 1, h, w) mask of each image's window, from its row and column indices (N, s)."""
    r = torch.zeros(len(rows), h, dtype=torch.bool, device=rows.device).scatter_(1, rows, True)
    c = torch.zeros(len(cols), w, dtype=torch.bool, device=cols.device).scatter_(1, cols, True)
    return (r[:, :, None] & c[:, None, :])[:, None]


class Square(Attack):
    """Square Attack, ``norm`` "Linf" or "L2", at most ``n_queries`` model queries per image.

    ``loss``: the score each query tries to improve, in the attacks' convention (ascended untargeted,
    descended towards the target); "cw" is the paper's margin loss. The random windows and signs are
    drawn per image from the call's generator, so a seed reproduces the attack exactly.
    """

    name = "square"
    version = "2"  # 2: L2 windows take the mass of all channels (stronger on colour images)

    def __init__(self, eps: float = 0.3, n_queries: int = 5000, norm: str = "Linf", p_init: float = 0.8,
                 *, loss: Any = "cw", targeted: bool = False, eot_samples: int = 1, seed: int = 0,
                 bounds: tuple[float, float] = (0.0, 1.0)) -> None:
        super().__init__(loss=loss, targeted=targeted, eot_samples=eot_samples, seed=seed, bounds=bounds)
        self.eps = check_nonneg("eps", eps)
        self.n_queries = check_count("n_queries", n_queries)
        self.norm = check_norm(norm)
        self.p_init = check_positive("p_init", p_init)
        self._queries: Tensor | None = None

    def run_counted(self, model: nn.Module, x: Tensor, y: Tensor | int | None = None, *,
                    generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Like calling the attack, also returning the queries spent per image (fooled images stop early)."""
        self._queries = torch.zeros(len(x), dtype=torch.long)
        x_adv = self(model, x, y, generator=generator)
        queries, self._queries = self._queries, None
        return x_adv, queries

    def _objective(self, model: Any, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """(score to minimise, success) of each image."""
        dec, score = decision_and_score(model, x, self.eot_samples)
        loss = check_per_sample(self.loss_fn(score, y), len(y))
        return (loss if self.targeted else -loss), self._success(dec, y)

    @torch.no_grad()
    def _run(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator) -> Tensor:
        if x.dim() != 4:
            raise QrobustError(f"Square attacks images (N, C, H, W), got shape {tuple(x.shape)}")
        if self.eps == 0:
            return x.clone()
        with nhwc_weights(model):
            return self._search(model, x, y, generator)

    def _search(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator) -> Tensor:
        n = len(x)
        best = self._init(x, generator)
        obj, done = self._objective(model, best, y)
        queries = torch.ones(n, dtype=torch.long, device=x.device)
        active = (~done).nonzero().squeeze(1)
        xa, ba, oa, ya = x[active], best[active], obj[active], y[active]
        for it in range(self.n_queries - 1):
            if len(active) == 0:
                break
            new = self._propose(xa, ba, it, generator)
            new_obj, fooled = self._objective(model, new, ya)
            keep = (new_obj < oa) | fooled
            ba = torch.where(keep.view(-1, 1, 1, 1), new, ba)
            oa = torch.where(keep, new_obj, oa)
            if fooled.any():  # write back the finished images, keep attacking the rest
                best[active] = ba
                queries[active[fooled]] = it + 2
                active, keep_on = active[~fooled], ~fooled
                xa, ba, oa, ya = xa[keep_on], ba[keep_on], oa[keep_on], ya[keep_on]
        best[active] = ba
        queries[active] = self.n_queries
        if self._queries is not None:
            self._queries = queries.cpu()
        return best

    # -- proposals --
    def _init(self, x: Tensor, gen: torch.Generator) -> Tensor:
        n, c, h, w = x.shape
        if self.norm == "Linf":  # vertical stripes of +-eps
            signs = torch.randint(0, 2, (n, c, 1, w), generator=gen).to(x) * 2 - 1
            return (x + self.eps * signs).clamp_(*self.bounds)
        s = max(min(h, w) // 5, 1)
        nh, nw = h // s, w // s
        signs = (torch.randint(0, 2, (n, c, nh, nw), generator=gen) * 2 - 1).float()
        flip = torch.randint(0, 2, (n, 1, nh, nw), generator=gen).bool()  # each bump randomly transposed
        bump = square_bump(s)

        def cells(t: torch.Tensor) -> torch.Tensor:
            return t.repeat_interleave(s, 2).repeat_interleave(s, 3)
        delta = cells(signs) * torch.where(cells(flip), bump.t().repeat(nh, nw), bump.repeat(nh, nw))
        top, left = (h - nh * s) // 2, (w - nw * s) // 2
        full = x.new_zeros(x.shape)
        full[:, :, top:top + nh * s, left:left + nw * s] = delta.to(x)
        return (x + self.eps * full / per_sample_norm(full).clamp_min(1e-12)).clamp_(*self.bounds)

    def _side(self, it: int, c: int, h: int, w: int) -> int:
        side = round(math.sqrt(self.p_schedule(it) * h * w))
        if self.norm == "Linf":
            return min(max(side, 1), max(min(h, w) - 1, 1))
        side = max(side, 3)
        return min(side + 1 - side % 2, min(h, w))  # odd, as the paper's L2 windows

    def p_schedule(self, it: int) -> float:
        return p_schedule(self.p_init, it, self.n_queries)

    def _window(self, n: int, s: int, h: int, w: int, gen: torch.Generator, device: torch.device
                ) -> tuple[Tensor, Tensor]:
        """Row and column indices (n, s) of one random s x s window per image; as the authors' code, a
        window never starts at the last possible row or column (unless it covers the whole side)."""
        corner = torch.rand(n, 2, generator=gen)
        top = (corner[:, 0] * max(h - s, 1)).long()
        left = (corner[:, 1] * max(w - s, 1)).long()
        span = torch.arange(s)
        return (top[:, None] + span).to(device), (left[:, None] + span).to(device)

    def _propose(self, x: Tensor, best: Tensor, it: int, gen: torch.Generator) -> Tensor:
        n, c, h, w = x.shape
        s = self._side(it, c, h, w)
        rows, cols = self._window(n, s, h, w, gen, x.device)
        signs = (torch.randint(0, 2, (n, c, 1, 1), generator=gen) * 2 - 1).to(x)
        if self.norm == "Linf":
            return self._propose_linf(x, best, window_mask(rows, cols, h, w), signs, gen)
        idx = (torch.arange(n, device=x.device)[:, None, None, None],
               torch.arange(c, device=x.device)[None, :, None, None], rows[:, None, :, None],
               cols[:, None, None, :])
        return self._propose_l2(x, best, idx, signs, s, gen)

    def _propose_linf(self, x: Tensor, best: Tensor, inside: Tensor, signs: Tensor,
                      gen: torch.Generator) -> Tensor:
        """Set the window (``inside``, a mask) to a vertex of the eps box (one sign per channel); a proposal
        that would not change the window is redrawn among the other sign patterns, as in the paper.
        Whole-image masked ops: cheaper per query than gathering and scattering the window."""
        new = (x + self.eps * signs).clamp_(*self.bounds)
        same = (new - best).abs_().mul_(inside).flatten(1).amax(1) < 1e-7
        if same.any():
            c = x.shape[1]
            pick = torch.randint(1, 2 ** min(c, 62), (len(x),), generator=gen).to(x.device)
            flip = (pick[:, None] >> torch.arange(c, device=x.device)) & 1
            signs = torch.where(same[:, None, None, None] & (flip[:, :, None, None] == 1), -signs, signs)
            new = (x + self.eps * signs).clamp_(*self.bounds)
        return torch.where(inside, new, best)

    def _propose_l2(self, x: Tensor, best: Tensor, idx: tuple[Tensor, ...], signs: Tensor, s: int,
                    gen: torch.Generator) -> Tensor:
        """Move the perturbation mass of a second random window into the first, reshaped as the paper's
        two-bump pattern, and rescale the whole perturbation to norm eps.

        Each channel's new window gets the mass of both windows over ALL channels (as torchattacks), not
        its own channel's (the authors' code): on 3-channel images that concentrates the perturbation
        faster and is stronger (tests/test_apgd_square.py: 3-channel Square-L2 vs torchattacks); on
        one channel the two are the same."""
        n, c, h, w = x.shape
        delta = best - x
        rows2, cols2 = self._window(n, s, h, w, gen, x.device)
        idx2 = (*idx[:2], rows2[:, None, :, None], cols2[:, None, None, :])
        both = window_mask(idx[2].flatten(1), idx[3].flatten(1), h, w) | window_mask(rows2, cols2, h, w)
        old = delta[idx]
        window_mass = (delta * both).square().sum((1, 2, 3), keepdim=True)  # over all channels
        spare = (self.eps ** 2 - delta.flatten(1).square().sum(1)).clamp_(min=0).view(n, 1, 1, 1) / c
        bump = square_bump(s).to(x)
        transpose = torch.rand(n, generator=gen).to(x.device) < 0.5
        bump = torch.where(transpose[:, None, None, None], bump.t(), bump)
        patch = bump * signs + old / (old.square().sum((2, 3), keepdim=True).sqrt() + 1e-10)
        patch = patch / patch.square().sum((2, 3), keepdim=True).sqrt().clamp_min(1e-12) \
            * (spare + window_mass).sqrt()
        delta[idx2] = 0.0
        delta[idx] = patch
        return (x + delta * (self.eps / per_sample_norm(delta).clamp_min(1e-12))).clamp_(*self.bounds)
