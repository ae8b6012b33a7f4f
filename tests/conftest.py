"""Shared fixtures: tiny models built locally (nothing is downloaded)."""

import os

# Tests run servers, clients and subprocesses side by side on 2 cores: OpenMP threads that spin at barriers
# would then run ~100x slower (bench/README.md). Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def tiny_model():
    from nanor1.model import ModelConfig, Transformer
    return Transformer(ModelConfig.preset("tiny")).init_weights(0).eval()
