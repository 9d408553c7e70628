"""A cache of the initial passage index: embed the corpus once per passage tower, not once per run.

Every run of an experiment starts from the same passage tower (the bundled MiniLM, or a tiny
encoder built from a fixed seed), so every run used to re-embed the same corpus (about 18 s per
run on the embedded default, hours for a Wikipedia-scale corpus). The embeddings are stored
under `<data.cache_dir>/index/<key>.pt`, keyed by a SHA-256 over everything they depend on: the
passage tower's weights, the tokenizer's vocabulary, the passage texts and the retriever's
encoding settings (max length, pooling, normalisation, the passage prefix) and the embedding
batch size (which decides padding, hence the FLOPs charged).

The cost stays honest: the ledger records of the original build are stored beside the
embeddings and replayed into the run's ledger on a hit (FLOPs, tokens, calls and the forward
seconds measured when it was computed), so every run is charged the index build exactly as if it
had run; only `wall_seconds.index` shows the real (shorter) load time. `index.cache_initial=false`
turns it off. A torn or unreadable cache file is rebuilt, never trusted.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ragtune import fileio
from ragtune.ledger import Ledger


def index_key(rag, batch_size: int) -> str:
    h = hashlib.sha256()
    tower = rag.retriever.doc_encoder
    for name, t in sorted(tower.state_dict().items()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    rc = rag.retriever.cfg
    spec = {
        "vocab": sorted(rag.retriever.tokenizer.get_vocab().items()),
        "settings": [rc.max_passage_length, rc.pooling, bool(rc.normalize), int(batch_size), rc.passage_prefix],
        "texts": hashlib.sha256("\x00".join(rag.passage_texts).encode()).hexdigest(),
    }
    h.update(json.dumps(spec).encode())
    return h.hexdigest()[:24]


def build_initial_index(rag, cache_dir: str, batch_size: int, use_cache: bool) -> bool:
    """Embed the corpus into `rag.index`, from the cache when possible; True on a cache hit."""
    if not use_cache:
        rag.refresh_index(batch_size)
        return False
    path = Path(cache_dir).expanduser() / "index" / f"{index_key(rag, batch_size)}.pt"
    if path.exists():
        try:
            saved = fileio.load_torch(path)
            charges = Ledger()
            charges.load_state_dict(saved["charges"])
            emb = saved["emb"]
        except Exception:  # noqa: BLE001 - a cache is never trusted: anything unreadable is rebuilt
            saved = None
        if saved is not None and emb.shape[0] == len(rag.passage_texts):
            rag.index.build(emb)
            rag.ledger.merge(charges)
            return True
    main = rag.retriever.ledger
    charges = Ledger(main.device_name)
    rag.retriever.ledger = charges  # record the build's charges apart, to store and replay them
    try:
        rag.refresh_index(batch_size)
    finally:
        rag.retriever.ledger = main
    main.merge(charges)
    path.parent.mkdir(parents=True, exist_ok=True)
    fileio.save_torch({"emb": rag.index.emb, "charges": charges.state_dict()}, path)
    return False
