"""Per-sample attack losses on a model's raw output.

Every loss returns one value per sample, *increasing* as the attack gets closer to its goal for an
untargeted attack (the attack ascends it) and *decreasing* towards the target class for a targeted
one (the attack descends it). The output is never assumed to be logits beyond what the chosen loss
does with it: an ensemble's legacy view may return probabilities and be attacked with plain ``"ce"``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from qrobust.errors import QrobustError

LossFn = Callable[[Tensor, Tensor], Tensor]
LOSSES = ("ce", "ce_prob", "cw", "dlr", "dlr_targeted")


def ce_loss(outputs: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy with the output taken as logits."""
    return F.cross_entropy(outputs, y, reduction="none")


def ce_prob_loss(outputs: Tensor, y: Tensor) -> Tensor:
    """Softmax of the output fed again to cross-entropy as logits: what the seeds' TF code computed.

    CleverHans' ``model_loss`` was given probabilities and applied ``softmax_cross_entropy_with_logits``
    to them; the resulting gradient is much flatter than plain CE, which partly explains the seeds'
    weak iterative attacks.
    """
    return F.cross_entropy(F.softmax(outputs, dim=1), y, reduction="none")


def margin(outputs: Tensor, y: Tensor) -> Tensor:
    """``max_{j != y} z_j - z_y``: positive once the sample is classified as something other than ``y``."""
    true = outputs.gather(1, y[:, None]).squeeze(1)
    other = outputs.scatter(1, y[:, None], float("-inf")).amax(1)
    return other - true


def cw_loss(outputs: Tensor, y: Tensor) -> Tensor:
    """Carlini-Wagner margin on the output taken as logits (unclamped, so PGD keeps pushing)."""
    return margin(outputs, y)


def _top(outputs: Tensor, k: int, loss: str) -> Tensor:
    if outputs.dim() != 2 or outputs.shape[1] < k:
        raise QrobustError(f"the {loss!r} loss needs outputs of shape (N, C) with C >= {k} classes, got "
                           f"{tuple(outputs.shape)}; use 'ce' or 'cw'")
    return outputs.topk(k, dim=1).values


def dlr_loss(outputs: Tensor, y: Tensor) -> Tensor:
    """Difference of Logits Ratio (Croce & Hein 2020): the margin over ``z_pi1 - z_pi3`` (sorted logits),
    invariant to shifting and rescaling the logits, so large logits cannot mask the gradient."""
    top = _top(outputs, 3, "dlr")
    return margin(outputs, y) / (top[:, 0] - top[:, 2] + 1e-12)


def dlr_targeted_loss(outputs: Tensor, y: Tensor) -> Tensor:
    """Targeted DLR towards class ``y``, descended: ``(max_{j!=y} z_j - z_y) / (z_pi1 - (z_pi3+z_pi4)/2)``.

    Equals the paper's ``(z_true - z_target) / ...`` while the true class still has the top logit, and
    needs no true label, so it fits the ``(outputs, y)`` convention.
    """
    top = _top(outputs, 4, "dlr_targeted")
    return margin(outputs, y) / (top[:, 0] - (top[:, 2] + top[:, 3]) / 2 + 1e-12)


def vote_scores(member_logits: Tensor, k: int | None = None, kappa: float = 0.0) -> Tensor:
    """Per-class vote scores (N, C) of an ensemble from its members' logits (M, N, C).

    ``d[m, :, t] = z_mt - max_{j != t} z_mj`` is positive iff member m votes for t. The score of t is the
    sum, over the ``k`` members closest to voting t (default: a majority, ``M // 2 + 1``), of
    ``min(d, kappa)``; with ``kappa = 0`` it is 0 exactly when k members vote t and negative otherwise.
    A CW margin on these scores is the vote-aware objective: it makes the members easiest to fool agree
    on ONE wrong class, which is what breaks a vote, while the mean logits (or mean softmax) are dominated
    by the most confident member.
    """
    if member_logits.dim() != 3 or member_logits.shape[-1] < 2:
        raise QrobustError(f"vote scores need member logits (members, N, C >= 2), got "
                           f"{tuple(member_logits.shape)}")
    m = member_logits.shape[0]
    k = m // 2 + 1 if k is None else k
    if not 1 <= k <= m:
        raise QrobustError(f"k must be between 1 and the number of members ({m}), got {k}")
    top2 = member_logits.topk(2, dim=-1).values
    other = torch.where(member_logits >= top2[..., :1], top2[..., 1:2], top2[..., :1])
    d = (member_logits - other).clamp(max=kappa)
    return d.topk(k, dim=0).values.sum(0)


_BY_NAME: dict[str, LossFn] = {"ce": ce_loss, "ce_prob": ce_prob_loss, "cw": cw_loss, "dlr": dlr_loss,
                               "dlr_targeted": dlr_targeted_loss}


def resolve_loss(loss: str | LossFn) -> LossFn:
    """Map a loss name or a callable ``(outputs, y) -> per-sample loss`` to a callable."""
    if callable(loss):
        return loss
    if isinstance(loss, str) and loss in _BY_NAME:
        return _BY_NAME[loss]
    raise QrobustError(f"unknown attack loss {loss!r}; use one of {', '.join(LOSSES)} or a callable "
                       "(outputs, y) -> per-sample loss")


def check_per_sample(value: Tensor, batch: int) -> Tensor:
    """A custom loss must return one value per sample (a scalar would mix samples' gradients)."""
    if value.dim() != 1 or value.shape[0] != batch:
        raise QrobustError(f"attack loss must return one value per sample (shape ({batch},)), got shape "
                           f"{tuple(value.shape)}; use reduction='none'")
    return value


__all__ = ["LOSSES", "LossFn", "ce_loss", "ce_prob_loss", "cw_loss", "dlr_loss", "dlr_targeted_loss",
           "margin", "resolve_loss", "vote_scores"]
