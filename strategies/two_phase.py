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
from ragtune.config import choice
from ragtune.strategy import Phase, Strategy


@dataclass
class Options:
    marginal: str = choice("token", "token", "sequence")  # RAG-Token | RAG-Sequence
    reduction: str = choice("sum", *losses.REDUCTIONS)
    generator_fraction: float = 0.5  # share of train.steps for phase 1

    def validate(self):
        if not 0 < self.generator_fraction < 1:
            raise ValueError("config key 'strategy.generator_fraction': must be in (0, 1)")


class TwoPhase(Strategy):
    name = "two_phase"
    summary = "phase 1: generator (retriever frozen); phase 2: query encoder (generator frozen); marginal loss"
    paper = "Lawton et al. 2025, arXiv 2510.01600"
    Options = Options

    def phases(self):
        f = self.opts.generator_fraction
        return [
            Phase("generator", frozenset({"generator"}), f),
            Phase("retriever", frozenset({"query_encoder"}), 1 - f),
        ]

    def loss(self, batch, rag, ctx):
        ret, tok_lp, mask = rag.retrieve_and_read(batch, ctx.k)  # scores (B, K), (B, K, T)
        return losses.marginal_nll(self.opts.marginal, ret.scores, tok_lp, mask, self.opts.reduction), ret.logs()
