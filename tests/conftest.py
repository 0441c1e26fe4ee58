"""Shared fixtures: real data from ../shared/data when present, tiny models trained once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from qrobust.data import load_dataset

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("QROBUST_SHARED_DATA", REPO.parent / "shared" / "data"))

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


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
