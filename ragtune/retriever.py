"""Dual-encoder retriever: s(x, z) = E_q(x) . E_d(z) / tau.

Two named methods, `encode_queries` and `encode_passages`, no mode flags. Towers are separate
copies of the same initial encoder by default (query-side-only training keeps the index valid);
`shared_towers` makes them one module. Every call is charged to the ledger here, from the real
(padded) token counts, as `train` when the tower is being trained under grad, else `score`.
"""
from __future__ import annotations

import copy
import time
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ragtune.cost import Ledger, ModelShape, backward_flops, forward_flops
from ragtune import modelzoo


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

    def encode_queries(self, texts: List[str], kind: Optional[str] = None) -> torch.Tensor:
        """(B,) texts -> (B, H) embeddings."""
        return self._encode(self.query_encoder, "query_encoder", texts, self.cfg.max_query_length, kind)

    def encode_passages(self, texts: List[str], kind: Optional[str] = None) -> torch.Tensor:
        """(N,) texts -> (N, H) embeddings."""
        return self._encode(self.doc_encoder, "doc_encoder", texts, self.cfg.max_passage_length, kind)

    def score(self, q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """q (B, H), d (B, K, H) -> (B, K) temperature-scaled scores."""
        return torch.einsum("bh,bkh->bk", q, d) / self.temperature

    def _encode(self, tower: nn.Module, name: str, texts: List[str], max_len: int, kind: Optional[str]):
        device = next(tower.parameters()).device
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        t0 = time.perf_counter()
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in tower.parameters())
        with torch.set_grad_enabled(grad):
            hidden = tower(**enc).last_hidden_state  # (N, L, H)
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (N, L, 1)
        if self.cfg.pooling == "mean":
            emb = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        else:
            emb = hidden[:, 0]
        if self.cfg.normalize:
            emb = F.normalize(emb, dim=-1)
        self._charge(tower, name, enc, kind, time.perf_counter() - t0)
        return emb.float()

    def _charge(self, tower, name, enc, kind, seconds):
        n, length = enc["input_ids"].shape
        conf = tower.config
        shape = ModelShape.of(tower, conf.num_hidden_layers, conf.hidden_size)
        lens = [length] * n
        trained = torch.is_grad_enabled() and shape.trainable_matmul_params > 0
        kind = kind or ("train" if trained else "score")
        flops = forward_flops(shape, lens)
        if kind == "train":
            flops += backward_flops(shape, lens)
        self.ledger.charge(name, kind, tokens=n * length, real_tokens=int(enc["attention_mask"].sum()),
                           flops=flops, seconds=seconds)


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
