"""Test-suite setup: no hub access (an accidental download fails loudly), one CPU thread, and the
shared fixtures. The tests folder is put on sys.path so every subfolder can `import helpers`."""

import functools
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pytest  # noqa: E402
import torch  # noqa: E402

from ragtune import modelzoo  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture
def pinned_tokenizers(monkeypatch):
    """Build each retriever WordPiece tokenizer once per test and reuse the same object.

    `modelzoo.train_wordpiece` is deterministic (tested in test_pipeline.py); pinning keeps the
    trainer/checkpoint tests independent of it and saves the rebuild time.
    """
    real = modelzoo.train_wordpiece

    @functools.cache
    def cached(texts, vocab_size):
        return real(list(texts), vocab_size)

    monkeypatch.setattr(modelzoo, "train_wordpiece", lambda texts, vocab_size: cached(tuple(texts), vocab_size))
    yield
