"""Model families: shapes, hand-computed parameter counts, spec details, registry behaviour."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from qrobust.errors import QrobustError
from qrobust.models import create_model, get_entry, list_models, register_model
from qrobust.models.registry import _REGISTRY
from qrobust.quant import DoReFaActivation, DoReFaWeight, QuantConv2d, StochasticBinaryWeight

# Hand-computed (weights + biases + BN shifts; BN running stats are buffers, not parameters). The seeds'
# nets have no biases; seed A's BN (tf.contrib.layers.batch_norm defaults) has a shift (beta), no scale.
MNISTCONV = 64 * 1 * 8 * 8 + 128 * 64 * 6 * 6 + 128 * 128 * 5 * 5 + 128 * 10
CIFARCONV = 32 * 3 * 25 + 32 * 32 * 25 + 64 * 32 * 25 + 576 * 64 + 64 * 10
QNN_FP = 64 * 9 + 64 * 64 * 9 + 64 * 24 * 24 * 256 + 256 * 10
QNN_BIN = 64 * 9 + 2 * (64 + 64 * 64 * 9) + 64 * 22 * 22 * 256 + 256 * 10
ALEXNET = ((96 * 3 * 12 * 12 + 96) + (256 * 48 * 25 + 2 * 256) + (384 * 256 * 9 + 2 * 384)
           + (384 * 192 * 9 + 2 * 384) + (256 * 192 * 9 + 2 * 256) + (9216 * 4096 + 2 * 4096)
           + (4096 * 4096 + 2 * 4096) + (4096 * 1000 + 1000))

CASES = [
    ("mnistconv", {}, MNISTCONV, (1, 28, 28)),
    ("mnistconv", {"wbits": 2, "abits": 4}, MNISTCONV, (1, 28, 28)),
    ("mnistconv", {"wbits": 1, "abits": 1}, MNISTCONV, (1, 28, 28)),
    ("mnistconv", {"wbits": 8, "abits": 32, "dropout": 0.5}, MNISTCONV, (1, 28, 28)),
    ("cifarconv", {}, CIFARCONV, (3, 32, 32)),
    ("cifarconv", {"wbits": 4, "abits": 2}, CIFARCONV, (3, 32, 32)),
    ("cifarconv", {"wbits": 2, "abits": 2}, CIFARCONV, (3, 32, 32)),
    ("mnistconv", {"extra_bias": True}, MNISTCONV + 10, (1, 28, 28)),  # qrobust's former layout
    ("mnistconv", {"bias": True}, MNISTCONV + 64 + 128 + 128 + 10, (1, 28, 28)),  # CleverHans' ModelBasicCNN
    ("cifarconv", {"wbits": 2, "abits": 2, "extra_bias": True}, CIFARCONV + 32 + 32 + 64 + 10, (3, 32, 32)),
    ("qnn_fp", {}, QNN_FP, (1, 28, 28)),
    ("qnn_fp", {"dropout": 0.5}, QNN_FP, (1, 28, 28)),
    ("qnn_bnn", {}, QNN_BIN, (1, 28, 28)),
    ("qnn_bnn", {"sign_ste": "hardtanh"}, QNN_BIN, (1, 28, 28)),
    ("qnn_kbit", {"bits": 2}, QNN_BIN, (1, 28, 28)),
    ("qnn_kbit", {"bits": 5, "dropout": 0.5}, QNN_BIN, (1, 28, 28)),
    ("qnn_kbit", {"bits": 3, "bn_scale": True}, QNN_BIN + 2 * 64, (1, 28, 28)),  # PyTorch BN: + scales
    ("qnn_rbnn", {}, QNN_BIN + 2, (1, 28, 28)),  # + the two learnable SReLU scales
]


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_mnistconv_count_matches_brief():
    """The brief's figure for MNISTconv (709,898) counted a bias on the final Linear, which EMPIR has not."""
    assert n_params(create_model("mnistconv")) == 709_898 - 10
    assert n_params(create_model("mnistconv", extra_bias=True)) == 709_898


@pytest.mark.parametrize(("name", "kwargs", "count", "shape"), CASES)
def test_shape_and_parameter_count(name, kwargs, count, shape):
    torch.manual_seed(0)
    model = create_model(name, **kwargs).eval()
    assert n_params(model) == count
    assert get_entry(name).input_shape == shape
    out = model(torch.rand(3, *shape))
    assert out.shape == (3, 10) and torch.isfinite(out).all()


def test_alexnet_count_and_shape(monkeypatch):
    import qrobust.models.empir as empir

    # shapes only: initialising 61M parameters (or running the meta-device refs of the init) takes seconds
    monkeypatch.setattr(empir, "seed_init_", lambda module, std: None)
    with torch.device("meta"):
        model = create_model("alexnet", wbits=2, abits=2).eval()
        assert n_params(model) == ALEXNET
        # conv1 and the last FC stay full precision
        assert type(model.features[0]) is torch.nn.Conv2d and type(model.head[-1]) is torch.nn.Linear
        assert model.features[2].groups == 2 and model.features[10].groups == 2
        assert model(torch.empty(2, 3, 224, 224)).shape == (2, 1000)
        assert model.features(torch.empty(2, 3, 224, 224)).shape == (2, 256 * 6 * 6)


def test_mnistconv_matches_functional_oracle():
    """Full precision: conv64 8x8/2 SAME (pad 3) - conv128 6x6/2 VALID - conv128 5x5 VALID - linear 10."""
    torch.manual_seed(0)
    m = create_model("mnistconv").eval()
    x = torch.rand(4, 1, 28, 28)
    w1, w2, w3 = (m.features[i].weight for i in (0, 2, 4))
    h = F.relu(F.conv2d(x, w1, stride=2, padding=3))
    assert h.shape[-2:] == (14, 14)  # TF SAME with stride 2: ceil(28 / 2)
    h = F.relu(F.conv2d(h, w2, stride=2))
    h = F.relu(F.conv2d(h, w3)).flatten(1)
    assert h.shape == (4, 128)
    assert m.classifier.bias is None
    expected = F.linear(h, m.classifier.weight)
    assert torch.allclose(m(x), expected, atol=1e-6)


def test_mnistconv_quantizes_every_conv_input_including_image():
    torch.manual_seed(0)
    m = create_model("mnistconv", wbits=2, abits=4).eval()
    convs = [c for c in m.modules() if isinstance(c, QuantConv2d)]
    assert len(convs) == 3
    assert all(isinstance(c.input_quant, DoReFaActivation) and c.input_quant.bits == 4 for c in convs)
    assert all(isinstance(c.weight_quant, DoReFaWeight) and c.weight_quant.bits == 2 for c in convs)
    assert type(m.classifier) is torch.nn.Linear  # FC stays full precision
    x = torch.rand(2, 1, 28, 28)
    q = torch.round(x * 15) / 15  # the image quantized to 2^4 levels gives the same logits
    assert torch.equal(m(x), m(q))
    # weights seen by the conv take exactly 2^2 values
    assert len(torch.unique(convs[1].weight_quant(convs[1].weight))) == 4


def test_cifarconv_structure():
    torch.manual_seed(0)
    m = create_model("cifarconv").eval()
    assert m.fc1.bias is None and m.fc1.in_features == 576  # 3 x 3 x 64, FC64 without bias
    assert all(p.dim() > 1 for p in m.parameters())  # no bias anywhere (EMPIR useBias=False)
    x = torch.rand(2, 3, 32, 32)
    feats = m.features(x)
    assert feats.shape == (2, 576)
    # FC64 has no nonlinearity: logits are affine in fc1's input
    expected = m.classifier(F.linear(feats, m.fc1.weight))
    assert torch.allclose(m(x), expected, atol=1e-6)


@pytest.mark.parametrize("kwargs", [{}, {"wbits": 2, "abits": 4}])
def test_empir_init_unit_norm_filters(kwargs):
    torch.manual_seed(0)
    m = create_model("mnistconv", **kwargs)
    for mod in m.modules():
        if isinstance(mod, torch.nn.Conv2d | torch.nn.Linear):
            norms = mod.weight.flatten(1).norm(dim=1)
            assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)


def test_seed_a_binary_nets():
    torch.manual_seed(0)
    bnn = create_model("qnn_bnn").eval()
    blocks = [b for b in bnn.features if hasattr(b, "conv")]
    assert len(blocks) == 2 and type(bnn.features[0]) is torch.nn.Conv2d  # conv1 full precision
    for b in blocks:
        wq = b.conv.weight_quant(b.conv.weight)
        assert set(torch.unique(wq).tolist()) == {-1.0, 1.0}
    kbit = create_model("qnn_kbit", bits=2).eval()
    for b in (b for b in kbit.features if hasattr(b, "conv")):
        assert len(torch.unique(b.conv.weight_quant(b.conv.weight))) <= 5  # 2^2 + 1 levels
    rbnn = create_model("qnn_rbnn").eval()
    assert isinstance(rbnn.features[3].conv.weight_quant, StochasticBinaryWeight)
    x = torch.rand(2, 1, 28, 28)
    torch.manual_seed(1)
    a = rbnn(x)
    assert not torch.equal(a, rbnn(x))  # weights resampled at every pass, also in eval mode
    torch.manual_seed(1)
    assert torch.equal(a, rbnn(x))


def test_mc_dropout_on_at_inference_only_when_asked():
    torch.manual_seed(0)
    x = torch.rand(2, 1, 28, 28)
    on = create_model("qnn_fp", dropout=0.5, mc_dropout=True).eval()
    assert not torch.equal(on(x), on(x))
    off = create_model("qnn_fp", dropout=0.5, mc_dropout=False).eval()
    assert torch.equal(off(x), off(x))
    with pytest.raises(QrobustError, match="dropout"):
        create_model("qnn_fp", dropout=1.0)


def test_registry_errors_and_config():
    names = [e.name for e in list_models()]
    assert names == sorted(names) and {"mnistconv", "cifarconv", "alexnet", "qnn_rbnn"} <= set(names)
    with pytest.raises(QrobustError, match="unknown model 'resnet'.*mnistconv"):
        create_model("resnet")
    with pytest.raises(QrobustError, match="does not take option.*bits"):
        create_model("mnistconv", bits=4)
    for bad in (0, 33):
        with pytest.raises(QrobustError, match="wbits"):
            create_model("mnistconv", wbits=bad)
    m = create_model("mnistconv", wbits=2)
    assert m.qrobust_config == {"name": "mnistconv", "input_shape": [1, 28, 28],
                                "kwargs": {"wbits": 2, "abits": 32, "dropout": 0.0, "mc_dropout": False,
                                           "extra_bias": False, "bias": False}}


def test_register_model_extends_factory():
    @register_model("_tiny_test_model", input_shape=(1, 4, 4), description="test only")
    def tiny(*, width: int = 3) -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, width))

    try:
        m = create_model("_tiny_test_model", width=5)
        assert m(torch.rand(2, 1, 4, 4)).shape == (2, 5)
        assert m.qrobust_config["kwargs"] == {"width": 5}
        with pytest.raises(RuntimeError, match="twice"):
            register_model("_tiny_test_model", input_shape=(1, 4, 4), description="again")(tiny)
    finally:
        _REGISTRY.pop("_tiny_test_model", None)


def test_mc_dropout_keeps_the_dropout_distribution():
    from qrobust.models.common import MCDropout

    torch.manual_seed(0)
    drop = MCDropout(0.3, always_on=True).eval()
    x = torch.ones(200_000)
    out = drop(x)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.7) < 0.005  # keep rate 1 - p
    assert torch.allclose(out[kept], torch.full_like(out[kept], 1 / 0.7))  # inverted scaling
    assert abs(out.mean().item() - 1.0) < 0.01  # unbiased
    x = torch.randn(1000, requires_grad=True)
    y = drop(x)
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(g, (y != 0).float() / 0.7)  # gradient goes through the kept units only
    off = MCDropout(0.3, always_on=False).eval()
    assert torch.equal(off(x), x)


# The seeds' TensorFlow variables (scope names and shapes as their CleverHans code creates them: conv
# kernels HWIO, dense weights (in, out)) against qrobust's parameters, in the order of the layer list.
SEED_VARIABLES = {
    ("mnistconv", (("wbits", 2), ("abits", 4))): [  # EMPIR make_basic_lowprecision_cnn, detail 'lp_'
        ("features.0.weight", "lp_conv1_init/k", (8, 8, 1, 64)),
        ("features.2.weight", "lp_conv2_bin_init/k", (6, 6, 64, 128)),
        ("features.4.weight", "lp_conv3_bin_init/k", (5, 5, 128, 128)),
        ("classifier.weight", "lp_logits_init/W", (128, 10)),
    ],
    ("cifarconv", (("wbits", 2), ("abits", 2))): [  # EMPIR's stored_variables in cifar10_attack.py
        ("features.0.weight", "lp_conv1_init/k", (5, 5, 3, 32)),
        ("features.3.weight", "lp_conv2_init/k", (5, 5, 32, 32)),
        ("features.6.weight", "lp_conv3_init/k", (5, 5, 32, 64)),
        ("fc1.weight", "lp_ip1init/W", (576, 64)),
        ("classifier.weight", "lp_logits_init/W", (64, 10)),
    ],
    ("qnn_fp", ()): [  # seed A make_basic_cnn, detail 'fp_'
        ("features.0.weight", "fp_conv1_init/k", (3, 3, 1, 64)),
        ("features.2.weight", "fp_conv2_init/k", (3, 3, 64, 64)),
        ("head.2.weight", "fp__init/W", (64 * 24 * 24, 256)),
        ("head.5.weight", "fp_logits_init/W", (256, 10)),
    ],
    ("qnn_kbit", (("bits", 3),)): [  # seed A make_quantized_cnn, detail 'bin_'
        ("features.0.weight", "bin_conv1_init/k", (3, 3, 1, 64)),
        ("features.2.bn.bias", "bin_conv2_bin_fprop/beta", (64,)),
        ("features.2.conv.weight", "bin_conv2_bin_init/k", (3, 3, 64, 64)),
        ("features.3.bn.bias", "bin_conv3_bin_fprop/beta", (64,)),
        ("features.3.conv.weight", "bin_conv3_bin_init/k", (3, 3, 64, 64)),
        ("head.2.weight", "bin__init/W", (64 * 22 * 22, 256)),
        ("head.5.weight", "bin_logits_init/W", (256, 10)),
    ],
}


def _tf_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(shape) == 4:  # OIHW -> HWIO
        return (shape[2], shape[3], shape[1], shape[0])
    return tuple(reversed(shape))  # (out, in) -> (in, out)


@pytest.mark.parametrize("key", list(SEED_VARIABLES), ids=lambda k: k[0])
def test_parameters_match_the_seeds_variables(key):
    name, kwargs = key
    model = create_model(name, **dict(kwargs))
    ours = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    seed = SEED_VARIABLES[key]
    assert [n for n, _ in ours] == [n for n, _, _ in seed]
    assert [_tf_shape(s) for _, s in ours] == [s for _, _, s in seed]
    assert sum(p.numel() for p in model.parameters()) == sum(math.prod(s) for _, _, s in seed)


def test_seed_a_layer_list():
    m = create_model("qnn_kbit", bits=4, dropout=0.5)
    kinds = [type(x).__name__ for x in m.features] + [type(x).__name__ for x in m.head]
    assert kinds == ["Conv2d", "ReLU", "_BinaryBlock", "_BinaryBlock",
                     "Flatten", "MCDropout", "Linear", "ReLU", "MCDropout", "Linear"]
    block = m.features[2]
    assert [type(block.bn).__name__, type(block.conv).__name__, type(block.act).__name__] == [
        "CenteredBatchNorm2d", "QuantConv2d", "ReLU"]
    assert block.conv.weight_quant.ste == "clip" and block.conv.input_quant.bits == 4
    assert create_model("qnn_rbnn").features[3].conv.weight_quant.grad == "none"


def test_seed_a_batchnorm_is_tf_default():
    """tf.contrib.layers.batch_norm: shift only, eps 1e-5, moving averages with decay 0.999."""
    from qrobust.models.common import CenteredBatchNorm2d

    torch.manual_seed(0)
    bn = CenteredBatchNorm2d(3)
    assert bn.weight is None and bn.momentum == pytest.approx(0.001) and bn.eps == 1e-5
    with torch.no_grad():
        bn.bias.copy_(torch.tensor([0.5, -1.0, 2.0]))
    x = torch.randn(8, 3, 4, 4) * 2 + 1
    out = bn.train()(x)
    mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
    shift = bn.bias.view(1, 3, 1, 1)
    expected = (x - mean.view(1, 3, 1, 1)) / torch.sqrt(var.view(1, 3, 1, 1) + 1e-5) + shift
    assert torch.allclose(out, expected, atol=1e-5)
    assert torch.allclose(bn.running_mean, 0.001 * mean, atol=1e-6)  # 0.999 * 0 + 0.001 * batch mean
    ev = bn.eval()(x)
    ref = (x - bn.running_mean.view(1, 3, 1, 1)) / torch.sqrt(bn.running_var.view(1, 3, 1, 1) + 1e-5)
    assert torch.allclose(ev, ref + bn.bias.view(1, 3, 1, 1), atol=1e-5)


def test_seed_a_init():
    torch.manual_seed(0)
    m = create_model("qnn_kbit", bits=2)
    conv1 = m.features[0].weight.flatten(1).norm(dim=1)
    assert torch.allclose(conv1, torch.ones_like(conv1), atol=1e-5)  # truncated normal 0.1, unit filters
    for block in m.features[2:]:
        w = block.conv.weight
        assert w.abs().max() <= 0.4 and 0.15 < w.std() < 0.2  # truncated normal 0.2 (+-2 std), raw
        assert len(torch.unique(block.conv.weight_quant(w))) == 3  # 2 bits: -0.5, 0, 0.5 are all reached
    for lin in (m.head[2], m.head[5]):
        norms = lin.weight.norm(dim=1)  # each output unit's weights (TF: a column of W)
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    legacy = create_model("qnn_kbit", bits=2, init="legacy")
    assert legacy.features[2].conv.weight.abs().max() > 0.9  # former uniform [-1, 1]
    with pytest.raises(QrobustError, match="init"):
        create_model("qnn_kbit", init="xavier")
