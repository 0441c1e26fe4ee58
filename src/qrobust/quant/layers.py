"""Layers that apply a weight quantizer and an input (activation) quantizer around a standard op."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from qrobust.quant.quantizers import Identity


class QuantConv2d(nn.Conv2d):
    """Conv2d whose weights (and bias) pass through ``weight_quant``, its input through ``input_quant``."""

    def __init__(
        self,
        *args,
        weight_quant: nn.Module | None = None,
        input_quant: nn.Module | None = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.weight_quant = weight_quant if weight_quant is not None else Identity()
        self.input_quant = input_quant if input_quant is not None else Identity()

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight_quant(self.weight)
        b = self.weight_quant(self.bias) if self.bias is not None else None
        return self._conv_forward(self.input_quant(x), w, b)


class QuantLinear(nn.Linear):
    """Linear layer with the same weight/input quantizer hooks as :class:`QuantConv2d`."""

    def __init__(
        self,
        *args,
        weight_quant: nn.Module | None = None,
        input_quant: nn.Module | None = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.weight_quant = weight_quant if weight_quant is not None else Identity()
        self.input_quant = input_quant if input_quant is not None else Identity()

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight_quant(self.weight)
        b = self.weight_quant(self.bias) if self.bias is not None else None
        return F.linear(self.input_quant(x), w, b)
