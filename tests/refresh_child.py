"""torchrun child of tests/core/test_sharded_refresh.py: on a gloo process group, this rank builds
the tiny pipeline (initial index: a miss in a fresh store, so a sharded build), loads the passage
tower the test perturbed, refreshes the index at each of the test's batch sizes, then builds the
initial index again twice: from the store rank 0 wrote (a hit on both ranks) and with rank 1
looking in an empty store (a hit on rank 0 only). After each it records this rank's ledger
charges of (doc_encoder, index) and the index's info, and saves the embeddings, in OUT.

usage: refresh_child.py OUT CACHE_DIR BATCH_SIZES [config overrides...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from ragtune.index_cache import build_initial_index
from ragtune.index_store import IndexStore
from ragtune.ledger import Ledger

from helpers import build, tiny_cfg

FIELDS = ("flops", "tokens", "real_tokens", "calls")


def index_charges(ledger: Ledger) -> dict:
    """This ledger's (doc_encoder, index) record: {field: value} (0 where nothing was charged)."""
    view = ledger.deterministic_view()
    return {f: view[f"{f}_by_component"].get("doc_encoder", {}).get("index", 0) for f in FIELDS}


def fresh_ledger(m) -> None:
    m.ledger = m.retriever.ledger = Ledger("test")


def main(out: Path, cache: str, batch_sizes, overrides) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    cfg = tiny_cfg(out / "run", f"data.cache_dir={cache}", f"index.store={out / 'store'}", *overrides)
    rec = {}
    _, m, ledger = build(cfg)
    rec["initial"] = {
        **index_charges(ledger),
        "padded": m.index.info["padded_tokens"],
        "ranks": m.index.info["refresh_ranks"],
    }
    torch.save(m.index.emb, out / f"initial.rank{rank}.pt")
    tower = m.retriever.doc_encoder
    original = {k: v.clone() for k, v in tower.state_dict().items()}
    tower.load_state_dict(torch.load(out / "tower.pt"))
    for bs in batch_sizes:
        fresh_ledger(m)
        m.refresh_index(bs)
        rec[f"refresh{bs}"] = {**index_charges(m.ledger), "padded": m.index.info["padded_tokens"]}
        torch.save(m.index.emb, out / f"refresh{bs}.rank{rank}.pt")
    tower.load_state_dict(original)
    fresh_ledger(m)
    hit = build_initial_index(m, cache, cfg.index.batch_size, True)  # the entry rank 0 stored above
    rec["hit"] = {"returned": hit, **index_charges(m.ledger)}
    if rank:
        m.index.store = IndexStore(out / f"empty.rank{rank}")
    fresh_ledger(m)
    hit = build_initial_index(m, cache, cfg.index.batch_size, True)
    rec["one_sided"] = {"returned": hit, **index_charges(m.ledger)}
    torch.save(m.index.emb, out / f"one_sided.rank{rank}.pt")
    (out / f"rank{rank}.json").write_text(json.dumps(rec))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], [int(b) for b in sys.argv[3].split(",")], sys.argv[4:])
