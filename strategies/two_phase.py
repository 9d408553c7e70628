"""`two_phase`: generator first, then retriever, both with the marginal loss (Lawton et al. 2025,
arXiv 2510.01600).

No labels. Phase 1 freezes the retriever and trains the generator with the RAG-Token marginal
NLL over the top-K; phase 2 freezes the generator and trains the query encoder with the same
loss (its gradient w.r.t. the scores is prior minus posterior). Each phase has one learning rate,
so the experiment runner can search a 1-D grid per phase (`train.only_phase`, `train.init_from`)
instead of a 2-D one: the strategy's selling point.
"""
from __future__ import annotations

from dataclasses import dataclass

from ragtune import losses
from ragtune.strategy import Phase, Strategy


@dataclass
class Options:
    marginal: str = "token"          # token (RAG-Token) | sequence (RAG-Sequence)
    reduction: str = "sum"
    generator_fraction: float = 0.5  # share of train.steps for phase 1

    def validate(self):
        if self.marginal not in ("token", "sequence"):
            raise ValueError("config key 'strategy.marginal': must be token or sequence")
        if not 0 < self.generator_fraction < 1:
            raise ValueError("config key 'strategy.generator_fraction': must be in (0, 1)")


def marginal_nll(kind: str, scores, tok_lp, mask, reduction: str):
    fn = losses.rag_token_nll if kind == "token" else losses.rag_sequence_nll
    return fn(scores, tok_lp, mask, reduction)


class TwoPhase(Strategy):
    name = "two_phase"
    summary = "phase 1: generator (retriever frozen); phase 2: query encoder (generator frozen); marginal loss"
    paper = "Lawton et al. 2025, arXiv 2510.01600"
    Options = Options

    def phases(self):
        f = self.opts.generator_fraction
        return [Phase("generator", frozenset({"generator"}), f),
                Phase("retriever", frozenset({"query_encoder"}), 1 - f)]

    def loss(self, batch, m, step):
        ret, tok_lp, mask = m.retrieve_and_read(batch, self.cfg.train.k)  # scores (B, K), (B, K, T)
        return marginal_nll(self.opts.marginal, ret.scores, tok_lp, mask, self.opts.reduction), ret.logs()
