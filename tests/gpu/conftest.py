"""tests/gpu: what needs a CUDA GPU (marker `gpu`; tests/conftest.py skips them without one, and
makes that an error under RAGTUNE_REQUIRE_GPU=1, as bench/gpu_check.sh runs them).

`device` is the GPU. With RAGTUNE_GPU_TEST_DEVICE=cpu it is the CPU: a dry run of the tests' own
code on a machine without a GPU, which checks nothing GPU-side (tests that only mean something on
CUDA skip themselves then)."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture
def device() -> torch.device:
    return torch.device("cpu" if os.environ.get("RAGTUNE_GPU_TEST_DEVICE") == "cpu" else "cuda")


@pytest.fixture
def cuda_only(device):
    """Skip in the CPU dry run: the test checks a CUDA-only behaviour."""
    if device.type != "cuda":
        pytest.skip("CPU dry run: this checks a CUDA-only behaviour")
