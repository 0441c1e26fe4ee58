"""Layers that apply a weight quantizer and an input (activation) quantizer around a standard op."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from qrobust.quant.quantizers import Identity


class _QuantHooks(nn.Module):
    """The weight, bias and input quantizers around a standard layer's op.

    ``bias_quant=None`` quantizes the bias with the weight quantizer (DoReFa's layers; a zero bias then
    becomes a nonzero level); pass :class:`~qrobust.quant.quantizers.Identity` to keep it full precision,
    as Brevitas and integer inference (32-bit accumulator biases) do.
    """

    weight: Tensor
    bias: Tensor | None

    def __init__(
        self,
        *args,
        weight_quant: nn.Module | None = None,
        input_quant: nn.Module | None = None,
        bias_quant: nn.Module | None = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.weight_quant = weight_quant if weight_quant is not None else Identity()
        self.input_quant = input_quant if input_quant is not None else Identity()
        self.bias_quant = bias_quant  # None: the weight quantizer (not aliased, so it is registered once)

    def quantized(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """The quantized input, weights and bias of one call."""
        w = self.weight_quant(self.weight)  # weights, bias, then input: the order random quantizers draw in
        bias_quant = self.bias_quant if self.bias_quant is not None else self.weight_quant
        b = bias_quant(self.bias) if self.bias is not None else None
        return self.input_quant(x), w, b


class QuantConv2d(_QuantHooks, nn.Conv2d):
    """Conv2d whose weights (and bias) pass through ``weight_quant``, its input through ``input_quant``."""

    def forward(self, x: Tensor) -> Tensor:
        x, w, b = self.quantized(x)
        return self._conv_forward(x, w, b)


class QuantLinear(_QuantHooks, nn.Linear):
    """Linear layer with the same weight/input quantizer hooks as :class:`QuantConv2d`."""

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(*self.quantized(x))
