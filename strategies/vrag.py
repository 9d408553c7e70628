"""`vrag`: variational RAG, trained on the evidence lower bound (Mishra et al. 2022, as used as a
baseline in Cao et al. 2025, "JSA-RAG", arXiv 2508.18168).

A posterior retriever q(z|x,y) (a strategy-owned query tower over "question [SEP] answer",
initialised from the prior's tower, sharing the passage embeddings; see `strategies.latent`)
gives the bound

    log p(y|x) >= E_q[ log p_G(y|x,z) ] - kl_beta * KL( q(z|x,y) || p(z|x) ),

over the candidate set C = prior top-k U posterior top-k, with q and p both renormalised over C.
The expectation is taken exactly over C (no sampling; C contains the posterior's top-k) and the
KL is summed over C: with kl_beta = 1 this is the ELBO of the marginal over C, equal to it iff q
is the exact posterior (`ragtune.losses.elbo`). Gradients: the generator through the
reconstruction term, the posterior through reconstruction + KL, the prior only through the KL.

Where the reference code is wrong and this is not: it averaged the KL over the union's size
(reduction 'mean') and length-normalised the likelihood, so its loss was not the ELBO. Here the
likelihood is summed over answer tokens (`reduction=sum`, `mean` as a deliberate option).
A deliberate deviation from the usual recipe (expectation over q renormalised on the posterior's
top-k, KL over the union with q renormalised there): that uses two different q's, so its
objective bounds nothing; here one q over C serves both terms, which makes it the exact ELBO and
costs up to 2k generator sequences with grad per question instead of k. The JSA paper reports
frequent gradient-norm spikes for VRAG (its motivation); `diagnostics.grad_variance_every`
measures the variance on fixed batches.
"""

from __future__ import annotations

from dataclasses import dataclass

from ragtune import losses
from ragtune.config import nonneg

from .latent import LatentOptions, LatentPassage


@dataclass
class Options(LatentOptions):
    kl_beta: float = nonneg(1.0)  # weight of KL(q || p); 1 = the ELBO


class VRAG(LatentPassage):
    name = "vrag"
    summary = "variational RAG: posterior tower q(z|x,y), exact ELBO over prior U posterior top-k"
    paper = "Mishra et al. 2022; as in Cao et al. 2025, arXiv 2508.18168"
    Options = Options

    def loss(self, batch, rag, ctx):
        qp, qq = self.encode(rag, batch)  # (B, H) each
        lat = self.latent(rag, qp, qq, ctx.k)  # candidates (B, C)
        tok_lp, mask, scored = rag.read_candidates(batch, lat.cands)  # (B, C, T), (B, T), (B, C)
        seq_lp = self.seq_logprobs(tok_lp, mask, scored)  # (B, C)
        bound = losses.elbo(lat.log_q, lat.log_prior, seq_lp, self.opts.kl_beta)  # (B,)
        kl = losses.kl_categorical(lat.log_q.detach(), lat.log_prior.detach())  # (B,)
        return -bound.mean(), {**self.latent_logs(lat), "elbo": float(bound.detach().mean()), "kl": float(kl.mean())}
