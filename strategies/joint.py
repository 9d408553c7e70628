"""`joint`: retriever and generator updated from the same batch with two learning rates
(Lawton et al. 2025, arXiv 2510.01600; retriever-feedback options from Atlas and REPLUG).

`retriever_loss`:
- `marginal` (default): RAG-Token (or RAG-Sequence) marginal NLL, gradients into both models.
- `pdist`: generator NLL on the retrieved passages (uniform 1/K) + Atlas perplexity distillation /
  REPLUG LSR, KL(softmax(sg(log p_G(y|x,z_k)) / gen_temperature) || softmax(s(x,z_k))) for the retriever
  (Izacard et al. 2022, arXiv 2208.03299; Shi et al. 2023, arXiv 2301.12652).
- `emdr2`: generator NLL as above + the EMDR^2 retriever objective, the posterior-weighted
  signal through sg() generator likelihoods (Singh et al. 2021, arXiv 2106.05346).
"""

from __future__ import annotations

from dataclasses import dataclass

from ragtune import losses
from ragtune.config import choice, positive
from ragtune.strategy import Phase, Strategy


@dataclass
class Options:
    retriever_loss: str = choice("marginal", "marginal", "pdist", "emdr2")
    marginal: str = choice("token", "token", "sequence")  # for retriever_loss=marginal
    gen_temperature: float = positive(1.0)  # pdist target temperature
    train_doc_encoder: bool = False
    reduction: str = choice("sum", *losses.REDUCTIONS)


class Joint(Strategy):
    name = "joint"
    summary = "query encoder and generator trained together on one loss, two learning rates"
    paper = "Lawton et al. 2025, arXiv 2510.01600"
    Options = Options

    def phases(self):
        comps = {"query_encoder", "generator"} | ({"doc_encoder"} if self.opts.train_doc_encoder else set())
        return [Phase("joint", frozenset(comps), 1.0)]

    def loss(self, batch, rag, ctx):
        o = self.opts
        ret, tok_lp, mask = rag.retrieve_and_read(batch, ctx.k)  # scores (B, K), (B, K, T)
        if o.retriever_loss == "marginal":
            return losses.marginal_nll(o.marginal, ret.scores, tok_lp, mask, o.reduction), ret.logs()
        gen = losses.nll_given_passages(tok_lp, mask, reduction=o.reduction)
        seq_lp = losses.seq_logprob(tok_lp, mask, o.reduction)  # (B, K)
        if o.retriever_loss == "pdist":
            retr = losses.distill_kl(ret.scores, seq_lp, o.gen_temperature)
        else:
            retr = losses.emdr2_loss(ret.scores, seq_lp)
        return gen + retr, {**ret.logs(), "generator_loss": float(gen), "retriever_loss": float(retr)}
