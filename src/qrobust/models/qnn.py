"""Seed A's MNIST family (Galloway et al. / QNN defense-and-detection): FP, BNN, k-bit QNN, randomized BNN.

All variants end in Dropout - FC256 - ReLU - Dropout - FC10, with the dropout optionally kept on at
inference (``mc_dropout=True``), which is what the seed's detection relies on.
"""

from __future__ import annotations

from torch import Tensor, nn

from qrobust.errors import QrobustError
from qrobust.models.common import MCDropout
from qrobust.models.registry import register_model
from qrobust.quant import (
    QuantConv2d,
    ScaledReLU,
    SeedAQuantizer,
    SignBinarizer,
    StochasticBinaryWeight,
    check_bits,
)

SCHEMES = ("fp", "bnn", "kbit", "rbnn")


class _BinaryBlock(nn.Module):
    """BN -> quantize(activation) -> conv with quantized weights -> nonlinearity."""

    def __init__(self, cin: int, cout: int, weight_quant: nn.Module, act_quant: nn.Module, act: nn.Module):
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.conv = QuantConv2d(cin, cout, 3, bias=False, weight_quant=weight_quant, input_quant=act_quant)
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.conv(self.bn(x)))


class SeedANet(nn.Module):
    def __init__(self, *, scheme: str, bits: int, dropout: float, mc_dropout: bool, sign_ste: str):
        super().__init__()
        if scheme not in SCHEMES:
            raise QrobustError(f"scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}")
        self.scheme = scheme
        conv1 = nn.Conv2d(1, 64, 3, bias=False)
        if scheme == "fp":
            self.features = nn.Sequential(conv1, nn.ReLU(), nn.Conv2d(64, 64, 3, bias=False), nn.ReLU())
            side = 24
        else:
            if scheme == "kbit":
                wq, aq, wq3, aq3 = (SeedAQuantizer(bits) for _ in range(4))
            else:
                wq, aq = SignBinarizer(sign_ste), SignBinarizer(sign_ste)
                aq3 = SignBinarizer(sign_ste)
                wq3 = StochasticBinaryWeight() if scheme == "rbnn" else SignBinarizer(sign_ste)
            act2 = ScaledReLU() if scheme == "rbnn" else nn.ReLU()
            act3 = ScaledReLU() if scheme == "rbnn" else nn.ReLU()
            self.features = nn.Sequential(
                conv1, nn.ReLU(), _BinaryBlock(64, 64, wq, aq, act2), _BinaryBlock(64, 64, wq3, aq3, act3)
            )
            side = 22
        # Latent weights of quantized convs start in [-1, 1]: PyTorch's default init (|w| < 0.05) would
        # round every k-bit weight to 0 and leave stochastic binary weights as fair coin flips.
        for m in self.features.modules():
            if isinstance(m, QuantConv2d):
                nn.init.uniform_(m.weight, -1.0, 1.0)
        self.head = nn.Sequential(
            nn.Flatten(),
            MCDropout(dropout, mc_dropout),
            nn.Linear(64 * side * side, 256, bias=False),
            nn.ReLU(),
            MCDropout(dropout, mc_dropout),
            nn.Linear(256, 10, bias=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def _build(scheme: str, bits: int, dropout: float, mc_dropout: bool, sign_ste: str) -> nn.Module:
    return SeedANet(scheme=scheme, bits=check_bits(bits, "bits"), dropout=dropout, mc_dropout=mc_dropout,
                    sign_ste=sign_ste)


@register_model("qnn_fp", input_shape=(1, 28, 28), description="seed A full-precision MNIST net")
def qnn_fp(*, dropout: float = 0.0, mc_dropout: bool = True) -> nn.Module:
    return _build("fp", 32, dropout, mc_dropout, "clip")


@register_model("qnn_bnn", input_shape=(1, 28, 28), description="seed A binarized net (sign weights/acts)")
def qnn_bnn(*, dropout: float = 0.0, mc_dropout: bool = True, sign_ste: str = "clip") -> nn.Module:
    return _build("bnn", 32, dropout, mc_dropout, sign_ste)


@register_model("qnn_kbit", input_shape=(1, 28, 28), description="seed A k-bit QNN (2^k+1 levels on [-1,1])")
def qnn_kbit(*, bits: int = 4, dropout: float = 0.0, mc_dropout: bool = True) -> nn.Module:
    return _build("kbit", bits, dropout, mc_dropout, "clip")


@register_model("qnn_rbnn", input_shape=(1, 28, 28), description="seed A randomized BNN (stochastic weights)")
def qnn_rbnn(*, dropout: float = 0.0, mc_dropout: bool = True, sign_ste: str = "clip") -> nn.Module:
    return _build("rbnn", 32, dropout, mc_dropout, sign_ste)
