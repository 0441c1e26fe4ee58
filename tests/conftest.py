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
