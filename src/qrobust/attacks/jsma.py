"""Jacobian-based Saliency Map Attack (Papernot et al. 2016) with the paper's pixel-PAIR saliency, batched.

At each iteration, for every sample still running, it picks the pair (p, q) of features in the
search domain maximising ``-alpha * beta`` subject to ``alpha > 0, beta < 0`` (increasing features,
``theta > 0``) or ``alpha < 0, beta > 0`` (decreasing, ``theta < 0``), where
``alpha = dZ_t/dx_p + dZ_t/dx_q`` (target class) and ``beta`` the same for the sum of all other
classes, then moves both features by ``theta`` and removes them from the domain (CleverHans'
rule, which both seeds ran). It stops when the target class is reached, the domain is exhausted,
or ``gamma`` of the features have been changed.

Only two rows of the Jacobian matter for this saliency: the target's gradient and the gradient of
the sum of the other classes' outputs. They are two vector-Jacobian products of one forward pass
(``grad_outputs`` = one-hot(t) and 1 - one-hot(t)), so an iteration costs one forward and two
backward passes whatever the number of classes, instead of one backward per class.

The pair search scores all k x k candidate pairs of a chunk of samples at once (chunks sized to stay
under ``max_pair_elements`` scores). The candidates are the ``max_candidates / 2`` domain features
with the largest target gradient and the ``max_candidates / 2`` with the most negative other-class
gradient (signs flipped when decreasing); the search is exact among them. This bounds memory and
time for any input size (224x224x3 has 150k features, 2e10 pairs). It is a pruning, not a proof: on the
seed-exact MNISTconv (no biases) it picked exactly the pairs of the exhaustive 784 x 784 search
(``max_candidates=None``) at the default 256 and at 128 candidates, while 64 changed one image of ten.

``saliency="target"`` instead picks the two domain features with the largest (smallest when
decreasing) target-class gradient, as ART's ``SaliencyMapMethod`` does; it needs one backward pass
per iteration and reproduces ART's result.

Differences to CleverHans' reference: a sample with no pair satisfying the sign conditions stops
(CleverHans would silently modify feature 0), and the output is differentiated as returned by the
model (logits for qrobust models, as in CleverHans; probabilities if the model returns those).
Untargeted use (``targeted=False``) draws a random target different from the label (what the seeds
did through CleverHans); success is then any misclassification.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from qrobust.attacks.base import Attack, check_count, random_targets
from qrobust.attacks.eot import mean_output
from qrobust.errors import QrobustError


class JSMA(Attack):
    """JSMA; the seeds: theta 1, gamma 0.1, random target."""

    name = "jsma"
    uses_loss = False

    def __init__(self, theta: float = 1.0, gamma: float = 0.1, *, targeted: bool = False,
                 saliency: str = "pairs", max_candidates: int | None = 256, max_pair_elements: int = 1 << 24,
                 eot_samples: int = 1, seed: int = 0, bounds: tuple[float, float] = (0.0, 1.0)) -> None:
        super().__init__(loss="ce", targeted=targeted, eot_samples=eot_samples, seed=seed, bounds=bounds)
        try:
            theta, gamma = float(theta), float(gamma)
        except (TypeError, ValueError) as exc:
            raise QrobustError(f"theta and gamma must be numbers, got {theta!r}, {gamma!r}") from exc
        if not math.isfinite(theta) or theta == 0 or abs(theta) > 1:
            raise QrobustError(f"theta must be in [-1, 0) or (0, 1] (fraction of the pixel range added per "
                               f"step; > 0 increases, < 0 decreases features), got {theta}")
        if not 0 < gamma <= 1:
            raise QrobustError(f"gamma (maximum fraction of features changed) must be in (0, 1], got {gamma}")
        if saliency not in ("pairs", "target"):
            raise QrobustError(f"saliency must be 'pairs' (the paper's pair saliency) or 'target' (ART's "
                               f"top-2 of the target gradient), got {saliency!r}")
        self.theta = theta
        self.saliency = saliency
        self.gamma = gamma
        self.max_candidates = (None if max_candidates is None
                               else check_count("max_candidates", max_candidates, minimum=2))
        self.max_pair_elements = check_count("max_pair_elements", max_pair_elements, minimum=4)

    # -- one forward, two vector-Jacobian products --
    def _saliency_rows(self, model: nn.Module, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Return (d Z_t / dx, d sum_{j != t} Z_j / dx, mean output), flattened per sample."""
        a_tot = b_tot = out_tot = None
        for _ in range(self.eot_samples):
            xr = x.detach().requires_grad_(True)
            with torch.enable_grad():
                out = model(xr)
                onehot = torch.zeros_like(out).scatter_(1, t[:, None], 1.0)
                pairs = self.saliency == "pairs"
                (a,) = torch.autograd.grad(out, xr, grad_outputs=onehot, retain_graph=pairs)
                b = torch.autograd.grad(out, xr, grad_outputs=1.0 - onehot)[0] if pairs else a
            if a_tot is None:
                a_tot, b_tot, out_tot = a, b, out.detach()
            else:
                a_tot, b_tot, out_tot = a_tot + a, b_tot + b, out_tot + out.detach()
        return a_tot.flatten(1), b_tot.flatten(1), out_tot

    def _best_pairs(self, a: Tensor, b: Tensor, dom: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Best feature pair per sample: indices p, q and whether a pair satisfying the conditions exists.

        With ``s = sign(theta)`` the paper's conditions and score become ``relu(s*alpha) * relu(-s*beta)``,
        positive exactly for the valid pairs; features outside the domain get a large negative ``s*a``
        so that no pair containing them scores above 0.
        """
        big = torch.finfo(a.dtype).max / 8
        sa = (a if self.theta > 0 else -a).masked_fill(~dom, -big)
        if self.saliency == "target":  # ART's shortcut: the two features with the largest target gradient
            top = sa.topk(2, dim=1).indices
            return top[:, 0], top[:, 1], torch.ones(len(a), dtype=torch.bool, device=a.device)
        sb = (-b if self.theta > 0 else b).masked_fill(~dom, -big)
        n = a.shape[1]
        if self.max_candidates is None or n <= self.max_candidates:
            return self._search(sa, sb, None)
        k = self.max_candidates // 2
        cand = torch.cat([sa.topk(k, dim=1).indices, sb.topk(self.max_candidates - k, dim=1).indices], dim=1)
        p, q, ok = self._search(sa.gather(1, cand), sb.gather(1, cand), cand)
        return cand.gather(1, p[:, None]).squeeze(1), cand.gather(1, q[:, None]).squeeze(1), ok

    def _search(self, sa: Tensor, sb: Tensor, cand: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """Exhaustive pair search over the columns of ``sa``/``sb``, in chunks of samples."""
        bsz, n = sa.shape
        chunk = max(1, self.max_pair_elements // (n * n))
        ps, qs, oks = [], [], []
        for s in range(0, bsz, chunk):
            ac, bc = sa[s : s + chunk], sb[s : s + chunk]
            score = (ac[:, :, None] + ac[:, None, :]).relu_()
            score.mul_((bc[:, :, None] + bc[:, None, :]).relu_())
            if cand is None:
                score.diagonal(dim1=1, dim2=2).zero_()
            else:  # the same feature may be a candidate twice
                cc = cand[s : s + chunk]
                score.masked_fill_(cc[:, :, None] == cc[:, None, :], 0.0)
            best, idx = score.flatten(1).max(1)
            ps.append(idx // n)
            qs.append(idx % n)
            oks.append(best > 0)
        return torch.cat(ps), torch.cat(qs), torch.cat(oks)

    def _run(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator) -> Tensor:
        lo, hi = self.bounds
        shape = x.shape
        if self.targeted:
            targets = y
        else:
            num_classes = mean_output(model, x[:1]).shape[1]
            targets = random_targets(y, num_classes, generator)
        adv = x.flatten(1).clone()
        n = adv.shape[1]
        step = self.theta * (hi - lo)
        dom = adv < hi if self.theta > 0 else adv > lo
        active = torch.ones(len(x), dtype=torch.bool, device=x.device)
        for _ in range(int(math.floor(n * self.gamma / 2))):
            idx = active.nonzero().squeeze(1)
            if len(idx) == 0:
                break
            t = targets[idx]
            a, b, out = self._saliency_rows(model, adv[idx].view(len(idx), *shape[1:]), t)
            d = dom[idx]
            still = (out.argmax(1) != t) & (d.sum(1) >= 2)
            p, q, ok = self._best_pairs(a, b, d)
            go = still & ok
            active[idx[~go]] = False
            rows, p, q = idx[go], p[go], q[go]
            for f in (p, q):
                adv[rows, f] = (adv[rows, f] + step).clamp_(lo, hi)
                dom[rows, f] = False
        return adv.view(shape)
