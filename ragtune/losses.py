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
    logits = q @ d.T  # (B, N)
    if hard_negatives is not None:
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
