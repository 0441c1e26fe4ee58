"""Quantizers (DoReFa, sign/STE, seed-A k-bit, stochastic binary) and the layers that use them."""

from qrobust.quant.layers import QuantConv2d, QuantLinear
from qrobust.quant.quantizers import (
    FULL_PRECISION,
    DoReFaActivation,
    DoReFaWeight,
    Identity,
    ScaledReLU,
    SeedAQuantizer,
    SignBinarizer,
    StochasticBinaryWeight,
    check_bits,
    hard_sigmoid,
    quantize_unit,
    round_ste,
    stochastic_binary,
)

__all__ = [
    "FULL_PRECISION",
    "DoReFaActivation",
    "DoReFaWeight",
    "Identity",
    "QuantConv2d",
    "QuantLinear",
    "ScaledReLU",
    "SeedAQuantizer",
    "SignBinarizer",
    "StochasticBinaryWeight",
    "check_bits",
    "hard_sigmoid",
    "quantize_unit",
    "round_ste",
    "stochastic_binary",
]
