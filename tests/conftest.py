"""Shared fixtures: tiny models built locally (nothing is downloaded)."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def tiny_model():
    from nanor1.model import ModelConfig, Transformer
    return Transformer(ModelConfig.preset("tiny")).init_weights(0).eval()
