"""Training objectives for retrieval-augmented generation (pure tensor functions).

Everything here is a stateless function of tensors so that strategies can
compose objectives and so that each one can be checked against exact
enumeration on tiny hand-built cases (see ``tests/test_losses.py``).

Notation (shared by every function)
-----------------------------------
``B`` questions, ``K`` retrieved passages per question, ``T`` answer tokens.

* ``scores``  (B, K): retrieval scores ``s(x, z_k)`` *already divided by the
  retriever temperature*; the retrieval prior is ``p(z_k|x) = softmax_k(s)``.
  Passages that must not count may carry ``-inf``.
* ``tok_lp``  (B, K, T): ``log p(y_t | x, z_k, y_<t)`` from a *decoder-only*
  generator, already aligned to the answer tokens (no decoder-start token).
* ``mask``    (B, T): 1/True for real answer tokens, 0/False for padding.  The
  answer tokens are identical for every k, hence one mask per question.

Reduction convention (explicit, never silent)
---------------------------------------------
Every loss takes ``reduction`` in ``{"sum", "mean"}``:

* ``"sum"`` (default): log-probabilities are **summed over the real answer
  tokens** (a true sequence log-likelihood, *no* length normalisation), and
  the per-question losses are then **averaged over the batch**.
* ``"mean"``: log-probabilities are **averaged over the real answer tokens**
  (length normalised, per-token) and then averaged over the batch.

Only the batch dimension is ever averaged by default; nothing divides by the
answer length unless ``reduction="mean"`` is requested.

References
----------
* Lewis et al. 2020, "Retrieval-Augmented Generation for Knowledge-Intensive
  NLP Tasks", arXiv:2005.11401 (RAG-Sequence, RAG-Token).
* Singh et al. 2021, "End-to-End Training of Multi-Document Reader and
  Retriever for Open-Domain Question Answering", arXiv:2106.05346 (EMDR^2).
* Izacard et al. 2022, "Atlas: Few-shot Learning with Retrieval Augmented
  Language Models", arXiv:2208.03299 (perplexity distillation).
* Shi et al. 2023, "REPLUG: Retrieval-Augmented Black-Box Language Models",
  arXiv:2301.12652 (LM-supervised retrieval, LSR).
* Mishra et al. 2022 / Cao et al. 2025 (VRAG as used in arXiv:2508.18168): the ELBO.
* Cao et al. 2025, "JSA-RAG", arXiv:2508.18168, and Ou & Song 2020, "Joint Stochastic
  Approximation and Its Application to Learning Discrete Latent Variable Models",
  arXiv:2005.14001 (Metropolis independence sampler, inclusive-KL proposal training).
* Karpukhin et al. 2020, "Dense Passage Retrieval", arXiv:2004.04906, and
  van den Oord et al. 2018, arXiv:1807.03748 (InfoNCE / in-batch negatives).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ragtune.precision import fp32, upcast

__all__ = [
    "REDUCTIONS",
    "seq_logprob",
    "rag_sequence_nll",
    "rag_token_nll",
    "marginal_nll",
    "nll_given_passages",
    "contrastive_loss",
    "distill_kl",
    "emdr2_loss",
    "retrieval_entropy",
    "kl_categorical",
    "renormalised_log_probs",
    "elbo",
    "mis_proposals",
    "mis_chain",
    "jsa_loss",
]

REDUCTIONS = ("sum", "mean")


# --------------------------------------------------------------------------- helpers
def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _check_tok(tok_lp: Tensor, mask: Tensor) -> None:
    if tok_lp.dim() != 3 or mask.dim() != 2:
        raise ValueError(f"expected tok_lp (B,K,T) and mask (B,T), got {tuple(tok_lp.shape)} and {tuple(mask.shape)}")
    if tok_lp.shape[0] != mask.shape[0] or tok_lp.shape[2] != mask.shape[1]:
        raise ValueError(f"tok_lp {tuple(tok_lp.shape)} does not match mask {tuple(mask.shape)}")


def _check_scores(scores: Tensor, other: Tensor, name: str) -> None:
    if scores.dim() != 2 or tuple(scores.shape) != tuple(other.shape[:2]):
        raise ValueError(f"scores {tuple(scores.shape)} must be (B,K) matching {name} {tuple(other.shape)}")


def _masked_reduce(x: Tensor, mask: Tensor, reduction: str) -> Tensor:
    """Sum (or mean) of ``x`` (..., T) over positions where ``mask`` (..., T) is true.

    Padding positions are *selected away* with ``torch.where`` (not multiplied
    by 0), so ``-inf``/NaN garbage at padded positions cannot leak into the
    value or the gradient.
    """
    keep = mask.to(torch.bool)
    total = torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum(-1)
    if reduction == "mean":
        total = total / keep.sum(-1).clamp_min(1).to(x.dtype)
    return total


# --------------------------------------------------------------------------- generator side
def seq_logprob(tok_lp: Tensor, mask: Tensor, reduction: str = "sum") -> Tensor:
    """Sequence log-probability of the answer under each passage.

    ``"sum"``:  log p(y | x, z_k) = sum_t m_t log p(y_t | x, z_k, y_<t)
    ``"mean"``: (1 / sum_t m_t) * sum_t m_t log p(y_t | x, z_k, y_<t)
    (per-token average; a question with no answer tokens gets 0).

    tok_lp (B, K, T), mask (B, T)  ->  (B, K)
    """
    _check_reduction(reduction)
    _check_tok(tok_lp, mask)
    return _masked_reduce(tok_lp, mask.unsqueeze(1), reduction)  # (B, K)


def rag_sequence_nll(scores: Tensor, tok_lp: Tensor, mask: Tensor, reduction: str = "sum") -> Tensor:
    """RAG-Sequence negative log-likelihood (Lewis et al. 2020, arXiv:2005.11401, eq. 1).

    The *same* passage generates the whole answer, so the marginal is taken
    over sequence likelihoods::

        p(y|x)   = sum_k p(z_k|x) prod_t p(y_t | x, z_k, y_<t)
        loss_b   = -logsumexp_k [ log_softmax(s_b)_k + log p(y_b | x_b, z_k) ]
        loss     = mean_b loss_b

    ``reduction="sum"`` is the exact marginal likelihood above.
    ``reduction="mean"`` replaces ``log p(y|x,z_k)`` by its per-token mean
    ``(1/|y|) log p(y|x,z_k)``.  That is a *tempered* objective
    ``-log sum_k p(z_k|x) p(y|x,z_k)^{1/|y|}``: it is NOT ``1/|y|`` times the
    sum version and not a likelihood of ``y``; it flattens the passage
    posterior (less peaked than the true one).  Use it only deliberately.

    scores (B, K), tok_lp (B, K, T), mask (B, T)  ->  scalar
    """
    _check_scores(scores, tok_lp, "tok_lp")
    lp = seq_logprob(tok_lp, mask, reduction)  # (B, K)
    log_prior = F.log_softmax(scores, dim=-1)  # (B, K)
    return -torch.logsumexp(log_prior + lp, dim=-1).mean()  # scalar


def rag_token_nll(scores: Tensor, tok_lp: Tensor, mask: Tensor, reduction: str = "sum") -> Tensor:
    """RAG-Token negative log-likelihood (Lewis et al. 2020, arXiv:2005.11401, eq. 2).

    Each answer token may come from a different passage, so the marginal is
    taken per token position::

        p(y|x)   = prod_t sum_k p(z_k|x) p(y_t | x, z_k, y_<t)
        loss_b   = -sum_t m_t logsumexp_k [ log p(z_k|x) + log p(y_t | x, z_k, y_<t) ]
        loss     = mean_b loss_b          ("mean": divide loss_b by sum_t m_t first)

    The log-prior ``log p(z_k|x)`` is added **exactly once at every real
    answer position** and the per-position marginals are then masked and
    summed.  This module assumes a decoder-only generator whose ``tok_lp`` is
    already aligned to the answer tokens, so there is no decoder-start offset.

    Pitfall this avoids: the widely copied encoder-decoder RAG code (e.g. the
    HF ``transformers`` RAG-Sequence ``get_nll``) adds the document log-prior
    to the token log-probs at *target position 1 only*, because position 0 is
    the decoder-start/BOS token there, and relies on the later sum over tokens
    to include the prior once.  Transplanted to a decoder-only model (answer
    starts at position 0, padding given by a mask) that trick silently breaks:
    for a 1-token answer position 1 is padding, so the prior is masked out
    entirely; with left padding it lands on a pad; and applying "add the prior
    at one position" to RAG-Token is simply a different objective (the
    marginalisation over k then ignores the prior at all other positions).
    Here the prior is broadcast over T and masking happens *after* the
    marginalisation over k.

    With ``reduction="mean"`` the result is the per-token average of the
    (exact) per-position marginal NLLs, i.e. ``sum`` divided by the number of
    answer tokens per question before the batch mean.

    scores (B, K), tok_lp (B, K, T), mask (B, T)  ->  scalar
    """
    _check_reduction(reduction)
    _check_tok(tok_lp, mask)
    _check_scores(scores, tok_lp, "tok_lp")
    keep = mask.to(torch.bool).unsqueeze(1)  # (B, 1, T)
    # Zero padded positions *before* the logsumexp: an all -inf column at a pad
    # would otherwise give exp(-inf - -inf) = NaN in the logsumexp backward.
    tok_lp = torch.where(keep, tok_lp, torch.zeros((), dtype=tok_lp.dtype, device=tok_lp.device))
    log_prior = F.log_softmax(scores, dim=-1).unsqueeze(-1)  # (B, K, 1)
    tok_marg = torch.logsumexp(log_prior + tok_lp, dim=1)  # (B, T)
    return -_masked_reduce(tok_marg, mask, reduction).mean()  # scalar


def marginal_nll(kind: str, scores: Tensor, tok_lp: Tensor, mask: Tensor, reduction: str = "sum") -> Tensor:
    """RAG-Token (``kind="token"``) or RAG-Sequence (``kind="sequence"``) marginal NLL."""
    if kind == "token":
        return rag_token_nll(scores, tok_lp, mask, reduction)
    if kind == "sequence":
        return rag_sequence_nll(scores, tok_lp, mask, reduction)
    raise ValueError(f"marginal must be 'token' or 'sequence', got {kind!r}")


def nll_given_passages(
    tok_lp: Tensor, mask: Tensor, weights: Optional[Tensor] = None, reduction: str = "sum"
) -> Tensor:
    """Fixed-weight expected NLL of the answer over the given passages.

    Used to train the generator on a fixed set of retrieved passages (no
    marginalisation, no gradient into any retriever)::

        loss_b = -sum_k w_bk log p(y_b | x_b, z_k)        (w default: 1/K)
        loss   = mean_b loss_b

    This is an upper bound on the NLL of the w-mixture (Jensen).  ``weights``
    may be (B, K) or (K,); they are used as given (not renormalised, not
    detached -- pass ``weights.detach()`` if they come from a model).

    tok_lp (B, K, T), mask (B, T), weights (B, K) | (K,) | None  ->  scalar
    """
    lp = seq_logprob(tok_lp, mask, reduction)  # (B, K)
    if weights is None:
        weights = torch.full_like(lp, 1.0 / lp.shape[1])  # (B, K)
    weights = weights.to(lp).expand_as(lp)  # (B, K)
    # Zero-weight passages must not contribute even when lp = -inf there.
    contrib = torch.where(weights != 0, weights * lp, torch.zeros((), dtype=lp.dtype, device=lp.device))
    return -contrib.sum(-1).mean()  # scalar


# --------------------------------------------------------------------------- retriever side
def contrastive_loss(
    q: Tensor,
    d: Tensor,
    positives: Tensor,
    temperature: float,
    hard_negatives: Optional[Tensor] = None,
    mask_out: Optional[Tensor] = None,
) -> Tensor:
    """InfoNCE / multiple-negatives ranking loss (DPR in-batch negatives).

    ``logits = q @ cand.T / temperature`` and ``loss = mean_b CE(logits_b, positives_b)``
    i.e. ``-log exp(l_b,pos) / sum_j exp(l_b,j)``.

    * ``q`` (B, H) question embeddings; ``d`` (N, H) candidate passages
      (typically the in-batch positives/negatives); ``positives`` (B,) long,
      index into ``d`` of each question's positive.
    * ``hard_negatives``: (M, H) extra candidates shared by all questions, or
      (B, M, H) per-question hard negatives.  Their logits are appended as
      columns ``N .. N+M-1``.
    * ``mask_out``: boolean (B, N) or (B, N+M); True removes a candidate from
      question b's softmax (e.g. another question's copy of b's positive
      passage, which would otherwise be a false negative).  A question's own
      positive column is never removed, even if flagged.

    Returns a scalar (mean over the batch).
    """
    with fp32(q):  # scores in float32 under autocast too (ragtune.precision)
        q, d = upcast(q), upcast(d)
        logits = q @ d.T  # (B, N)
        if hard_negatives is not None:
            hard_negatives = upcast(hard_negatives)
            if hard_negatives.dim() == 2:
                extra = q @ hard_negatives.T  # (B, M)
            elif hard_negatives.dim() == 3:
                extra = torch.einsum("bh,bmh->bm", q, hard_negatives)  # (B, M)
            else:
                raise ValueError(f"hard_negatives must be (M,H) or (B,M,H), got {tuple(hard_negatives.shape)}")
            logits = torch.cat([logits, extra], dim=1)  # (B, N+M)
    logits = logits / temperature
    positives = positives.to(torch.long)
    if mask_out is not None:
        drop = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)  # (B, N+M)
        drop[:, : mask_out.shape[1]] = mask_out.to(torch.bool)
        drop[torch.arange(logits.shape[0], device=logits.device), positives] = False
        logits = logits.masked_fill(drop, float("-inf"))
    return F.cross_entropy(logits, positives)  # scalar


def distill_kl(retriever_scores: Tensor, gen_seq_logprob: Tensor, gen_temperature: float = 1.0) -> Tensor:
    """Perplexity distillation (Atlas, arXiv:2208.03299) / REPLUG LSR (arXiv:2301.12652).

    The generator defines a target distribution over the K passages from how
    well each one lets it produce the answer; the retriever is trained to
    match it::

        p_gen(z_k) = softmax_k( sg(log p(y|x,z_k)) / gen_temperature )
        p_ret(z_k) = softmax_k( retriever_scores )
        loss       = mean_b KL( p_gen || p_ret )

    ``sg`` = stop-gradient: only ``retriever_scores`` receives gradient
    (d loss_b / d s_bk = p_ret_k - p_gen_k).  The loss is 0 when the two
    distributions match.  Pass ``gen_seq_logprob`` from :func:`seq_logprob`
    with the reduction you intend (Atlas uses sequence log-likelihoods).

    retriever_scores (B, K), gen_seq_logprob (B, K)  ->  scalar
    """
    _check_scores(retriever_scores, gen_seq_logprob, "gen_seq_logprob")
    log_p_gen = F.log_softmax(gen_seq_logprob.detach() / gen_temperature, dim=-1)  # (B, K)
    log_p_ret = F.log_softmax(retriever_scores, dim=-1)  # (B, K)
    return kl_categorical(log_p_gen, log_p_ret).mean()  # scalar


def emdr2_loss(scores: Tensor, gen_seq_logprob: Tensor) -> Tensor:
    """EMDR^2 retriever loss (Singh et al. 2021, arXiv:2106.05346).

    Expectation-maximisation with the generator's likelihoods held fixed::

        loss_b = -logsumexp_k [ log_softmax(s_b)_k + sg(log p(y_b | x_b, z_k)) ]
        loss   = mean_b loss_b

    Same value as the RAG-Sequence NLL, but the generator term is detached so
    **only the retriever** gets gradient: d loss_b / d s_bk = prior_k - posterior_k
    with ``posterior_k`` proportional to ``prior_k * p(y|x,z_k)``.  Train the
    generator separately (e.g. :func:`nll_given_passages`).

    scores (B, K), gen_seq_logprob (B, K)  ->  scalar
    """
    _check_scores(scores, gen_seq_logprob, "gen_seq_logprob")
    log_prior = F.log_softmax(scores, dim=-1)  # (B, K)
    return -torch.logsumexp(log_prior + gen_seq_logprob.detach(), dim=-1).mean()  # scalar


# --------------------------------------------------------------------------- distributions
def retrieval_entropy(scores: Tensor) -> Tensor:
    """Entropy (nats) of the retrieval distribution ``softmax(scores)`` per question.

    ``H_b = -sum_k p_bk log p_bk`` with ``0 log 0 = 0``; logged to detect
    retriever collapse (H -> 0) or a uniform, uninformative prior (H -> log K).
    ``-inf`` scores are allowed and give finite gradients.

    scores (B, K)  ->  (B,)
    """
    log_p = F.log_softmax(scores, dim=-1)  # (B, K)
    p = log_p.exp()  # (B, K)
    # Select (not multiply) so that 0 * (-inf) never appears, in value or gradient.
    zero = torch.zeros((), dtype=log_p.dtype, device=log_p.device)
    safe_log_p = torch.where(log_p != float("-inf"), log_p, zero)
    return -(p * safe_log_p).sum(-1)  # (B,)


def kl_categorical(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) = sum_i p_i (log p_i - log q_i) over the last dimension.

    Inputs are normalised log-probabilities on the same support.  Terms with
    ``p_i = 0`` (``log_p = -inf``) contribute exactly 0 in value and gradient,
    even where ``log_q = -inf`` too.  If ``q_i = 0`` while ``p_i > 0`` the KL is
    ``+inf`` (correctly).  Summed (not averaged) over the support.

    log_p (..., C), log_q (..., C)  ->  (...)     e.g. (B, C) -> (B,)
    """
    zero = torch.zeros((), dtype=log_p.dtype, device=log_p.device)
    support = log_p != float("-inf")  # (..., C); NaN stays in support and propagates
    safe_log_p = torch.where(support, log_p, zero)
    safe_log_q = torch.where(support, log_q, zero)
    terms = torch.where(support, safe_log_p.exp() * (safe_log_p - safe_log_q), zero)  # (..., C)
    return terms.sum(-1)  # (...)


def renormalised_log_probs(scores: Tensor, support_mask: Tensor) -> Tensor:
    """log-softmax of ``scores`` restricted to a candidate set.

    ``out_bc = s_bc - logsumexp_{c' in S_b} s_bc'`` for ``c in S_b`` and
    ``-inf`` outside ``S_b`` (``support_mask`` True marks ``S_b``).  Masked-out
    scores receive exactly zero gradient (they are replaced, not multiplied),
    so no NaN can appear even if those scores were ``+-inf``.  Every row must
    contain at least one candidate.  Downstream code should consume the
    ``-inf`` entries with NaN-safe ops (logsumexp, :func:`kl_categorical`,
    :func:`retrieval_entropy`, gather at in-set indices), not ``p * log p``.

    scores (B, C), support_mask (B, C) bool  ->  (B, C)
    """
    support_mask = support_mask.to(torch.bool)
    if support_mask.shape != scores.shape:
        raise ValueError(f"support_mask {tuple(support_mask.shape)} must match scores {tuple(scores.shape)}")
    if not bool(support_mask.any(-1).all()):
        raise ValueError("every row of support_mask needs at least one candidate")
    masked = scores.masked_fill(~support_mask, float("-inf"))  # (B, C)
    return F.log_softmax(masked, dim=-1)  # (B, C)


# --------------------------------------------------------------------------- latent passages
def elbo(log_q: Tensor, log_prior: Tensor, seq_lp: Tensor, kl_beta: float = 1.0) -> Tensor:
    """Evidence lower bound of a variational posterior over a candidate set (VRAG)::

        ELBO_b = sum_c q_bc log p(y_b | x_b, z_c)  -  kl_beta * KL( q_b || p_b )

    with ``q`` and ``p`` normalised over the same candidate set (``-inf`` outside it; see
    :func:`renormalised_log_probs`). The expectation is exact (no sampling) and the KL is
    *summed* over the set (the reference code averaged it over the set size). With
    ``kl_beta = 1`` it is ``log p(y|x) - KL(q || p(z|x,y))``: equal to the log marginal
    likelihood over the set iff q is the exact posterior, lower otherwise. Gradients: the
    generator through ``seq_lp``, q through both terms, the prior only through the KL.
    ``seq_lp`` may hold anything (e.g. -inf) where q has no mass: those terms are selected away.

    log_q (B, C), log_prior (B, C), seq_lp (B, C)  ->  (B,)
    """
    _check_scores(log_q, seq_lp, "seq_lp")
    zero = torch.zeros((), dtype=seq_lp.dtype, device=seq_lp.device)
    support = log_q != float("-inf")  # (B, C)
    q = torch.where(support, log_q, zero).exp().masked_fill(~support, 0.0)  # (B, C)
    recon = torch.where(support, q * torch.where(support, seq_lp, zero), zero).sum(-1)  # (B,)
    return recon - kl_beta * kl_categorical(log_q, log_prior)  # (B,)


def mis_proposals(log_proposal: Tensor, mask: Tensor, steps: int, generator: torch.Generator) -> Tensor:
    """``steps`` independent draws per question from the proposal ``q`` over its candidates.

    The Metropolis *independence* sampler's proposals do not depend on the chain's state, so
    they can be drawn first: the generator then only has to score the distinct passages drawn.

    log_proposal (B, C), mask (B, C) bool  ->  (B, steps) long indices into C
    """
    logits = log_proposal.detach().float().masked_fill(~mask.to(torch.bool), float("-inf"))
    probs = torch.softmax(logits, dim=-1).cpu()  # renormalised over the candidates
    return torch.multinomial(probs, steps, replacement=True, generator=generator).to(log_proposal.device)


def mis_chain(
    log_target: Tensor,
    log_proposal: Tensor,
    mask: Tensor,
    steps: int,
    generator: torch.Generator,
    init: Optional[Tensor] = None,
    proposals: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Metropolis independence sampler over a masked candidate set (Ou & Song 2020; JSA).

    Target pi(z) proportional to exp(log_target) (e.g. p(z|x) p(y|x,z), unnormalised), proposal
    q(z) proportional to exp(log_proposal), both over the candidates where ``mask`` is true.
    With importance weights log w(z) = log_target(z) - log_proposal(z), a proposal z' replaces
    the state z with probability min(1, w(z') / w(z)). Its stationary distribution is pi
    restricted to the candidates. ``init`` (B,) holds each chain's starting state (e.g. a cached
    sample; -1 = none: the first proposal is accepted unconditionally); ``proposals`` (B, steps)
    may be pre-drawn with :func:`mis_proposals` (else they are drawn here, then the uniforms).
    Only the weights at proposed and initial states are read, so ``log_target`` may be NaN
    elsewhere (passages never scored). No gradient.

    log_target (B, C), log_proposal (B, C), mask (B, C)  ->  states (B, steps) long indices into
    C (the state after each step), accepted (B, steps) bool (the proposal was taken)
    """
    mask = mask.to(torch.bool)
    if proposals is None:
        proposals = mis_proposals(log_proposal, mask, steps, generator)
    B = proposals.shape[0]
    dev = proposals.device
    log_u = torch.rand((B, steps), generator=generator).log().to(dev)  # (B, steps)
    if init is None:
        init = torch.full((B,), -1, dtype=torch.long, device=dev)
    log_w = (log_target.detach().float() - log_proposal.detach().float()).masked_fill(~mask, float("nan"))  # (B, C)
    w_prop = log_w.gather(1, proposals)  # (B, steps)
    if torch.isnan(w_prop).any():
        raise ValueError("mis_chain: a proposal has no finite weight (outside the mask, or its target was not scored)")
    state = init.clone()  # (B,)
    w_state = torch.where(state >= 0, log_w.gather(1, state.clamp_min(0).view(-1, 1)).squeeze(1), torch.nan)
    if torch.isnan(w_state[state >= 0]).any():
        raise ValueError("mis_chain: an initial state has no finite weight")
    states, accepted = [], []
    for m in range(steps):
        # a chain without a state takes the proposal; else accept iff log u < log w' - log w
        # (w = 0 states are always left: -inf - -inf is nan, handled by the first clause)
        take = (state < 0) | (w_state == float("-inf")) | (log_u[:, m] < w_prop[:, m] - w_state)  # (B,)
        state = torch.where(take, proposals[:, m], state)
        w_state = torch.where(take, w_prop[:, m], w_state)
        states.append(state)
        accepted.append(take)
    return torch.stack(states, 1), torch.stack(accepted, 1)  # (B, steps) each


def jsa_loss(log_prior: Tensor, log_q: Tensor, seq_lp: Tensor, states: Tensor) -> Tensor:
    """JSA loss over the chain states z_1..z_M (Cao et al. 2025, arXiv:2508.18168)::

        loss = mean_b (1/M) sum_m [ -log p(y|x,z_m) - log p(z_m|x) - log q(z_m|x,y) ]

    With z_m from the true posterior p(z|x,y), the gradient of the first two terms is an
    unbiased estimate of -grad log p(y|x) (Fisher's identity); the last term trains q towards
    the inclusive KL(p(z|x,y) || q). Only the states' entries are read (``seq_lp`` may be
    anything, e.g. -inf, at candidates no state visited).

    log_prior (B, C), log_q (B, C), seq_lp (B, C), states (B, M) long  ->  scalar
    """
    _check_scores(log_prior, seq_lp, "seq_lp")
    per_state = log_prior.gather(1, states) + log_q.gather(1, states) + seq_lp.gather(1, states)  # (B, M)
    return -per_state.mean(-1).mean()  # scalar


# =========================================================================== reinforcement learning
# Value targets and policy-gradient objectives for the RL strategies (``rl_retriever``: soft
# Q(lambda) over retrieval actions; ``rag_r1``: GRPO / PPO on a generator that searches).
#
# References
# * Sorokin et al. 2025, "Q-RAG", arXiv:2511.07328 (soft value, Boltzmann exploration, Polyak
#   target towers, episode-gated lambda-returns).
# * Shao et al. 2024, "DeepSeekMath", arXiv:2402.03300 (GRPO: group-normalised advantages, k3 KL).
# * Schulman et al. 2017, "Proximal Policy Optimization Algorithms", arXiv:1707.06347 (clipped
#   ratio objective, clipped value loss).
# * Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage
#   Estimation", arXiv:1506.02438 (GAE).
#
# Shapes: ``B`` episodes x ``T`` steps (Q-RAG), ``N`` completions x ``T`` tokens (GRPO/PPO),
# ``A`` candidate actions.  Masks are boolean or 0/1 (any non-zero entry counts as valid) and are
# always applied by *selection* (``torch.where``), never by multiplication, so garbage (-inf, NaN)
# at invalid positions reaches neither a value nor a gradient.

__all__ += [
    "lambda_returns",
    "soft_value",
    "boltzmann_probs",
    "polyak_update_",
    "group_advantages",
    "kl_k3",
    "clipped_policy_loss",
    "masked_reduce",
    "grpo_loss",
    "gae",
    "clipped_value_loss",
    "RL_REDUCTIONS",
]

RL_REDUCTIONS = ("sequence", "token", "constant", "sum")


def _valid(mask: Optional[Tensor], like: Tensor) -> Tensor:
    """``mask`` as a bool tensor of ``like``'s shape (all True when ``mask`` is None)."""
    if mask is None:
        return torch.ones(like.shape, dtype=torch.bool, device=like.device)
    if tuple(mask.shape) != tuple(like.shape):
        raise ValueError(f"mask {tuple(mask.shape)} must match {tuple(like.shape)}")
    return mask.to(torch.bool)


def _zeros_where_not(keep: Tensor, x: Tensor) -> Tensor:
    """``x`` where ``keep``, exact 0 elsewhere (zero gradient there, whatever ``x`` holds)."""
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))


def lambda_returns(
    rewards: Tensor,
    next_values: Tensor,
    dones: Tensor,
    gamma: float,
    lam: float,
    mask: Optional[Tensor] = None,
) -> Tensor:
    """Episode-gated lambda-returns over a window of T steps (soft Q(lambda), Q-RAG).

    ::

        G_t = r_t + gamma * (1 - d_t) * [ (1 - lam) * V(s_{t+1}) + lam * G_{t+1} ]

    with ``next_values[b, t] = V(s_{t+1})`` (e.g. the soft value of the target towers,
    :func:`soft_value`).  At a terminal step (``d_t`` true) ``G_t = r_t`` exactly: the next value
    and the later returns are *selected away*, so nothing leaks across an episode end inside the
    window and ``next_values`` may hold anything (NaN) there.  Where ``G_{t+1}`` is not available
    -- at the last window position ``t = T-1``, or at a valid step followed by an invalid one --
    it is replaced by the bootstrap ``V(s_{t+1}) = next_values[b, t]``, so such a step is
    ``r_t + gamma (1 - d_t) V(s_{t+1})`` (a truncated, not a terminated, episode: mark the step
    ``done`` if the episode really ended there).  Invalid steps (``mask`` false) get 0 and are
    never read.  ``lam = 0`` gives the one-step TD target ``r_t + gamma (1-d_t) V(s_{t+1})``;
    ``lam = 1`` the discounted Monte-Carlo return to the episode end (or to the bootstrap).

    The result is a regression *target* (``MSE(Q(s_t, a_t), sg(G_t))``) and is returned detached.
    ``dones``: bool or 0/1 (non-zero = terminal).

    rewards (B, T), next_values (B, T), dones (B, T), mask (B, T) | None  ->  (B, T)
    """
    if rewards.dim() != 2 or next_values.shape != rewards.shape or dones.shape != rewards.shape:
        raise ValueError(
            f"rewards, next_values, dones must all be (B,T), got {tuple(rewards.shape)}, "
            f"{tuple(next_values.shape)}, {tuple(dones.shape)}"
        )
    rewards = rewards.detach()
    next_values = next_values.detach().to(rewards.dtype)
    valid = _valid(mask, rewards)
    done = dones.to(torch.bool)
    zero = torch.zeros((), dtype=rewards.dtype, device=rewards.device)
    T = rewards.shape[1]
    out = torch.zeros_like(rewards)
    for t in range(T - 1, -1, -1):
        nv = next_values[:, t]  # (B,)
        tail = nv if t == T - 1 else torch.where(valid[:, t + 1], out[:, t + 1], nv)  # G_{t+1} or bootstrap
        cont = torch.where(done[:, t], zero, (1.0 - lam) * torch.where(done[:, t], zero, nv) + lam * tail)
        g = rewards[:, t] + gamma * cont  # (B,)
        out[:, t] = torch.where(valid[:, t], g, zero)
    return out


def soft_value(q: Tensor, alpha: float, mask: Optional[Tensor] = None) -> Tensor:
    """Soft (entropy-regularised) state value ``V(s) = alpha * logsumexp_a(Q(s, a) / alpha)``.

    The log-partition of the Boltzmann policy :func:`boltzmann_probs`; it tends to ``max_a Q``
    as ``alpha -> 0`` (``max <= V <= max + alpha log |A_valid|``).  Only actions where ``mask``
    is true count (e.g. unselected chunks); a row with no valid action gets exactly 0 (value and
    gradient), e.g. after the episode has ended.

    q (B, A), mask (B, A) bool | None  ->  (B,)
    """
    if q.dim() != 2:
        raise ValueError(f"q must be (B,A), got {tuple(q.shape)}")
    valid = _valid(mask, q)
    has = valid.any(-1)  # (B,)
    # Empty rows see finite zeros (a finite logsumexp and gradient), then are selected away.
    logits = torch.where(valid | ~has.unsqueeze(-1), _zeros_where_not(valid, q) / alpha, float("-inf"))
    v = alpha * torch.logsumexp(logits, dim=-1)  # (B,)
    return _zeros_where_not(has, v)


def boltzmann_probs(q: Tensor, alpha: float, mask: Optional[Tensor] = None, top: int = 0) -> Tensor:
    """Boltzmann exploration policy ``pi(a|s) = softmax_a(Q(s, a) / alpha)`` (Q-RAG).

    Restricted to the valid actions (``mask``) and, when ``top > 0``, to the ``top`` valid actions
    with the largest Q (ties at the cut broken by ``torch.topk``); renormalised over that set and
    exactly 0 elsewhere.  ``top = 0`` keeps every valid action.  A row with no valid action is all
    zeros.  Sample from it with ``torch.multinomial`` (rows must then have a valid action).

    q (B, A), mask (B, A) bool | None  ->  (B, A)
    """
    if q.dim() != 2:
        raise ValueError(f"q must be (B,A), got {tuple(q.shape)}")
    if top < 0:
        raise ValueError(f"top must be >= 0, got {top}")
    valid = _valid(mask, q)
    if 0 < top < q.shape[1]:
        ranked = q.detach().masked_fill(~valid, float("-inf"))
        idx = ranked.topk(top, dim=-1).indices  # (B, top)
        in_top = torch.zeros_like(valid).scatter_(1, idx, True)
        valid = valid & in_top
    has = valid.any(-1, keepdim=True)  # (B, 1)
    logits = torch.where(valid | ~has, _zeros_where_not(valid, q) / alpha, float("-inf"))
    p = torch.softmax(logits, dim=-1)  # (B, A)
    return _zeros_where_not(valid, p)


@torch.no_grad()
def polyak_update_(target: torch.nn.Module, online: torch.nn.Module, tau: float) -> None:
    """In place: ``theta_target <- (1 - tau) theta_target + tau theta_online`` (Polyak averaging).

    Applied to every parameter and every floating-point buffer, matched by name (both modules must
    list the same names, in the same order, with the same shapes); non-floating buffers (counters,
    index tables) are copied whatever ``tau``.  ``tau = 0`` leaves the target's floating tensors
    unchanged, ``tau = 1`` copies the online module.  Used for the Q-RAG target towers (``tau`` about 0.02-0.1).

    Raises ValueError on mismatched names or shapes, or ``tau`` outside [0, 1].
    """
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"tau must be in [0, 1], got {tau}")

    def pairs(a, b, what):
        a, b = list(a), list(b)
        na, nb = [n for n, _ in a], [n for n, _ in b]
        if na != nb:
            raise ValueError(f"polyak_update_: {what} names differ: {na} vs {nb}")
        for (n, x), (_, y) in zip(a, b):
            if x.shape != y.shape:
                raise ValueError(f"polyak_update_: {what} {n!r} has shape {tuple(x.shape)} vs {tuple(y.shape)}")
        return [(x, y) for (_, x), (_, y) in zip(a, b)]

    params = pairs(target.named_parameters(), online.named_parameters(), "parameter")
    buffers = pairs(target.named_buffers(), online.named_buffers(), "buffer")
    for t, o in params + buffers:
        o = o.to(device=t.device, dtype=t.dtype)
        if not t.is_floating_point() or tau == 1.0:
            t.copy_(o)
        elif tau != 0.0:
            t.mul_(1.0 - tau).add_(o, alpha=tau)


def group_advantages(rewards: Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> Tensor:
    """GRPO group-relative advantages (Shao et al. 2024, arXiv:2402.03300).

    ``rewards`` holds ``groups * group_size`` completions, each consecutive block of
    ``group_size`` rows answering the same prompt::

        A_i = (r_i - mean_g) / (std_g + eps)     (scale=True;  scale=False: A_i = r_i - mean_g)

    ``std_g`` is the *unbiased* (Bessel-corrected, ``n - 1``) standard deviation, as TRL's GRPO
    trainer computes it (``trl.trainer.utils.nanstd``, ``scale_rewards="group"``, eps 1e-4).
    A group whose rewards are all equal (including ``group_size = 1``) carries no signal and gets
    exactly 0 -- decided by comparing the rewards, not by a rounded std, so no ``(r - mean)/eps``
    artefact can appear.  Rewards must be finite.  Returned detached.

    rewards (N,)  ->  (N,)
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be (N,), got {tuple(rewards.shape)}")
    if group_size < 1 or rewards.shape[0] % group_size != 0:
        raise ValueError(f"{rewards.shape[0]} rewards do not split into groups of {group_size}")
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError("group_advantages: rewards must be finite")
    r = rewards.detach()
    if not r.is_floating_point():
        r = r.to(torch.get_default_dtype())
    g = r.view(-1, group_size)  # (G, n)
    centred = g - g.mean(dim=1, keepdim=True)  # (G, n)
    flat = g.amax(dim=1, keepdim=True) == g.amin(dim=1, keepdim=True)  # (G, 1): zero-std group
    if scale and group_size > 1:
        centred = centred / (g.std(dim=1, correction=1, keepdim=True) + eps)
    return torch.where(flat, torch.zeros((), dtype=r.dtype, device=r.device), centred).reshape(-1)


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k3 estimator of KL(pi || pi_ref) (Schulman, "Approximating KL divergence", 2020;
    as used by GRPO, arXiv:2402.03300, eq. 4)::

        k3 = exp(ref_logp - logp) - (ref_logp - logp) - 1   >= 0

    Unbiased for KL(pi || pi_ref) when the tokens are sampled from pi, and never negative
    (``e^x >= 1 + x``).  Computed as ``expm1(x) - x`` (no cancellation near 0) and clamped at 0
    against the last rounding error.  Gradient w.r.t. ``logp``: ``1 - exp(ref_logp - logp)``.

    logp (N, T), ref_logp (N, T)  ->  (N, T)
    """
    x = ref_logp - logp
    return (torch.expm1(x) - x).clamp_min(0.0)


def clipped_policy_loss(logp: Tensor, old_logp: Tensor, adv: Tensor, eps_low: float, eps_high: float) -> Tensor:
    """PPO clipped surrogate, per token (Schulman et al. 2017, arXiv:1707.06347, eq. 7)::

        r    = exp(logp - old_logp)
        loss = -min( r * A, clip(r, 1 - eps_low, 1 + eps_high) * A )

    Asymmetric bounds as in DAPO / TRL ``epsilon`` / ``epsilon_high``.  Where the clipped term is
    the minimum (``r > 1 + eps_high`` with ``A > 0``, or ``r < 1 - eps_low`` with ``A < 0``) the
    token has zero gradient; elsewhere d loss / d logp = -r * A.  ``old_logp`` and ``adv`` are
    constants of the update and are detached.  ``adv`` (N,) is broadcast over the tokens of its
    sequence (GRPO); (N, T) gives per-token advantages (PPO with GAE).  No masking here: see
    :func:`grpo_loss` / :func:`masked_reduce`.

    logp (N, T), old_logp (N, T), adv (N,) | (N, T)  ->  (N, T)
    """
    adv = adv.detach()
    if adv.dim() == 1:
        adv = adv.unsqueeze(-1)  # (N, 1)
    ratio = torch.exp(logp - old_logp.detach())  # (N, T)
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    return -torch.minimum(ratio * adv, clipped * adv)  # (N, T)


def masked_reduce(x: Tensor, mask: Tensor, reduction: str, max_len: int = 0) -> Tensor:
    """Reduce per-token values over the tokens where ``mask`` is true, to a scalar.

    * ``"sequence"``: mean over each row's masked tokens, then mean over the N rows (TRL
      ``loss_type="grpo"``; every sequence weighs the same, whatever its length).
    * ``"token"``: masked sum / number of masked tokens (TRL ``"bnpo"``, and ``"dapo"`` on a
      single process; every token weighs the same).
    * ``"constant"``: masked sum / (N * max_len) (TRL ``"dr_grpo"``, Dr. GRPO's length-unbiased
      constant normaliser; ``max_len`` > 0 required, e.g. the maximal completion length).
    * ``"sum"``: plain masked sum.

    A row with no masked token contributes 0 (and still counts as a row for ``"sequence"``, as in
    TRL); an all-False mask gives 0.  Unmasked entries are selected away (any value, zero
    gradient).  Unknown reduction: ValueError.

    x (N, T), mask (N, T)  ->  scalar
    """
    if reduction not in RL_REDUCTIONS:
        raise ValueError(f"reduction must be one of {RL_REDUCTIONS}, got {reduction!r}")
    keep = _valid(mask, x)
    vals = _zeros_where_not(keep, x)
    if reduction == "sum":
        return vals.sum()
    if reduction == "token":
        return vals.sum() / keep.sum().clamp_min(1).to(x.dtype)
    if reduction == "constant":
        if max_len <= 0:
            raise ValueError(f"reduction 'constant' needs max_len > 0, got {max_len}")
        return vals.sum() / (x.shape[0] * max_len)
    per_row = vals.sum(-1) / keep.sum(-1).clamp_min(1).to(x.dtype)  # (N,)
    return per_row.mean() if per_row.numel() else per_row.sum()


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    ref_logp: Optional[Tensor],
    adv: Tensor,
    mask: Tensor,
    beta: float,
    eps_low: float,
    eps_high: float,
    reduction: str = "sequence",
    max_len: int = 0,
) -> Tuple[Tensor, dict[str, float]]:
    """GRPO objective (Shao et al. 2024, arXiv:2402.03300; TRL ``GRPOTrainer`` semantics)::

        per_token = clipped_policy_loss(logp, old_logp, adv) + beta * kl_k3(logp, ref_logp)
        loss      = masked_reduce(per_token, mask, reduction, max_len)

    ``logp`` are the current policy's log-probs of the sampled completion tokens (with gradient),
    ``old_logp`` those at collection time (``logp.detach()`` for one update per collection, when
    the ratio is 1 and the gradient is REINFORCE with the group baseline), ``ref_logp`` the frozen
    reference model's (may be None when ``beta == 0``); the three are detached where appropriate.
    ``mask`` selects the tokens the policy generated: tokens it did not choose (retrieved
    ``<information>`` text inserted into a rollout, padding) get exactly zero gradient from both
    terms -- every input is replaced by 0 there *before* any arithmetic, so even -inf log-probs
    cannot produce a NaN.

    Returns ``(loss, stats)`` with float stats over the masked tokens (token-weighted means):
    ``"kl"`` mean k3 (0.0 without ``ref_logp``), ``"ratio"`` mean ``exp(logp - old_logp)``,
    ``"clip_fraction"`` the share of tokens whose ratio was clipped in the direction that removes
    their gradient (``r < 1 - eps_low`` with ``A < 0`` or ``r > 1 + eps_high`` with ``A > 0``, TRL's
    ``clip_ratio/region_mean``).

    logp, old_logp, ref_logp (N, T), adv (N,) | (N, T), mask (N, T)  ->  (scalar, dict)
    """
    if logp.dim() != 2 or old_logp.shape != logp.shape:
        raise ValueError(f"logp and old_logp must both be (N,T), got {tuple(logp.shape)}, {tuple(old_logp.shape)}")
    if beta != 0.0 and ref_logp is None:
        raise ValueError("grpo_loss: ref_logp is required when beta != 0")
    keep = _valid(mask, logp)
    lp = _zeros_where_not(keep, logp)
    old = _zeros_where_not(keep, old_logp.detach().to(logp.dtype))
    adv = adv.detach().to(logp.dtype)
    per_token = clipped_policy_loss(lp, old, adv, eps_low, eps_high)  # (N, T)
    kl = None
    if ref_logp is not None:
        if ref_logp.shape != logp.shape:
            raise ValueError(f"ref_logp {tuple(ref_logp.shape)} must match logp {tuple(logp.shape)}")
        kl = kl_k3(lp, _zeros_where_not(keep, ref_logp.detach().to(logp.dtype)))  # (N, T)
        if beta != 0.0:
            per_token = per_token + beta * kl
    loss = masked_reduce(per_token, keep, reduction, max_len)

    with torch.no_grad():
        n_tok = keep.sum().clamp_min(1).to(logp.dtype)
        ratio = torch.exp(lp.detach() - old)  # (N, T)
        a = adv.unsqueeze(-1) if adv.dim() == 1 else adv
        clipped = ((ratio < 1.0 - eps_low) & (a < 0)) | ((ratio > 1.0 + eps_high) & (a > 0))
        stats = {
            "kl": float(_zeros_where_not(keep, kl.detach()).sum() / n_tok) if kl is not None else 0.0,
            "clip_fraction": float((clipped & keep).sum().to(logp.dtype) / n_tok),
            "ratio": float(_zeros_where_not(keep, ratio).sum() / n_tok),
        }
    return loss, stats


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> Tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, arXiv:1506.02438, eq. 16)::

        delta_t = r_t + gamma * V(s_{t'}) - V(s_t)
        A_t     = delta_t + gamma * lam * A_{t'}
        R_t     = A_t + V(s_t)                    (the value-function target)

    over the masked (policy-generated) tokens of each row, where ``t'`` is the *next masked
    token* after ``t``: unmasked positions (padding, retrieved text inserted into the rollout)
    are skipped -- they are observations, not actions, and do not count as discount steps.
    After a row's last masked token the episode has ended: ``V = 0`` and ``A = 0`` there.
    Rewards at unmasked positions are ignored (put the outcome reward on the last generated
    token).  Unmasked positions get advantage and return 0.  ``values[b, t] = V(s_t)``.
    Advantages and returns are targets: computed without gradient.

    rewards (N, T), values (N, T), mask (N, T)  ->  (advantages (N, T), returns (N, T))
    """
    if rewards.dim() != 2 or values.shape != rewards.shape:
        raise ValueError(f"rewards and values must both be (N,T), got {tuple(rewards.shape)}, {tuple(values.shape)}")
    keep = _valid(mask, rewards)
    r = _zeros_where_not(keep, rewards.detach())
    v = _zeros_where_not(keep, values.detach().to(r.dtype))
    N, T = r.shape
    adv = torch.zeros_like(r)
    next_v = torch.zeros(N, dtype=r.dtype, device=r.device)
    next_a = torch.zeros(N, dtype=r.dtype, device=r.device)
    for t in range(T - 1, -1, -1):
        m = keep[:, t]
        a = r[:, t] + gamma * next_v - v[:, t] + gamma * lam * next_a  # (N,)
        adv[:, t] = torch.where(m, a, torch.zeros((), dtype=r.dtype, device=r.device))
        next_v = torch.where(m, v[:, t], next_v)
        next_a = torch.where(m, a, next_a)
    returns = _zeros_where_not(keep, adv + v)
    return adv, returns


def clipped_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float) -> Tensor:
    """PPO value loss with value clipping (as in the PPO reference implementations)::

        v_clip = old_v + clamp(v - old_v, -clip, clip)
        loss   = 0.5 * masked_mean( max( (v - R)^2, (v_clip - R)^2 ) )

    The pessimistic max stops the critic moving more than ``clip`` from its collection-time
    prediction in a direction that lowers the loss.  ``clip <= 0`` disables clipping:
    ``0.5 * masked_mean((v - R)^2)``.  ``old_values`` and ``returns`` are detached; the mean is
    over all masked tokens (token-weighted; 0 if none), unmasked entries get zero gradient.

    values, old_values, returns, mask (N, T)  ->  scalar
    """
    keep = _valid(mask, values)
    v = _zeros_where_not(keep, values)
    old = _zeros_where_not(keep, old_values.detach().to(v.dtype))
    ret = _zeros_where_not(keep, returns.detach().to(v.dtype))
    err = (v - ret) ** 2
    if clip > 0:
        v_clip = old + torch.clamp(v - old, -clip, clip)
        err = torch.maximum(err, (v_clip - ret) ** 2)
    return 0.5 * masked_reduce(err, keep, "token")
