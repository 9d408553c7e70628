"""The latent-passage estimators of ragtune.losses (ELBO, MIS chain, JSA loss) against hand
derivations and exact enumeration over a small candidate set (float64 where it matters)."""

import math

import pytest
import torch

from ragtune.losses import elbo, jsa_loss, kl_categorical, mis_chain, mis_proposals, renormalised_log_probs

D = torch.float64
INF = float("inf")
PRIOR = [0.5, 0.3, 0.15, 0.05]  # p(z|x) over C = 4 candidates
LIK = [0.01, 0.4, 0.2, 0.6]  # p_G(y|x,z)
Q = [0.1, 0.2, 0.3, 0.4]  # a proposal / variational posterior different from the true one


def exact_posterior():
    joint = [p * g for p, g in zip(PRIOR, LIK)]
    return [j / sum(joint) for j in joint], math.log(sum(joint))


def logt(xs, pad=0):
    return torch.tensor([[math.log(x) for x in xs] + [-INF] * pad], dtype=D)


# --------------------------------------------------------------------------- ELBO
def test_elbo_equals_log_marginal_at_the_exact_posterior():
    post, log_py = exact_posterior()
    val = elbo(logt(post), logt(PRIOR), logt(LIK))
    assert abs(float(val) - log_py) < 1e-12


def test_elbo_is_lower_by_exactly_kl_to_the_posterior_otherwise():
    post, log_py = exact_posterior()
    val = float(elbo(logt(Q), logt(PRIOR), logt(LIK)))
    gap = float(kl_categorical(logt(Q), logt(post)))
    assert val < log_py
    assert abs((log_py - val) - gap) < 1e-12  # log p(y|x) - ELBO(q) = KL(q || p(z|x,y))


def test_elbo_hand_value_with_kl_beta_and_summed_kl():
    val = float(elbo(logt(Q), logt(PRIOR), logt(LIK), kl_beta=0.5))
    recon = sum(q * math.log(g) for q, g in zip(Q, LIK))
    kl = sum(q * (math.log(q) - math.log(p)) for q, p in zip(Q, PRIOR))  # summed, not averaged over |C|
    assert abs(val - (recon - 0.5 * kl)) < 1e-12


def test_elbo_padding_changes_nothing_and_grads_route_as_documented():
    scores_q = logt(Q).requires_grad_(True)
    scores_p = logt(PRIOR).requires_grad_(True)
    lik = logt(LIK).requires_grad_(True)
    mask = torch.ones(1, 4, dtype=torch.bool)
    val = elbo(renormalised_log_probs(scores_q, mask), renormalised_log_probs(scores_p, mask), lik, kl_beta=0.0)
    val.backward()
    assert torch.allclose(lik.grad, torch.tensor([Q], dtype=D))  # generator: weights q
    assert scores_p.grad is None or torch.all(scores_p.grad == 0)  # prior only through the KL
    padded = elbo(logt(Q, 2), logt(PRIOR, 2), torch.cat([logt(LIK), torch.tensor([[-INF, 7.0]], dtype=D)], 1))
    assert abs(float(padded) - float(elbo(logt(Q), logt(PRIOR), logt(LIK)))) < 1e-12


# --------------------------------------------------------------------------- MIS
def _tv(counts: torch.Tensor, target) -> float:
    emp = counts / counts.sum()
    return 0.5 * float((emp - torch.tensor(target, dtype=emp.dtype)).abs().sum())


def _chain_inputs(B: int, pad: int = 1):
    """B copies of the 4-candidate case plus `pad` masked slots."""
    target = torch.cat([logt(PRIOR) + logt(LIK), torch.full((1, pad), 3.0, dtype=D)], 1).expand(B, -1)
    proposal = torch.cat([logt(Q), torch.full((1, pad), 5.0, dtype=D)], 1).expand(B, -1)
    mask = torch.tensor([[True] * 4 + [False] * pad]).expand(B, -1)
    return target, proposal, mask


@pytest.mark.parametrize("use_init", [False, True])
def test_mis_chain_converges_to_the_exact_posterior(use_init):
    """2,000 chains x 40 steps from a fixed seed; the last 20 states of every chain pooled.
    Total variation to p(z|x,y) below 0.02 (Monte-Carlo error at 40,000 correlated draws ~0.005).
    With a start state (a cached sample) the chains start from the *least* likely passage."""
    post, _ = exact_posterior()
    B, M = 2000, 40
    target, proposal, mask = _chain_inputs(B)
    init = torch.zeros(B, dtype=torch.long) if use_init else None  # candidate 0: posterior 0.027
    states, _ = mis_chain(target, proposal, mask, M, torch.Generator().manual_seed(0), init)
    assert states.shape == (B, M) and int(states.max()) < 4  # never a masked candidate
    counts = torch.bincount(states[:, M // 2 :].reshape(-1), minlength=4).double()
    assert _tv(counts, post) < 0.02


def test_mis_one_step_transition_matches_the_kernel():
    """From state z, P(next = z') = q(z') min(1, w(z')/w(z)) for z' != z (enumerated)."""
    B = 200_000
    target, proposal, mask = _chain_inputs(B)
    z0 = 3
    states, _ = mis_chain(target, proposal, mask, 1, torch.Generator().manual_seed(1), torch.full((B,), z0))
    w = [p * g / q for p, g, q in zip(PRIOR, LIK, Q)]
    kernel = [Q[z] * min(1.0, w[z] / w[z0]) for z in range(4)]
    kernel[z0] = 1 - sum(kernel[z] for z in range(4) if z != z0)
    counts = torch.bincount(states[:, 0], minlength=4).double()
    assert _tv(counts, kernel) < 0.005


def test_mis_accepts_everything_when_target_is_proportional_to_proposal():
    B, M = 8, 30
    _, proposal, mask = _chain_inputs(B)
    g = torch.Generator().manual_seed(3)
    props = mis_proposals(proposal, mask, M, g)
    states, accepted = mis_chain(proposal + 2.0, proposal, mask, M, g, None, props)  # w constant
    assert torch.equal(states, props) and bool(accepted.all())


def test_mis_first_state_without_init_is_the_first_proposal_and_nan_off_chain_is_fine():
    B, M = 16, 10
    target, proposal, mask = _chain_inputs(B)
    g = torch.Generator().manual_seed(4)
    props = mis_proposals(proposal, mask, M, g)
    visited = torch.zeros(B, 5, dtype=torch.bool).scatter_(1, props, True)
    partial = target.masked_fill(~visited, float("nan"))  # only the proposed passages were scored
    states, accepted = mis_chain(partial, proposal, mask, M, g, None, props)
    assert torch.equal(states[:, 0], props[:, 0]) and bool(accepted[:, 0].all())
    with pytest.raises(ValueError, match="no finite weight"):
        mis_chain(target.masked_fill(torch.ones_like(mask), float("nan")), proposal, mask, M, g, None, props)


def test_mis_proposals_follow_q_renormalised_on_the_mask():
    B = 50_000
    _, proposal, mask = _chain_inputs(B)
    props = mis_proposals(proposal, mask, 1, torch.Generator().manual_seed(5))
    assert _tv(torch.bincount(props[:, 0], minlength=4).double(), Q) < 0.01


# --------------------------------------------------------------------------- JSA loss
def test_jsa_loss_hand_value():
    lp, lq, lik = logt(PRIOR), logt(Q), logt(LIK)
    states = torch.tensor([[1, 1, 3, 2]])
    expect = -sum(math.log(PRIOR[z]) + math.log(Q[z]) + math.log(LIK[z]) for z in [1, 1, 3, 2]) / 4
    assert abs(float(jsa_loss(lp, lq, lik, states)) - expect) < 1e-12
    masked_lik = lik.clone()
    masked_lik[0, 0] = -INF  # a passage no state visited may be -inf (never scored)
    assert abs(float(jsa_loss(lp, lq, masked_lik, states)) - expect) < 1e-12


def test_jsa_gradient_averages_to_the_exact_gradient_of_log_marginal():
    """Fisher's identity: with posterior samples, grad of the JSA loss w.r.t. the prior's scores
    -> prior - posterior and w.r.t. log p_G -> -posterior, i.e. -grad log p(y|x) (enumerated)."""
    post, _ = exact_posterior()
    B, M = 4000, 30
    target, proposal, mask = _chain_inputs(B, pad=0)
    states, _ = mis_chain(target, proposal, mask, M, torch.Generator().manual_seed(6))
    states = states[:, 10:]  # after burn-in
    scores = logt(PRIOR).expand(B, -1).clone().requires_grad_(True)
    lik = logt(LIK).expand(B, -1).clone().requires_grad_(True)
    q_scores = logt(Q).expand(B, -1).clone().requires_grad_(True)
    m = torch.ones(B, 4, dtype=torch.bool)
    loss = jsa_loss(renormalised_log_probs(scores, m), renormalised_log_probs(q_scores, m), lik, states)
    (loss * B).backward()  # per-question gradients, then averaged over the chains below
    post_t = torch.tensor(post, dtype=D)
    assert torch.allclose(scores.grad.mean(0), torch.tensor(PRIOR, dtype=D) - post_t, atol=0.01)
    assert torch.allclose(lik.grad.mean(0), -post_t, atol=0.01)
    # q is pushed towards the posterior (inclusive KL): gradient q - posterior
    assert torch.allclose(q_scores.grad.mean(0), torch.tensor(Q, dtype=D) - post_t, atol=0.01)
