"""The initial-index cache: a hit gives the same embeddings and charges the same cost as a build;
the key follows the passage tower's weights; a torn cache file is rebuilt."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from ragtune.index_cache import build_initial_index, index_key
from ragtune.ledger import Ledger

from helpers import build, tiny_cfg


def _fresh(tmp_path, *over):
    cache = tempfile.mkdtemp(dir=tmp_path)
    return tiny_cfg(tmp_path / "run", "strategy.name=joint", *over, f"data.cache_dir={cache}")


def test_hit_equals_a_build_in_embeddings_and_charged_cost(tmp_path):
    cfg = _fresh(tmp_path)
    _, m1, l1 = build(cfg)  # miss: builds and stores
    assert len(list(Path(cfg.data.cache_dir).rglob("index/*.pt"))) == 1
    _, m2, l2 = build(cfg)  # hit
    assert torch.equal(m1.index.emb, m2.index.emb)
    assert l1.deterministic_view() == l2.deterministic_view()
    assert l2.deterministic_view()["flops"]["index"] > 0  # the build is charged on a hit too
    off = _fresh(tmp_path, "index.cache_initial=false")
    _, m3, l3 = build(off)
    assert torch.equal(m1.index.emb, m3.index.emb) and l3.deterministic_view() == l1.deterministic_view()


def test_key_follows_the_passage_tower_and_a_torn_file_is_rebuilt(tmp_path):
    cfg = _fresh(tmp_path)
    _, m, _ = build(cfg)
    key = index_key(m, cfg.index.batch_size)
    p = next(m.retriever.doc_encoder.parameters())
    original = p.detach().clone()
    with torch.no_grad():
        p.add_(1e-3)
    assert index_key(m, cfg.index.batch_size) != key
    with torch.no_grad():
        p.copy_(original)
    assert index_key(m, cfg.index.batch_size) == key
    assert index_key(m, cfg.index.batch_size + 1) != key
    path = next(Path(cfg.data.cache_dir).rglob(f"index/{key}.pt"))
    good = m.index.emb.clone()
    path.write_bytes(b"PK torn")
    m.ledger = m.retriever.ledger = Ledger("test")
    assert build_initial_index(m, cfg.data.cache_dir, cfg.index.batch_size, True) is False  # rebuilt
    assert torch.allclose(m.index.emb, good) and m.ledger.deterministic_view()["flops"]["index"] > 0
    assert build_initial_index(m, cfg.data.cache_dir, cfg.index.batch_size, True) is True  # and stored again
