"""What `vrag` and `jsa` share: a posterior retriever q(z|x,y) next to the prior p(z|x).

Both treat the passage as a latent variable and add a posterior query tower over the text
"question [SEP] answer" (its own max length), initialised from the prior's query tower in
`setup`, sharing the passage embeddings (so the index serves both), trained with a learning rate
of the query-encoder family. Their candidate set per question is the union of the prior's top-k
and the posterior's top-k (plus, for jsa, a cached sample), and p and q are both renormalised
over it. This module holds only that shared plumbing; the estimators are in `ragtune.losses`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch

from ragtune import losses
from ragtune.candidates import Candidates
from ragtune.config import choice, positive
from ragtune.data import Question
from ragtune.strategy import Part, Phase, Strategy


@dataclass
class LatentOptions:
    posterior_max_length: int = positive(64)  # tokens of "question [SEP] answer"
    reduction: str = choice("sum", *losses.REDUCTIONS)  # sum: true sequence log-likelihoods


@dataclass
class Latent:
    """One batch's candidate set with the prior's and the posterior's log-probs over it."""

    cands: Candidates  # (B, C)
    log_prior: torch.Tensor  # (B, C) log p(z|x) renormalised over C, -inf at padding, with grad
    log_q: torch.Tensor  # (B, C) log q(z|x,y) renormalised over C, -inf at padding, with grad


class LatentPassage(Strategy):
    """Base of the strategies with a posterior tower; subclasses write `loss`."""

    def phases(self):
        return [Phase("joint", frozenset({"query_encoder", "posterior", "generator"}), 1.0)]

    def parts(self):
        return [Part("posterior", trainable=True, lr_like="query_encoder")]

    def setup(self, rag) -> None:
        self.posterior = copy.deepcopy(rag.retriever.query_encoder)  # q starts as the prior

    def default_decoder(self) -> str:
        return "thorough"  # the model p(z|x) p(y|x,z) is RAG-Sequence's

    def posterior_texts(self, rag, batch: Sequence[Question]) -> List[str]:
        sep = getattr(rag.retriever.tokenizer, "sep_token", None) or "[SEP]"
        return [f"{q.question} {sep} {q.answers[0]}" for q in batch]

    def encode(self, rag, batch: Sequence[Question]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Prior and posterior query embeddings (B, H) each, with grad."""
        qp = rag.encode_questions([q.question for q in batch])  # (B, H)
        qq = rag.encode(self.posterior_texts(rag, batch), self.posterior, "posterior", self.opts.posterior_max_length)
        return qp, qq

    def latent(self, rag, qp: torch.Tensor, qq: torch.Tensor, k: int, extra: Candidates = None) -> Latent:
        """C = prior top-k U posterior top-k (U `extra`), p and q renormalised over C."""
        prior = Candidates.of(rag.search(qp, k), "prior")  # (B, k)
        post = Candidates.of(rag.search(qq, k), "posterior")  # (B, k)
        cands = prior.union(post, *([extra] if extra is not None else []))  # (B, C)
        log_prior = losses.renormalised_log_probs(rag.score_candidates(qp, cands), cands.mask)  # (B, C)
        log_q = losses.renormalised_log_probs(rag.score_candidates(qq, cands), cands.mask)  # (B, C)
        return Latent(cands, log_prior, log_q)

    def seq_logprobs(self, tok_lp: torch.Tensor, mask: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
        """tok_lp (B, C, T), mask (B, T), scored (B, C) -> log p_G(y|x,z) (B, C), -inf where not scored."""
        lp = losses.seq_logprob(tok_lp, mask, self.opts.reduction)  # (B, C)
        return lp.masked_fill(~scored, float("-inf"))

    @staticmethod
    def latent_logs(lat: Latent) -> dict:
        m = lat.cands.mask
        return {
            "candidates": float(lat.cands.sizes().float().mean()),
            "prior_entropy": float(losses.retrieval_entropy(lat.log_prior.detach()).mean()),
            "posterior_entropy": float(losses.retrieval_entropy(lat.log_q.detach()).mean()),
            "distinct_passages": float(lat.cands.rows[m].unique().numel()),
        }
