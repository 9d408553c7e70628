"""The index store: final.pt and checkpoints reference one stored copy of each passage-encoder
state's index instead of holding it; two runs and a run's checkpoints share it; loading verifies
the key and the digest; a missing entry is rebuilt when the loaded passage tower built it, else
an error says why; released and stale entries are deleted (cache entries kept); checkpoints copy
weights to CPU without a device clone."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ragtune import run
from ragtune.checkpoint import trained_weights
from ragtune.config import IndexConfig
from ragtune.index import DenseIndex
from ragtune.index_store import IndexRef, IndexStore, MissingIndexEntry, digest_of
from ragtune.ledger import Ledger

from helpers import build, tiny_cfg

COMMON = ["train.steps=4", "train.save_every=2", "eval.splits=[]", "train.log_every=2"]
DOC = ["strategy.name=joint", "strategy.train_doc_encoder=true", "index.refresh_every=1"]


def _cfg(tmp_path, name, cache, *over):
    return tiny_cfg(tmp_path / name, *COMMON, *over, f"data.cache_dir={cache}")


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def _entries(cache) -> list:
    return sorted(p.name for p in (Path(cache) / "index").glob("*.pt"))


def test_two_runs_and_their_checkpoints_share_one_stored_index(tmp_path):
    cache = tempfile.mkdtemp(dir=tmp_path)
    for name, lr in (("a", "1e-3"), ("b", "3e-4")):
        res = run.train_and_evaluate(
            _cfg(tmp_path, name, cache, "strategy.name=independent", f"train.lr.generator={lr}")
        )
        assert res["status"] == "ok" and res["index"]["backend"] == "exact" and res["index"]["key"]
    assert len(_entries(cache)) == 1  # the initial index, once, for both runs
    fa, fb = _load(tmp_path / "a" / "final.pt")["index"], _load(tmp_path / "b" / "final.pt")["index"]
    assert isinstance(fa, IndexRef) and "emb" not in dict(fa) and fa["ref"] == fb["ref"]
    entry = IndexStore(Path(cache) / "index").get(fa["ref"])
    assert torch.equal(fa["emb"], entry["emb"])  # a reference still reads as the embeddings
    # the same run with the embeddings inside final.pt is larger by about the index's size
    inline = run.train_and_evaluate(
        _cfg(tmp_path, "c", cache, "strategy.name=independent", "train.lr.generator=1e-3", "index.store=inline")
    )
    assert inline["status"] == "ok" and len(_entries(cache)) == 1
    fc = _load(tmp_path / "c" / "final.pt")["index"]
    assert type(fc) is dict and torch.equal(fc["emb"], entry["emb"])
    extra = (tmp_path / "c" / "final.pt").stat().st_size - (tmp_path / "a" / "final.pt").stat().st_size
    assert extra >= 0.9 * entry["emb"].numel() * 4  # the reference itself takes a few hundred bytes


def test_a_run_training_the_passage_tower_stores_its_index_once_for_final_and_checkpoint(tmp_path):
    cache = tempfile.mkdtemp(dir=tmp_path)
    res = run.train_and_evaluate(_cfg(tmp_path, "d", cache, *DOC))
    assert res["status"] == "ok"
    final = _load(tmp_path / "d" / "final.pt")["index"]
    last = _load(tmp_path / "d" / "checkpoints" / "last.pt")["index"]
    assert final["ref"] == last["ref"] and final["version"] == last["version"] == 5  # built + 4 refreshes
    # the initial cache entry and the final index; the step-2 checkpoint's entry was released
    store = IndexStore(Path(cache) / "index")
    assert len(_entries(cache)) == 2 and store.has(final["ref"])
    pins = {p.name for p in store.pins(final["ref"])}
    assert pins == {"final.pt", "last.pt"}
    # a second identical run in another directory shares the entry and frees nothing of the first
    run.train_and_evaluate(_cfg(tmp_path, "e", cache, *DOC))
    assert len(_entries(cache)) == 2 and len(store.pins(final["ref"])) == 4
    # deleting run directories frees their entries at the next gc; the cache entry stays
    import shutil

    shutil.rmtree(tmp_path / "d")
    assert store.gc() == [] and len(store.pins(final["ref"])) == 2
    shutil.rmtree(tmp_path / "e")
    assert store.gc() == [final["ref"]] and len(_entries(cache)) == 1


def test_loading_verifies_the_key_and_the_digest(tmp_path):
    store = IndexStore(tmp_path / "store")
    cfg = OmegaConf.structured(IndexConfig(backend="exact"))
    emb = torch.nn.functional.normalize(torch.randn(50, 8), dim=-1)
    idx = DenseIndex(cfg, store)
    idx.build(emb, key="k1", batch_size=16)
    ref = idx.state_dict(referrer=tmp_path / "file.pt")
    assert ref["ref"] == "k1" and ref["digest"] == digest_of(emb) and store.has("k1")
    other = DenseIndex(cfg, store)
    other.load_state_dict(ref)
    assert torch.equal(other.emb, emb) and other.version == 1 and other.key == "k1"
    # an entry whose embeddings are not the ones referenced (or not the key's) is refused
    torch.save({"key": "k1", "emb": emb + 1}, store.path("k1"))
    with pytest.raises(MissingIndexEntry, match="cannot be rebuilt"):
        DenseIndex(cfg, store).load_state_dict(ref)
    torch.save({"key": "k2", "emb": emb, "digest": digest_of(emb)}, store.path("k1"))
    with pytest.raises(MissingIndexEntry, match="holds index k2"):
        store.get("k1")
    store.path("k1").unlink()
    with pytest.raises(MissingIndexEntry, match="not in"):
        DenseIndex(cfg, store).load_state_dict(ref)
    # without a store the embeddings travel inline, as before
    inline = DenseIndex(cfg)
    inline.build(emb)
    assert torch.equal(inline.state_dict()["emb"], emb)


def test_a_missing_entry_is_rebuilt_only_by_the_tower_that_built_it(tmp_path):
    cache = tempfile.mkdtemp(dir=tmp_path)
    cfg = _cfg(tmp_path, "f", cache, *DOC)
    assert run.train_and_evaluate(cfg)["status"] == "ok"
    final = _load(tmp_path / "f" / "final.pt")
    ref = final["index"]
    want = ref["emb"].clone()
    store = IndexStore(Path(cache) / "index")
    store.path(ref["ref"]).unlink()
    # final.pt's passage tower is the one that built its index: rebuilt (and charged), identical
    ledger = Ledger("test")
    m = run.build_pipeline(cfg, run.load_data(cfg.data), ledger, final)
    assert m.index.key == ref["ref"] and torch.equal(m.index.emb, want)
    assert ledger.deterministic_view()["flops"]["index"] > 0
    # a checkpoint whose tower has moved on since its index was built cannot rebuild it
    _, m2, _ = build(cfg)  # the initial tower
    store.path(ref["ref"]).unlink(missing_ok=True)
    with pytest.raises(MissingIndexEntry, match="cannot be rebuilt"):
        m2.index.load_state_dict(ref)


def test_checkpoint_weights_are_cpu_copies(tmp_path):
    _, m, _ = build(tiny_cfg(tmp_path, "strategy.name=joint"))
    saved = trained_weights(m, ["query_encoder"])
    live = dict(m.named_parameters())
    for k, v in saved.items():
        assert v.device.type == "cpu" and not v.requires_grad
        assert torch.equal(v, live[k]) and v.data_ptr() != live[k].data_ptr()  # a copy, not a view
