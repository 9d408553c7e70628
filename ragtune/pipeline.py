"""The RAG pipeline every strategy trains: retriever + index + generator (+ the strategy's own parts).

`RAGPipeline` is one nn.Module so accelerate/DDP can wrap it; its `forward(batch, step)` is the
strategy's loss. The retrieval helpers live here (not in strategies) so that every strategy gets
scores the same way: index search without grad, then differentiable scores from the query tower
against stored passage embeddings, or against freshly re-encoded passages when the passage tower
is being trained.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence

import torch
from torch import nn

from ragtune.cost import Ledger
from ragtune.data import Corpus, Question
from ragtune.generator import Generator
from ragtune.index import DenseIndex
from ragtune.losses import retrieval_entropy
from ragtune.retriever import DualEncoder


@dataclass
class Retrieval:
    rows: torch.Tensor      # (B, K) corpus rows, best first
    scores: torch.Tensor    # (B, K) s(x, z) / tau, differentiable w.r.t. trained towers
    texts: List[List[str]]  # (B, K) passage texts
    ids: List[List[str]]    # (B, K) passage ids

    def logs(self) -> Dict[str, float]:
        """Entropy of p(z|x) and distinct passages retrieved: watch for retrieval collapse."""
        return {"retrieval_entropy": float(retrieval_entropy(self.scores.detach().float()).mean()),
                "distinct_passages": float(self.rows.unique().numel())}


class RAGPipeline(nn.Module):
    def __init__(self, retriever: DualEncoder, generator: Generator, index: DenseIndex, corpus: Corpus,
                 ledger: Ledger, strategy: nn.Module):
        super().__init__()
        self.retriever = retriever
        self.generator = generator
        self.strategy = strategy
        self.index = index
        self.corpus = corpus
        self.ledger = ledger
        self.passage_texts = [corpus.passage_text(p) for p in corpus]
        self.doc_trained = False  # set by the trainer: passage tower receives gradients this phase

    def forward(self, batch: Sequence[Question], step: int):
        return self.strategy.loss(batch, self, step)

    # ---- components -------------------------------------------------------------------------
    def component_params(self) -> Dict[str, List[nn.Parameter]]:
        """Trainable parameters per component (LoRA adapters only when LoRA is on)."""
        gen = self.generator.model
        gen_params = ([p for n, p in gen.named_parameters() if "lora_" in n] if hasattr(gen, "peft_config")
                      else list(gen.parameters()))
        q = list(self.retriever.query_encoder.parameters())
        d = [] if self.retriever.shared else list(self.retriever.doc_encoder.parameters())
        return {"query_encoder": q, "doc_encoder": d, "generator": gen_params,
                "strategy": list(self.strategy.parameters())}

    # ---- retrieval ----------------------------------------------------------------------------
    def refresh_index(self, batch_size: int = 256) -> None:
        """Re-embed the whole corpus with the passage tower in eval mode (charged as `index`)."""
        tower = self.retriever.doc_encoder
        was_training = tower.training
        tower.eval()  # no dropout in stored embeddings
        with torch.no_grad():
            embs = [self.retriever.encode_passages(self.passage_texts[i:i + batch_size], kind="index")
                    for i in range(0, len(self.passage_texts), batch_size)]
        tower.train(was_training)
        self.index.build(torch.cat(embs))

    def set_modes(self, trains) -> None:
        """Train mode (dropout) only for the components being trained; frozen ones act as at inference."""
        self.eval()
        modules = {"query_encoder": self.retriever.query_encoder, "doc_encoder": self.retriever.doc_encoder,
                   "generator": self.generator, "strategy": self.strategy}
        for comp in trains:
            modules[comp].train()

    def encode_questions(self, questions: Sequence[str]) -> torch.Tensor:
        return self.retriever.encode_queries(list(questions))  # (B, H)

    def score_rows(self, q: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """q (B, H), rows (B, C) -> (B, C) scores / tau; passages re-encoded if the tower trains."""
        if self.doc_trained:
            flat = rows.reshape(-1).tolist()
            d = self.retriever.encode_passages([self.passage_texts[r] for r in flat]).view(*rows.shape, -1)
        else:
            d = self.index.lookup(rows)  # (B, C, H)
        return self.retriever.score(q, d.to(q.dtype))

    def retrieve(self, questions: Sequence[str], k: int, q: torch.Tensor = None) -> Retrieval:
        """Top-k from the index; scores carry gradient into the query (and passage) tower."""
        q = self.encode_questions(questions) if q is None else q
        _, rows = self.index.search(q, k)
        return self.make_retrieval(q, rows)

    def make_retrieval(self, q: torch.Tensor, rows: torch.Tensor) -> Retrieval:
        scores = self.score_rows(q, rows)
        rows_list = rows.tolist()
        texts = [[self.passage_texts[r] for r in row] for row in rows_list]
        ids = [[self.corpus[r].id for r in row] for row in rows_list]
        return Retrieval(rows=rows, scores=scores, texts=texts, ids=ids)

    def retrieve_and_read(self, batch: Sequence[Question], k: int):
        """Top-k retrieval + the answer's per-token log-probs under each passage.
        Returns (Retrieval, tok_lp (B, K, T), mask (B, T)); the first answer is the target."""
        questions = [q.question for q in batch]
        ret = self.retrieve(questions, k)
        tok_lp, mask = self.generator.answer_logprobs(questions, ret.texts, [q.answers[0] for q in batch])
        return ret, tok_lp, mask

    def rows_of(self, ids: Sequence[str]) -> List[int]:
        return [self.corpus.row(i) for i in ids]
