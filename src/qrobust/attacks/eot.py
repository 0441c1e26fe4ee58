"""Input gradients, averaged over several stochastic passes (Expectation over Transformation).

A model with randomness at inference (dropout kept on, stochastic binary weights) gives a different
gradient at every pass; one sample of it is what the seeds attacked with and understates such a
model's vulnerability (Athalye et al. 2018). ``samples=K`` averages the loss gradient over K
independent forward/backward passes. Passes run one after the other (not as one K-times larger
batch) because a stochastic-weight layer samples one weight per pass, shared by the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from qrobust.attacks.losses import check_per_sample


def input_gradient(model: nn.Module, x: Tensor, y: Tensor, loss_fn: Callable[[Tensor, Tensor], Tensor],
                   samples: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """Gradient of ``sum(loss_fn(model(x), y))`` w.r.t. ``x``, averaged over ``samples`` passes.

    Returns ``(grad, loss, outputs)``; ``loss`` (per sample) and ``outputs`` are detached and
    averaged over the passes, so callers can test success without another forward pass.
    Only the input gradient is computed (``autograd.grad``), never the weights' gradients, and the
    model's train/eval mode is left to the caller.
    """
    grad = loss_total = out_total = None
    for _ in range(samples):
        xr = x.detach().requires_grad_(True)
        with torch.enable_grad():
            out = model(xr)
            loss = check_per_sample(loss_fn(out, y), x.shape[0])
            (g,) = torch.autograd.grad(loss.sum(), xr)
        if grad is None:
            grad, loss_total, out_total = g, loss.detach(), out.detach()
        else:
            grad.add_(g)
            loss_total = loss_total + loss.detach()
            out_total = out_total + out.detach()
    if samples > 1:
        grad.div_(samples)
        loss_total = loss_total / samples
        out_total = out_total / samples
    return grad, loss_total, out_total


@torch.no_grad()
def mean_output(model: nn.Module, x: Tensor, samples: int = 1) -> Tensor:
    """Model output averaged over ``samples`` stochastic passes (one pass for deterministic models)."""
    out = model(x)
    for _ in range(samples - 1):
        out = out + model(x)
    return out / samples if samples > 1 else out


class EOT(nn.Module):
    """Wrap a stochastic model so that one call returns its output averaged over ``samples`` passes.

    Useful to attack the *expected* prediction with any attack (including ones that do not take
    ``eot_samples``); gradients flow through every pass.
    """

    def __init__(self, model: nn.Module, samples: int) -> None:
        super().__init__()
        if samples < 1:
            from qrobust.errors import QrobustError

            raise QrobustError(f"EOT needs at least 1 sample, got {samples}")
        self.model = model
        self.samples = int(samples)

    def forward(self, x: Tensor) -> Tensor:
        out = self.model(x)
        for _ in range(self.samples - 1):
            out = out + self.model(x)
        return out / self.samples
