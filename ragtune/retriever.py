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

Corpus token ids are cached (`corpus_tokens`): a corpus is tokenised once per (tokenizer object,
max length, prefix) into one flat id array (about 2 bytes per token for vocabularies under 65,536),
and `encode_tokens` embeds any rows of it padded exactly as the tokenizer pads a batch, so index
refreshes and passage re-encodings never tokenise again (with the tiny encoder tokenisation was
59% of a refresh). The tiny encoder's WordPiece vocabulary is cached on disk
(`modelzoo.cached_tokenizer`, `<data.cache_dir>/tokenizers/<key>`): training it on a 1M-passage
corpus takes longer than embedding it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ragtune import modelzoo
from ragtune.flops import ModelShape
from ragtune.ledger import Ledger, clock
from ragtune.precision import DTYPES, fp32, upcast


@dataclass
class CorpusTokens:
    """Token ids of every text of a corpus, truncated as the tokenizer truncates: row i is
    `ids[offsets[i]:offsets[i + 1]]` (special tokens included)."""

    ids: np.ndarray  # (T,) uint16 or int32, all rows concatenated
    offsets: np.ndarray  # (N + 1,) int64
    pad_id: int
    padding_side: str
    token_types: bool  # the tokenizer returns token_type_ids (all 0 for single texts)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)  # (N,)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def batch(self, rows: Sequence[int]) -> Dict[str, torch.Tensor]:
        """The tokenizer's `padding=True` batch of `rows`: input_ids, attention_mask (B, L_max)."""
        rows = np.asarray(rows, dtype=np.int64)
        lens = self.lengths[rows]  # (B,)
        width = int(lens.max()) if len(rows) else 0
        cols = np.arange(width)[None, :]  # (1, L)
        start = (width - lens)[:, None] if self.padding_side == "left" else np.zeros((len(rows), 1), np.int64)
        mask = (cols >= start) & (cols < start + lens[:, None])  # (B, L) real tokens
        src = np.clip(self.offsets[rows][:, None] + cols - start, 0, max(len(self.ids) - 1, 0))  # (B, L)
        ids = np.where(mask, self.ids[src].astype(np.int64) if len(self.ids) else 0, self.pad_id)
        mask = mask.astype(np.int64)
        out = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
        if self.token_types:
            out["token_type_ids"] = torch.zeros_like(out["input_ids"])
        return out


def tokenize_corpus(
    tokenizer, texts: Sequence[str], max_length: int, chunk: int = 4096, prefix: str = ""
) -> CorpusTokens:
    """Tokenise `prefix + text` for each of `texts` once, `chunk` at a time (bounded Python-object
    memory: no prefixed copy of the corpus), into flat ids."""
    dtype = np.uint16 if len(tokenizer) <= 2**16 else np.int32
    parts, lens = [], []
    for i in range(0, len(texts), chunk):
        enc = tokenizer(
            [prefix + t for t in texts[i : i + chunk]],
            truncation=True,
            max_length=max_length,
            return_attention_mask=False,
            return_token_type_ids=False,
        )["input_ids"]
        lens.extend(len(x) for x in enc)
        parts.append(np.fromiter((t for x in enc for t in x), dtype=dtype))
    offsets = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    return CorpusTokens(
        ids=np.concatenate(parts) if parts else np.zeros(0, dtype=dtype),
        offsets=offsets,
        pad_id=int(tokenizer.pad_token_id),
        padding_side=getattr(tokenizer, "padding_side", "right"),
        token_types="token_type_ids" in getattr(tokenizer, "model_input_names", ()),
    )


class DualEncoder(nn.Module):
    def __init__(self, query_encoder: nn.Module, doc_encoder: nn.Module, tokenizer, cfg, ledger: Ledger):
        super().__init__()
        self.query_encoder = query_encoder
        self.doc_encoder = doc_encoder  # may be the same object as query_encoder
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.ledger = ledger
        self.temperature = float(cfg.temperature)
        # (id(tokenizer), id(texts), len(texts), max_length, prefix) -> (tokenizer, texts, tokens);
        # the entry holds the tokenizer and the texts, so neither id can be reused while it lives
        self._token_cache: Dict[tuple, tuple] = {}

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

    def corpus_tokens(self, texts: Sequence[str], max_length: int, prefix: str) -> CorpusTokens:
        """Token ids of `prefix + text` for every text, computed once per tokenizer object,
        texts object, max length and prefix (a refresh after the first one never tokenises)."""
        key = (id(self.tokenizer), id(texts), len(texts), int(max_length), prefix)
        hit = self._token_cache.get(key)
        if hit is None:
            hit = (self.tokenizer, texts, tokenize_corpus(self.tokenizer, texts, max_length, prefix=prefix))
            self._token_cache = {key: hit}  # one corpus at a time: a stale entry is memory, not speed
        return hit[2]

    def passage_tokens(self, texts: Sequence[str]) -> CorpusTokens:
        """`corpus_tokens` as the passage tower reads them (passage prefix, max passage length)."""
        return self.corpus_tokens(texts, self.cfg.max_passage_length, self.cfg.passage_prefix)

    def score(self, q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """q (B, H), d (B, K, H) -> (B, K) temperature-scaled scores, in float32 under autocast too
        (`ragtune.precision.fp32`: a bf16 score s/tau resolves 0.125 near 20)."""
        with fp32(q):
            return torch.einsum("bh,bkh->bk", upcast(q), upcast(d)) / self.temperature

    def encode(
        self, texts: List[str], tower: nn.Module, component: str, max_length: int, activity: Optional[str] = None
    ) -> torch.Tensor:
        """(N,) texts -> (N, H) float32 embeddings of any tower sharing this tokenizer, charged under
        `component`. Grad flows only if grad mode is on and the tower has trainable weights.
        `activity` forces the ledger activity (e.g. "index"); by default train vs score follows grad
        mode."""
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return self.encode_tokens(enc, tower, component, activity)

    def encode_tokens(
        self, enc: Dict[str, torch.Tensor], tower: nn.Module, component: str, activity: Optional[str] = None
    ) -> torch.Tensor:
        """A tokenised batch (input_ids, attention_mask (N, L)[, token_type_ids]) -> (N, H), run,
        pooled, normalised and charged as `encode` does (`encode` tokenises, then calls this)."""
        device = next(tower.parameters()).device
        enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        t0 = clock()
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in tower.parameters())
        with torch.set_grad_enabled(grad):
            hidden = tower(**enc).last_hidden_state  # (N, L, H)
        hidden = hidden.float()  # pooled and normalised in float32 whatever the compute dtype
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


def build_retriever(cfg, texts: List[str], ledger: Ledger, seed: int, cache_dir: str = "") -> DualEncoder:
    """Build from `cfg.retriever`: tiny (tokenizer trained on `texts`, cached under `cache_dir`
    when given), minilm (bundled) or HF name/path, both towers in `cfg.dtype` (the trained ones
    become float32 master weights in `RAGPipeline.setup_strategy`; a frozen passage tower can
    embed the corpus in bf16)."""
    name = cfg.model
    if name == "auto":
        name = "minilm" if modelzoo.minilm_available() else "tiny"
        print(f"retriever.model=auto -> {name}", flush=True)
    dtype = DTYPES[cfg.dtype]
    if name == "tiny":
        tok = modelzoo.cached_tokenizer("wordpiece", texts, cfg.tiny.vocab_size, cache_dir)
        enc = modelzoo.tiny_encoder(cfg.tiny, tok, seed)
    else:
        path = str(modelzoo.minilm_path()) if name == "minilm" else name
        enc, tok = modelzoo.load_hf(path, "retriever.model", causal=False, dtype=dtype)
    enc = enc.to(dtype)  # a tower a phase trains is cast to float32 by RAGPipeline.setup_strategy
    doc = enc if cfg.shared_towers else copy.deepcopy(enc)
    return DualEncoder(enc, doc, tok, cfg, ledger)
