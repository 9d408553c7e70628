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


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` (tests/gpu) need CUDA: skipped where torch sees no GPU, so `make test` on a
    CPU machine stays green. Under RAGTUNE_REQUIRE_GPU=1 (bench/gpu_check.sh) a missing GPU is an
    error instead, so the GPU check can never pass by skipping. RAGTUNE_GPU_TEST_DEVICE=cpu runs them
    on the CPU: a dry run of the tests' own code (tests/gpu/conftest.py), nothing GPU-side checked."""
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu:
        return
    dry_run = os.environ.get("RAGTUNE_GPU_TEST_DEVICE") == "cpu"
    if os.environ.get("RAGTUNE_REQUIRE_GPU") == "1":
        if dry_run or not torch.cuda.is_available():
            raise pytest.UsageError(
                f"RAGTUNE_REQUIRE_GPU=1 but {'RAGTUNE_GPU_TEST_DEVICE=cpu' if dry_run else 'no CUDA GPU'} "
                f"({len(gpu)} gpu tests collected; torch {torch.__version__}, CUDA {torch.version.cuda})"
            )
        return
    if dry_run or torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in gpu:
        item.add_marker(skip)
