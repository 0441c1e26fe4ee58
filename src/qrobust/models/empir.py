"""EMPIR's model families: MNISTconv, CIFARconv and the DoReFa AlexNet (``shared/spec/seed-systems.md``).

Every conv layer of MNISTconv/CIFARconv quantizes its input with k-bit activations, including
conv1, so the image itself is quantized to 2^abits levels; fully connected layers stay full
precision. AlexNet keeps conv1 and the last FC full precision.

MNISTconv and CIFARconv have no bias anywhere, as EMPIR's ``Conv2D``, ``Conv2D_lowprecision``
(``useBias=False``), ``HiddenLinear`` and ``Linear`` (its checkpoints hold only ``k`` and ``W``
variables). ``extra_bias=True`` restores qrobust's former layout (a bias on the final Linear, and on
CIFARconv's convs), where at wbits < 32 a zero bias quantizes to +1/3 (2 bits) in every channel.
"""

from __future__ import annotations

from torch import Tensor, nn

from qrobust.models.common import MaxPoolSame, MCDropout, Normalize, seed_init_
from qrobust.models.registry import register_model
from qrobust.quant import (
    FULL_PRECISION,
    DoReFaActivation,
    DoReFaWeight,
    Identity,
    QuantConv2d,
    QuantLinear,
    check_bits,
)


def _qconv(cin: int, cout: int, k: int, *, wbits: int, abits: int, fp_bias: bool = False,
           **kw) -> QuantConv2d:
    """A DoReFa conv; ``fp_bias`` keeps its bias full precision (else DoReFa-quantized like the weights)."""
    return QuantConv2d(cin, cout, k, weight_quant=DoReFaWeight(wbits), input_quant=DoReFaActivation(abits),
                       bias_quant=Identity() if fp_bias else None, **kw)


def _init_std(wbits: int, abits: int) -> float:
    return 0.1 if wbits == FULL_PRECISION and abits == FULL_PRECISION else 0.2


class MNISTConv(nn.Module):
    """conv64 8x8/2 SAME - conv128 6x6/2 VALID - conv128 5x5/1 VALID - linear 10; ReLU, no bias.

    ``bias=True`` gives every layer a bias, as CleverHans' ``ModelBasicCNN`` (the same net): without one
    the first layer cannot learn the input thresholds (ReLU(x - t)) that robust MNIST models use at
    eps 0.3 (Madry et al. 2018, their Fig. on conv1 filters), see docs/results/adversarial_training.md.
    These biases stay full precision at any wbits (a DoReFa-quantized bias cannot be zero), so a quantized
    net can start from a full-precision one.
    """

    def __init__(self, *, wbits: int, abits: int, dropout: float, mc_dropout: bool, extra_bias: bool = False,
                 bias: bool = False, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            _qconv(1, 64, 8, stride=2, padding=3, bias=bias, fp_bias=True, wbits=wbits, abits=abits),
            nn.ReLU(),
            _qconv(64, 128, 6, stride=2, padding=0, bias=bias, fp_bias=True, wbits=wbits, abits=abits),
            nn.ReLU(),
            _qconv(128, 128, 5, stride=1, padding=0, bias=bias, fp_bias=True, wbits=wbits, abits=abits),
            nn.ReLU(),
            nn.Flatten(),
        )
        self.dropout = MCDropout(dropout, mc_dropout)
        self.classifier = nn.Linear(128, num_classes, bias=extra_bias or bias)
        seed_init_(self, _init_std(wbits, abits))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.dropout(self.features(x)))


@register_model("mnistconv", input_shape=(1, 28, 28), description="EMPIR MNISTconv (DoReFa wbits/abits)")
def mnistconv(*, wbits: int = 32, abits: int = 32, dropout: float = 0.0, mc_dropout: bool = False,
              extra_bias: bool = False, bias: bool = False) -> nn.Module:
    return MNISTConv(wbits=check_bits(wbits, "wbits"), abits=check_bits(abits, "abits"), dropout=dropout,
                     mc_dropout=mc_dropout, extra_bias=bool(extra_bias), bias=bool(bias))


class CIFARConv(nn.Module):
    """cifar10_quick-like: conv32-maxpool-ReLU, conv32-ReLU-avgpool, conv64-ReLU-avgpool, FC64 (linear),
    FC10; no bias anywhere (EMPIR)."""

    def __init__(self, *, wbits: int, abits: int, dropout: float, mc_dropout: bool, extra_bias: bool = False,
                 num_classes: int = 10):
        super().__init__()
        b = extra_bias
        self.features = nn.Sequential(
            _qconv(3, 32, 5, padding=2, bias=b, wbits=wbits, abits=abits),
            nn.MaxPool2d(3, 2),
            nn.ReLU(),
            _qconv(32, 32, 5, padding=2, bias=b, wbits=wbits, abits=abits),
            nn.ReLU(),
            nn.AvgPool2d(3, 2),
            _qconv(32, 64, 5, padding=2, bias=b, wbits=wbits, abits=abits),
            nn.ReLU(),
            nn.AvgPool2d(3, 2),
            nn.Flatten(),
        )
        self.fc1 = nn.Linear(3 * 3 * 64, 64, bias=False)
        self.dropout = MCDropout(dropout, mc_dropout)
        self.classifier = nn.Linear(64, num_classes, bias=b)
        seed_init_(self, _init_std(wbits, abits))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.dropout(self.fc1(self.features(x))))


@register_model("cifarconv", input_shape=(3, 32, 32), description="EMPIR CIFARconv (DoReFa wbits/abits)")
def cifarconv(*, wbits: int = 32, abits: int = 32, dropout: float = 0.0, mc_dropout: bool = False,
              extra_bias: bool = False) -> nn.Module:
    return CIFARConv(wbits=check_bits(wbits, "wbits"), abits=check_bits(abits, "abits"), dropout=dropout,
                     mc_dropout=mc_dropout, extra_bias=bool(extra_bias))


class DoReFaAlexNet(nn.Module):
    """DoReFa AlexNet (224x224 input): conv1 and the last FC full precision, BN after conv2..fc2."""

    def __init__(self, *, wbits: int, abits: int, dropout: float, mc_dropout: bool, num_classes: int,
                 pool: int | None = None, fc: int = 4096):
        super().__init__()

        def q(cin: int, cout: int, k: int, **kw) -> QuantConv2d:
            return _qconv(cin, cout, k, bias=False, wbits=wbits, abits=abits, **kw)

        # pool: reduced-resolution variant (alexnet_small): conv5's map is average-pooled to pool x pool
        side = 6 if pool is None else pool
        self.normalize = Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        self.features = nn.Sequential(
            nn.Conv2d(3, 96, 12, stride=4, padding=0, bias=True),
            nn.ReLU(),
            q(96, 256, 5, padding=2, groups=2), nn.BatchNorm2d(256), MaxPoolSame(3, 2), nn.ReLU(),
            q(256, 384, 3, padding=1), nn.BatchNorm2d(384), MaxPoolSame(3, 2), nn.ReLU(),
            q(384, 384, 3, padding=1, groups=2), nn.BatchNorm2d(384), nn.ReLU(),
            q(384, 256, 3, padding=1, groups=2), nn.BatchNorm2d(256), nn.MaxPool2d(3, 2), nn.ReLU(),
            *([] if pool is None else [nn.AdaptiveAvgPool2d(pool)]),
            nn.Flatten(),
        )

        def qfc(cin: int, cout: int) -> QuantLinear:
            return QuantLinear(cin, cout, bias=False, weight_quant=DoReFaWeight(wbits),
                               input_quant=DoReFaActivation(abits))

        self.head = nn.Sequential(
            qfc(256 * side * side, fc), nn.BatchNorm1d(fc), nn.ReLU(),
            qfc(fc, fc), nn.BatchNorm1d(fc), nn.ReLU(),
            MCDropout(dropout, mc_dropout),
            nn.Linear(fc, num_classes),
        )
        seed_init_(self, _init_std(wbits, abits))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(self.normalize(x)))


@register_model("alexnet", input_shape=(3, 224, 224), description="EMPIR/DoReFa AlexNet for ImageNet")
def alexnet(*, wbits: int = 32, abits: int = 32, dropout: float = 0.0, mc_dropout: bool = False,
            num_classes: int = 1000) -> nn.Module:
    return DoReFaAlexNet(wbits=check_bits(wbits, "wbits"), abits=check_bits(abits, "abits"), dropout=dropout,
                         mc_dropout=mc_dropout, num_classes=num_classes)


@register_model("alexnet_small", input_shape=(3, 64, 64),
                description="reduced-resolution DoReFa AlexNet (64x64, FC 512), not the seed's net")
def alexnet_small(*, wbits: int = 32, abits: int = 32, dropout: float = 0.0, mc_dropout: bool = False,
                  num_classes: int = 1000) -> nn.Module:
    """AlexNet's layers at 64x64 input (conv5's 1x1 map pooled to 2x2, FC 512): for CI and quick checks
    of the ImageNet pipeline on a reduced-resolution ImageFolder tree."""
    return DoReFaAlexNet(wbits=check_bits(wbits, "wbits"), abits=check_bits(abits, "abits"), dropout=dropout,
                         mc_dropout=mc_dropout, num_classes=num_classes, pool=2, fc=512)
