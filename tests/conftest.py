"""Shared fixtures: real data from ../shared/data when present, tiny models trained once per session."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from qrobust.data import load_dataset

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("QROBUST_SHARED_DATA", REPO.parent / "shared" / "data"))

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def _peers_required() -> bool:
    return os.environ.get("QROBUST_REQUIRE_PEERS", "0") not in ("", "0")


def require_peer(name: str):
    """Import the peer library ``name`` (torchattacks, art, cleverhans.torch...) for an oracle test.

    A user without the test extras gets a skip; CI sets ``QROBUST_REQUIRE_PEERS=1`` (``.ci/run``) so that a
    missing or broken peer FAILS the run instead of silently skipping the oracle comparisons.
    """
    if _peers_required():
        try:
            return importlib.import_module(name)
        except ImportError as exc:
            pytest.fail(f"peer library {name!r} is required (QROBUST_REQUIRE_PEERS is set) but cannot be "
                        f"imported: {exc}; install the test extras with `bash scripts/setup.sh --test`",
                        pytrace=False)
    return pytest.importorskip(name)


def _fail_missing_peer(report) -> None:
    """Safety net for ``require_peer``: with QROBUST_REQUIRE_PEERS set, a plain ``pytest.importorskip``
    skip (a missing module), in a test or at module level, is reported as a failure too."""
    if report.skipped and _peers_required() and isinstance(report.longrepr, tuple):
        reason = str(report.longrepr[2])
        if "could not import" in reason:
            report.outcome = "failed"
            report.longrepr = f"{reason} (QROBUST_REQUIRE_PEERS is set: a missing peer library fails the run)"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_missing_peer(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_missing_peer(outcome.get_result())


@pytest.fixture(scope="session")
def digits():
    """The embedded offline digits (always available)."""
    return load_dataset("digits")


@pytest.fixture(scope="session")
def mnist_npz() -> Path:
    path = SHARED_DATA / "mnist.npz"
    if not path.is_file():
        pytest.skip(f"{path} not available")
    return path


def _train_tiny(name: str, seed: int, epochs: int = 2, **kwargs):
    from qrobust.models import create_model
    from qrobust.train import TrainConfig, train

    data = load_dataset("digits")
    torch.manual_seed(seed)
    model = create_model(name, **kwargs)
    train(model, data.train, None, TrainConfig(epochs=epochs, batch_size=64, seed=seed))
    return model.eval()


@pytest.fixture(scope="session")
def trained_mnistconv():
    """Full-precision MNISTconv trained for 2 epochs on the 4,000 embedded training digits (~5 s)."""
    return _train_tiny("mnistconv", seed=0)


@pytest.fixture(scope="session")
def trained_mnistconv_a4w2():
    """MNISTconv with 4-bit activations and 2-bit weights, trained like ``trained_mnistconv``."""
    return _train_tiny("mnistconv", seed=1, wbits=2, abits=4)


@pytest.fixture(scope="session")
def digits_test(digits):
    """First 200 embedded test digits as float tensors (x in [0, 1], y)."""
    return digits.test.head(200).tensors()


class Counting(nn.Module):
    """A model wrapper that counts forward calls (attack cost tests)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)
