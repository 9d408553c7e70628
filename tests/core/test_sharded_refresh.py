"""Corpus embedding sharded over ranks (`RAGPipeline.refresh_index`, `index_cache.build_initial_index`):
batch j of the length-sorted order is embedded by rank j % world; under torchrun with 2 gloo
processes every rank's index is bitwise the one-process index of the same passage tower, each
rank charges only its own batches (their sum is the one-process charge), a cache hit is replayed
on rank 0 alone, a hit on one rank only is a miss on both, and only rank 0 writes the store.

The tiny corpus has 108 passages; the batch sizes 7 (16 batches, 8 per rank, 108 = 7 x 14 + 10),
10 (11 batches: 6 and 5, the last one 8 rows) and 200 (one batch: rank 1 embeds nothing) cover an
even split, an uneven one and an empty share."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from refresh_child import FIELDS, fresh_ledger, index_charges

from ragtune.index_store import IndexStore
from ragtune.ledger import Ledger
from ragtune.pipeline import refresh_shard

from helpers import ROOT, build, cache_dir, tiny_cfg

OVERRIDES = ["strategy.name=joint", "index.batch_size=10"]
BATCH_SIZES = (7, 10, 200)


@pytest.mark.parametrize("n_batches, world", [(11, 2), (16, 2), (1, 2), (0, 3), (10, 3), (5, 8), (7, 1)])
def test_refresh_shard_gives_each_batch_to_exactly_one_rank_strided(n_batches, world):
    shards = [list(refresh_shard(n_batches, r, world)) for r in range(world)]
    assert sorted(j for s in shards for j in s) == list(range(n_batches))  # every batch once
    for r, s in enumerate(shards):
        assert all(j % world == r for j in s)  # batch j on rank j % world
    counts = [len(s) for s in shards]
    assert max(counts) - min(counts) <= 1 and counts == sorted(counts, reverse=True)


@pytest.mark.parametrize("rank, world", [(2, 2), (-1, 2), (0, 0)])
def test_refresh_shard_rejects_a_rank_outside_the_world(rank, world):
    with pytest.raises(ValueError, match="rank"):
        refresh_shard(4, rank, world)


def _torchrun(out, cache):
    logs = out / "rank_logs"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["--log-dir", str(logs), "--redirects", "3", str(ROOT / "tests" / "refresh_child.py")]
    cmd += [str(out), cache, ",".join(map(str, BATCH_SIZES)), *OVERRIDES]
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    ranks = {str(p.relative_to(logs)): p.read_text(errors="replace")[-1500:] for p in sorted(logs.rglob("*.log"))}
    return res, f"torchrun exit {res.returncode}; per-rank logs: {ranks}; launcher: {res.stderr[-800:]}"


def _sum(recs, what):
    return {f: sum(r[what][f] for r in recs) for f in FIELDS}


@pytest.mark.slow
def test_two_ranks_build_the_one_process_index_and_charge_it_once(tmp_path):
    # one process first (it also fills the data and tokenizer caches the ranks then read)
    cache = cache_dir()
    cfg = tiny_cfg(tmp_path / "one", f"index.store={tmp_path / 'store0'}", *OVERRIDES)
    _, m, ledger = build(cfg)
    n = len(m.passage_texts)
    want = {"initial": {**index_charges(ledger), "padded": m.index.info["padded_tokens"]}}
    want_emb = {"initial": m.index.emb.clone()}
    key = m.index.key
    gen = torch.Generator().manual_seed(0)  # a passage tower unlike the initial one, saved for the ranks
    tower = {
        k: v + 0.05 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
        for k, v in m.retriever.doc_encoder.state_dict().items()
    }
    torch.save(tower, tmp_path / "tower.pt")
    m.retriever.doc_encoder.load_state_dict(tower)
    for bs in BATCH_SIZES:
        fresh_ledger(m)
        m.refresh_index(bs)
        want[f"refresh{bs}"] = {**index_charges(m.ledger), "padded": m.index.info["padded_tokens"]}
        want_emb[f"refresh{bs}"] = m.index.emb.clone()
        assert not torch.equal(want_emb[f"refresh{bs}"], want_emb["initial"])  # another tower: other rows

    res, why = _torchrun(tmp_path, cache)
    assert res.returncode == 0, why
    recs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for what in want:
        bs = int(what[len("refresh") :]) if what.startswith("refresh") else cfg.index.batch_size
        for r, rec in enumerate(recs):
            got = torch.load(tmp_path / f"{what}.rank{r}.pt")
            assert torch.equal(got, want_emb[what]), (what, r, (got - want_emb[what]).abs().max())
            # each rank embedded its share of the batches only, and the info is the logical work's
            assert rec[what]["calls"] == len(refresh_shard(math.ceil(n / bs), r, 2)), (what, r)
            assert rec[what]["padded"] == want[what]["padded"]
        assert recs[1][what]["tokens"] == 0 if bs >= n else 0 < recs[1][what]["tokens"] < want[what]["tokens"]
        assert _sum(recs, what) == {f: want[what][f] for f in FIELDS}, what  # charged once over the ranks
    assert recs[0]["initial"]["ranks"] == recs[1]["initial"]["ranks"] == 2

    # rank 0 alone wrote the store, with the logical build's charges; a hit replays them on rank 0 only
    stored = Ledger()
    stored.load_state_dict(IndexStore(tmp_path / "store").get(key)["charges"])
    assert index_charges(stored) == {f: want["initial"][f] for f in FIELDS}
    assert recs[0]["hit"] == {"returned": True, **index_charges(stored)}
    assert recs[1]["hit"] == {"returned": True, **{f: 0 for f in FIELDS}}
    # the entry on rank 0 only: both rebuild (no rank waits alone in a collective), each its share
    assert [r["one_sided"]["returned"] for r in recs] == [False, False]
    assert _sum(recs, "one_sided") == {f: want["initial"][f] for f in FIELDS}
    assert all(torch.equal(torch.load(tmp_path / f"one_sided.rank{r}.pt"), want_emb["initial"]) for r in (0, 1))
    assert not list((tmp_path / "empty.rank1").glob("*.pt"))  # rank 1 wrote nothing
