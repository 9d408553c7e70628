"""A cache of the initial passage index: embed the corpus once per passage tower, not once per run.

Every run of an experiment starts from the same passage tower (the bundled MiniLM, or a tiny
encoder built from a fixed seed), so every run used to re-embed the same corpus (about 18 s per
run on the embedded default, hours for a Wikipedia-scale corpus). The embeddings are an entry of
the index store (`ragtune.index_store`, `<data.cache_dir>/index/<key>.pt` by default), keyed by
`index_key`: a SHA-256 over everything they depend on: the passage tower's weights, the
tokenizer's vocabulary, the passage texts and the retriever's encoding settings (max length,
pooling, normalisation, the passage prefix), the embedding batch size and whether batches are
length-sorted (which decide padding, hence the FLOPs charged). The same key names every later
index a run builds (`RAGPipeline.refresh_index`), so final.pt and checkpoints reference entries of
the same store instead of holding the embeddings.

The cost stays honest: the ledger records of the original build are stored beside the
embeddings and replayed into the run's ledger on a hit (FLOPs, tokens, calls and the forward
seconds measured when it was computed), so every run is charged the index build exactly as if it
had run; only `wall_seconds.index` shows the real (shorter) load time. `index.cache_initial=false`
turns it off. A torn or unreadable cache file is rebuilt, never trusted. Under several processes
the build is sharded over the ranks like every refresh, rank 0 alone writes the entry, and a hit
is one on every rank or on none (`build_initial_index`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ragtune.index_store import IndexStore, MissingIndexEntry
from ragtune.ledger import Ledger

KEY_VERSION = 2  # 2: length-sorted batches and the device type in the key


def _corpus_digest(rag) -> str:
    """sha256 of the passage texts and the tokenizer's vocabulary, computed once per pipeline
    (the texts of a pipeline never change; a new tokenizer object is hashed again)."""
    texts, tok = rag.passage_texts, rag.retriever.tokenizer
    memo = getattr(rag, "_index_digest_memo", None)
    if memo is not None and memo[0] is tok and memo[1] == len(texts):
        return memo[2]
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode())
        h.update(b"\x00")
    texts_hex = h.hexdigest()
    vocab = hashlib.sha256(json.dumps(sorted(tok.get_vocab().items())).encode()).hexdigest()
    digest = hashlib.sha256(f"{texts_hex}:{vocab}".encode()).hexdigest()
    object.__setattr__(rag, "_index_digest_memo", (tok, len(texts), digest))  # a plain attribute, not a module
    return digest


def index_key(rag, batch_size: int) -> str:
    """The key of the index the passage tower would build now (see the module docstring)."""
    h = hashlib.sha256()
    tower = rag.retriever.doc_encoder
    for name, t in sorted(tower.state_dict().items()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    rc = rag.retriever.cfg
    ic = getattr(getattr(rag, "index", None), "cfg", None)
    device = next(tower.parameters()).device.type
    spec = {
        "version": KEY_VERSION,
        "corpus": _corpus_digest(rag),
        "settings": [rc.max_passage_length, rc.pooling, bool(rc.normalize), int(batch_size), rc.passage_prefix],
        "sorted": bool(getattr(ic, "sort_by_length", True)),
        "device": device,
    }
    h.update(json.dumps(spec).encode())
    return h.hexdigest()[:24]


def store_of(cfg) -> IndexStore | None:
    """The index store of a run config: `index.store` ("" -> `<data.cache_dir>/index`, "inline" ->
    none: final.pt and checkpoints hold the embeddings themselves)."""
    where = cfg.index.store
    if where == "inline":
        return None
    return IndexStore(where or Path(cfg.data.cache_dir).expanduser() / "index")


def _cached(store: IndexStore, key: str, n: int):
    """(embeddings (N, H), digest, charges Ledger) of the cache entry `key`, or None when it is
    absent, unreadable or not of this corpus's size (never trusted: rebuilt)."""
    if not store.has(key):
        return None
    try:
        saved = store.get(key)
        charges = Ledger()
        charges.load_state_dict(saved["charges"])
    except (MissingIndexEntry, KeyError, TypeError, ValueError):
        return None
    if saved["emb"].shape[0] != n:
        return None
    return saved["emb"], saved["digest"], charges


def build_initial_index(rag, cache_dir: str, batch_size: int, use_cache: bool) -> bool:
    """Embed the corpus into `rag.index`, from the cache when possible; True on a cache hit.
    The cache is the index's store (`rag.index.store`, else `<cache_dir>/index`).

    Several processes (every rank calls it): a hit is a hit only when every rank read the entry
    (one rank's miss makes all rebuild, so no rank waits alone in the sharded refresh's
    collectives), and its charges are replayed on rank 0 only; a build is sharded over the ranks
    (`RAGPipeline.refresh_index`), each rank charging its share, and rank 0 stores the entry
    with every rank's charges summed (the logical build's, what the next run replays)."""
    from ragtune.distributed import rank_world

    if not use_cache:
        rag.refresh_index(batch_size)
        return False
    rank, world = rank_world()
    store = rag.index.store or IndexStore(Path(cache_dir).expanduser() / "index")
    key = index_key(rag, batch_size)
    hit = _cached(store, key, len(rag.passage_texts))
    if world > 1 and not all(rag.gather(hit is not None)):
        hit = None
    if hit is not None:
        emb, digest, charges = hit
        rag.index.build(emb, key, batch_size)
        rag.index.digest = digest
        if rank == 0:  # the logical build, charged once over the ranks
            rag.ledger.merge(charges)
        rag.index.prepare()
        return True
    main = rag.retriever.ledger
    charges = Ledger(main.device_name)
    rag.retriever.ledger = charges  # record the build's charges apart, to store and replay them
    try:
        rag.refresh_index(batch_size)
    finally:
        rag.retriever.ledger = main
    main.merge(charges)  # this rank's share of the build
    if world > 1:
        states = rag.gather(charges.state_dict())  # every rank's share, in rank order
        charges = Ledger(main.device_name)
        for st in states:
            share = Ledger()
            share.load_state_dict(st)
            charges.merge(share)
    if rank == 0:  # one writer; the other ranks' index is the same (bitwise), its digest computed when needed
        rag.index.digest = store.put(key, rag.index.emb, charges=charges.state_dict())
    return False
