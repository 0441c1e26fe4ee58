"""QNN-defense's MNIST family (after Galloway et al.): FP, BNN, k-bit QNN, randomized BNN.

All variants end in Dropout - FC256 - ReLU - Dropout - FC10, with the dropout optionally kept on at
inference (``mc_dropout=True``), which is what the seed's detection relies on. By default everything is
as the seed's code (``cleverhans_tutorials/tutorial_models.py`` of the fork): no biases anywhere; the
quantized convs' inputs pass ``tf.contrib.layers.batch_norm`` with its defaults (a learned shift, no
scale, decay 0.999); the seed's gradient overrides; the seed's init (conv1 truncated normal 0.1 with
unit-norm filters, quantized convs truncated normal 0.2, FCs normal with unit-norm units). Named
options restore qrobust's former choices: ``bn_scale=True, bn_momentum=0.1`` (PyTorch BN),
``kbit_ste="identity"``, ``rand_grad="ste"``, ``init="legacy"``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qrobust.errors import QrobustError
from qrobust.models.common import CenteredBatchNorm2d, MCDropout, seed_init_
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
INITS = ("seed", "legacy")
TF_BN_MOMENTUM = 0.001  # tf.contrib.layers.batch_norm's decay 0.999


class _BinaryBlock(nn.Module):
    """BN -> quantize(activation) -> conv with quantized weights -> nonlinearity."""

    def __init__(self, cin: int, cout: int, weight_quant: nn.Module, act_quant: nn.Module, act: nn.Module,
                 bn: nn.Module):
        super().__init__()
        self.bn = bn
        self.conv = QuantConv2d(cin, cout, 3, bias=False, weight_quant=weight_quant, input_quant=act_quant)
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.conv(self.bn(x)))


def _quantizers(scheme: str, bits: int, opts: dict) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module]:
    """(weight, activation) quantizers of conv2, then of conv3."""
    if scheme == "kbit":
        return tuple(SeedAQuantizer(bits, opts["kbit_ste"]) for _ in range(4))  # type: ignore[return-value]
    sign = opts["sign_ste"]
    wq3 = StochasticBinaryWeight(opts["rand_grad"]) if scheme == "rbnn" else SignBinarizer(sign)
    return SignBinarizer(sign), SignBinarizer(sign), wq3, SignBinarizer(sign)


class SeedANet(nn.Module):
    def __init__(self, *, scheme: str, bits: int, dropout: float, mc_dropout: bool, sign_ste: str = "clip",
                 kbit_ste: str = "clip", rand_grad: str = "none", bn_scale: bool = False,
                 bn_momentum: float = TF_BN_MOMENTUM, init: str = "seed"):
        super().__init__()
        if scheme not in SCHEMES:
            raise QrobustError(f"scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}")
        if init not in INITS:
            raise QrobustError(f"init must be one of {', '.join(INITS)}, got {init!r}")
        if not 0.0 < bn_momentum <= 1.0:
            raise QrobustError(f"bn_momentum must be in (0, 1] (TF decay = 1 - momentum), got {bn_momentum}")
        self.scheme = scheme
        conv1 = nn.Conv2d(1, 64, 3, bias=False)
        if scheme == "fp":
            self.features = nn.Sequential(conv1, nn.ReLU(), nn.Conv2d(64, 64, 3, bias=False), nn.ReLU())
            side = 24
        else:
            opts = {"kbit_ste": kbit_ste, "sign_ste": sign_ste, "rand_grad": rand_grad}
            wq, aq, wq3, aq3 = _quantizers(scheme, bits, opts)

            def bn() -> nn.Module:
                return (nn.BatchNorm2d(64, momentum=bn_momentum) if bn_scale
                        else CenteredBatchNorm2d(64, momentum=bn_momentum))

            def act() -> nn.Module:
                return ScaledReLU() if scheme == "rbnn" else nn.ReLU()

            self.features = nn.Sequential(
                conv1, nn.ReLU(), _BinaryBlock(64, 64, wq, aq, act(), bn()),
                _BinaryBlock(64, 64, wq3, aq3, act(), bn()),
            )
            side = 22
        self.head = nn.Sequential(
            nn.Flatten(),
            MCDropout(dropout, mc_dropout),
            nn.Linear(64 * side * side, 256, bias=False),
            nn.ReLU(),
            MCDropout(dropout, mc_dropout),
            nn.Linear(256, 10, bias=False),
        )
        self._init(init)

    def _init(self, init: str) -> None:
        quant = [m for m in self.features.modules() if isinstance(m, QuantConv2d)]
        if init == "legacy":
            # qrobust's former init: PyTorch defaults, quantized convs' latent weights uniform on [-1, 1].
            for m in quant:
                nn.init.uniform_(m.weight, -1.0, 1.0)
            return
        # Seed: full-precision convs truncated normal 0.1, unit-norm filters; FCs normal, unit-norm units;
        # binary/k-bit convs truncated normal 0.2, not normalized (within +-0.4: k-bit levels are reached
        # from k = 2 on, sign is +-1 anyway).
        seed_init_(self, 0.1)
        for m in quant:
            with torch.no_grad():
                nn.init.trunc_normal_(m.weight, std=0.2, a=-0.4, b=0.4)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def _build(scheme: str, bits: int, dropout: float, mc_dropout: bool, **opts) -> nn.Module:
    return SeedANet(scheme=scheme, bits=check_bits(bits, "bits"), dropout=dropout, mc_dropout=mc_dropout,
                    **opts)


@register_model("qnn_fp", input_shape=(1, 28, 28), description="QNN-defense full-precision MNIST net")
def qnn_fp(*, dropout: float = 0.0, mc_dropout: bool = True, init: str = "seed") -> nn.Module:
    return _build("fp", 32, dropout, mc_dropout, init=init)


@register_model("qnn_bnn", input_shape=(1, 28, 28),
                description="QNN-defense binarized net (sign weights/acts)")
def qnn_bnn(*, dropout: float = 0.0, mc_dropout: bool = True, sign_ste: str = "clip", bn_scale: bool = False,
            bn_momentum: float = TF_BN_MOMENTUM, init: str = "seed") -> nn.Module:
    return _build("bnn", 32, dropout, mc_dropout, sign_ste=sign_ste, bn_scale=bn_scale,
                  bn_momentum=bn_momentum, init=init)


@register_model("qnn_kbit", input_shape=(1, 28, 28),
                description="QNN-defense k-bit QNN (2^k+1 levels on [-1,1])")
def qnn_kbit(*, bits: int = 4, dropout: float = 0.0, mc_dropout: bool = True, kbit_ste: str = "clip",
             bn_scale: bool = False, bn_momentum: float = TF_BN_MOMENTUM, init: str = "seed") -> nn.Module:
    return _build("kbit", bits, dropout, mc_dropout, kbit_ste=kbit_ste, bn_scale=bn_scale,
                  bn_momentum=bn_momentum, init=init)


@register_model("qnn_rbnn", input_shape=(1, 28, 28),
                description="QNN-defense randomized BNN (stochastic weights)")
def qnn_rbnn(*, dropout: float = 0.0, mc_dropout: bool = True, sign_ste: str = "clip",
             rand_grad: str = "none", bn_scale: bool = False, bn_momentum: float = TF_BN_MOMENTUM,
             init: str = "seed") -> nn.Module:
    return _build("rbnn", 32, dropout, mc_dropout, sign_ste=sign_ste, rand_grad=rand_grad,
                  bn_scale=bn_scale, bn_momentum=bn_momentum, init=init)
