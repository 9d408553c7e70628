"""Dual-encoder retriever: s(x, z) = E_q(x) . E_d(z) / tau.

One public encode path, `encode(texts, tower, component, max_length)`: tokenise, run the tower,
pool, normalise, and charge the call to the ledger under `component`, whichever tower it is (the
built-in query or passage tower, or a tower a strategy owns, e.g. a posterior encoder charged as
its own part). `encode_queries` / `encode_passages` are the two built-in calls of it. Towers are
separate copies of the same initial encoder by default (query-side-only training keeps the index
valid); `shared_towers` makes them one module. The ledger decides train vs score from grad mode.

Text prefixes: `retriever.query_prefix` / `retriever.passage_prefix` (e5: "query: " / "passage: ",
bge: an instruction) are prepended by `encode_queries` / `encode_passages` only. The generic
`encode` embeds the texts it is given as they are: a strategy-owned tower that wants a prefix
passes prefixed texts (`query_text` / `passage_text` give them).
"""

from __future__ import annotations

import copy
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ragtune import modelzoo
from ragtune.flops import ModelShape
from ragtune.ledger import Ledger, clock


class DualEncoder(nn.Module):
    def __init__(self, query_encoder: nn.Module, doc_encoder: nn.Module, tokenizer, cfg, ledger: Ledger):
        super().__init__()
        self.query_encoder = query_encoder
        self.doc_encoder = doc_encoder  # may be the same object as query_encoder
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.ledger = ledger
        self.temperature = float(cfg.temperature)

    @property
    def shared(self) -> bool:
        return self.doc_encoder is self.query_encoder

    def query_text(self, text: str) -> str:
        """A query as the query tower reads it: `retriever.query_prefix` + text."""
        return self.cfg.query_prefix + text

    def passage_text(self, text: str) -> str:
        """A passage as the passage tower reads it: `retriever.passage_prefix` + text."""
        return self.cfg.passage_prefix + text

    def encode_queries(self, texts: List[str], activity: Optional[str] = None) -> torch.Tensor:
        """(B,) texts -> (B, H) embeddings from the production query tower (query prefix added)."""
        texts = [self.query_text(t) for t in texts]
        return self.encode(texts, self.query_encoder, "query_encoder", self.cfg.max_query_length, activity)

    def encode_passages(self, texts: List[str], activity: Optional[str] = None) -> torch.Tensor:
        """(N,) texts -> (N, H) embeddings from the production passage tower (passage prefix added)."""
        texts = [self.passage_text(t) for t in texts]
        return self.encode(texts, self.doc_encoder, "doc_encoder", self.cfg.max_passage_length, activity)

    def score(self, q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """q (B, H), d (B, K, H) -> (B, K) temperature-scaled scores."""
        return torch.einsum("bh,bkh->bk", q, d) / self.temperature

    def encode(
        self, texts: List[str], tower: nn.Module, component: str, max_length: int, activity: Optional[str] = None
    ) -> torch.Tensor:
        """(N,) texts -> (N, H) float32 embeddings of any tower sharing this tokenizer, charged under
        `component`. Grad flows only if grad mode is on and the tower has trainable weights.
        `activity` forces the ledger activity (e.g. "index"); by default train vs score follows grad
        mode."""
        device = next(tower.parameters()).device
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        t0 = clock()
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in tower.parameters())
        with torch.set_grad_enabled(grad):
            hidden = tower(**enc).last_hidden_state  # (N, L, H)
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (N, L, 1)
        if self.cfg.pooling == "mean":
            emb = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (N, H)
        else:
            emb = hidden[:, 0]  # (N, H)
        if self.cfg.normalize:
            emb = F.normalize(emb, dim=-1)
        seconds = clock() - t0
        n, length = enc["input_ids"].shape
        shape = ModelShape.of(tower, tower.config.num_hidden_layers, tower.config.hidden_size)
        self.ledger.charge_model(
            component,
            shape,
            [length] * n,
            real_tokens=int(enc["attention_mask"].sum()),
            seconds=seconds,
            activity=activity,
        )
        return emb.float()


def build_retriever(cfg, texts: List[str], ledger: Ledger, seed: int) -> DualEncoder:
    """Build from `cfg.retriever`: tiny (tokenizer trained on `texts`), minilm (bundled) or HF name/path."""
    name = cfg.model
    if name == "auto":
        name = "minilm" if modelzoo.minilm_available() else "tiny"
        print(f"retriever.model=auto -> {name}", flush=True)
    if name == "tiny":
        tok = modelzoo.train_wordpiece(texts, cfg.tiny.vocab_size)
        enc = modelzoo.tiny_encoder(cfg.tiny, tok, seed)
    else:
        path = str(modelzoo.minilm_path()) if name == "minilm" else name
        enc, tok = modelzoo.load_hf(path, "retriever.model", causal=False)
    doc = enc if cfg.shared_towers else copy.deepcopy(enc)
    return DualEncoder(enc, doc, tok, cfg, ledger)
