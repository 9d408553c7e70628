"""Exactness tests for ragtune.losses against hand enumeration (float64)."""

import math

import pytest
import torch
import torch.nn.functional as F

from ragtune.losses import (
    contrastive_loss,
    distill_kl,
    emdr2_loss,
    kl_categorical,
    nll_given_passages,
    rag_sequence_nll,
    rag_token_nll,
    renormalised_log_probs,
    retrieval_entropy,
    seq_logprob,
)

D = torch.float64
INF = float("inf")

# Hand case: K=2 passages, T=2 answer tokens.
PRIOR = [0.3, 0.7]  # p(z_k | x)
TOK_P = [[0.5, 0.2], [0.1, 0.9]]  # TOK_P[k][t] = p(y_t | x, z_k, y_<t)


def hand_case(pad: int = 0, pad_value: float = 0.0):
    """scores (1,2), tok_lp (1,2,2+pad), mask (1,2+pad); padded entries = pad_value."""
    scores = torch.tensor([[math.log(p) for p in PRIOR]], dtype=D) + 1.7  # shift must not matter
    tok = torch.tensor([TOK_P], dtype=D).log()  # (1, 2, 2)
    if pad:
        tok = torch.cat([tok, torch.full((1, 2, pad), pad_value, dtype=D)], dim=-1)
    mask = torch.tensor([[1, 1] + [0] * pad])
    return scores, tok, mask


def p_seq_hand(prior, tok_p):
    return sum(pk * math.prod(tk) for pk, tk in zip(prior, tok_p))


def p_tok_hand(prior, tok_p):
    T = len(tok_p[0])
    return math.prod(sum(pk * tk[t] for pk, tk in zip(prior, tok_p)) for t in range(T))


def close(a, b, tol=1e-12):
    a = a.detach() if torch.is_tensor(a) else a
    b = b.detach() if torch.is_tensor(b) else b
    return abs(float(a) - float(b)) < tol


# --------------------------------------------------------------------------- seq_logprob
def test_seq_logprob_sum_and_mean_with_padding():
    tok = torch.tensor([[[-1.0, -2.0, -100.0], [-0.5, -0.25, float("-inf")]]], dtype=D)  # (1,2,3)
    mask = torch.tensor([[1, 1, 0]])
    s = seq_logprob(tok, mask, "sum")
    m = seq_logprob(tok, mask, "mean")
    assert s.shape == (1, 2)
    assert torch.allclose(s, torch.tensor([[-3.0, -0.75]], dtype=D))
    assert torch.allclose(m, torch.tensor([[-1.5, -0.375]], dtype=D))


def test_seq_logprob_default_is_sum_and_bad_reduction_raises():
    tok = torch.randn(2, 3, 4, dtype=D)
    mask = torch.ones(2, 4)
    assert torch.equal(seq_logprob(tok, mask), tok.sum(-1))
    with pytest.raises(ValueError):
        seq_logprob(tok, mask, "none")
    with pytest.raises(ValueError):
        rag_sequence_nll(torch.zeros(2, 3), tok, mask, reduction="avg")


# --------------------------------------------------------------------------- RAG-Sequence / RAG-Token
def test_rag_sequence_matches_enumeration():
    scores, tok, mask = hand_case()
    expected = p_seq_hand(PRIOR, TOK_P)  # 0.3*0.5*0.2 + 0.7*0.1*0.9 = 0.093
    assert close(expected, 0.093)
    assert close(torch.exp(-rag_sequence_nll(scores, tok, mask)), expected)


def test_rag_token_matches_enumeration():
    scores, tok, mask = hand_case()
    expected = p_tok_hand(PRIOR, TOK_P)  # (0.15 + 0.07) * (0.06 + 0.63) = 0.1518
    assert close(expected, 0.1518)
    assert close(torch.exp(-rag_token_nll(scores, tok, mask)), expected)


def test_rag_token_differs_from_rag_sequence_in_general():
    scores, tok, mask = hand_case()
    assert not close(rag_token_nll(scores, tok, mask), rag_sequence_nll(scores, tok, mask), 1e-3)


def test_rag_token_equals_rag_sequence_when_k1_or_t1():
    g = torch.Generator().manual_seed(0)
    # K = 1: the only passage has prior 1.
    s1 = torch.randn(3, 1, generator=g, dtype=D)
    tok1 = F.log_softmax(torch.randn(3, 1, 5, 7, generator=g, dtype=D), -1)[..., 0]  # (3,1,5)
    m1 = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    assert close(rag_token_nll(s1, tok1, m1), rag_sequence_nll(s1, tok1, m1))
    # T = 1: one token, the two marginals coincide.
    s2 = torch.randn(3, 4, generator=g, dtype=D)
    tok2 = -torch.rand(3, 4, 1, generator=g, dtype=D) * 3
    m2 = torch.ones(3, 1)
    assert close(rag_token_nll(s2, tok2, m2), rag_sequence_nll(s2, tok2, m2))
    # also by hand for T=1
    prior = [0.3, 0.7]
    scores = torch.tensor([[math.log(p) for p in prior]], dtype=D)
    tok = torch.tensor([[[math.log(0.4)], [math.log(0.8)]]], dtype=D)
    assert close(torch.exp(-rag_sequence_nll(scores, tok, torch.ones(1, 1))), 0.3 * 0.4 + 0.7 * 0.8)


@pytest.mark.parametrize("pad_value", [0.0, -3.0, 25.0, float("-inf")])
@pytest.mark.parametrize("loss", [rag_sequence_nll, rag_token_nll, nll_given_passages])
def test_padding_does_not_change_value_and_grads_stay_finite(loss, pad_value):
    ref = hand_case()
    scores, tok, mask = hand_case(pad=3, pad_value=pad_value)
    tok.requires_grad_(True)
    scores.requires_grad_(True)
    for red in ("sum", "mean"):
        if loss is nll_given_passages:
            a, b = loss(tok, mask, reduction=red), loss(ref[1], ref[2], reduction=red)
        else:
            a, b = loss(scores, tok, mask, reduction=red), loss(*ref, reduction=red)
        assert close(a, b)
        (gt,) = torch.autograd.grad(a, tok, retain_graph=True)
        assert torch.isfinite(gt).all()
        assert torch.all(gt[..., 2:] == 0)  # padded positions get no gradient


def test_reduction_mean_vs_sum_relations():
    g = torch.Generator().manual_seed(1)
    B, K, T = 3, 4, 6
    scores = torch.randn(B, K, generator=g, dtype=D)
    tok = -torch.rand(B, K, T, generator=g, dtype=D) * 2
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] + [0] * 5])
    lens = mask.sum(-1).to(D)
    # seq_logprob: mean == sum / length
    assert torch.allclose(seq_logprob(tok, mask, "mean"), seq_logprob(tok, mask, "sum") / lens[:, None])
    # RAG-Token: per-question loss divided by its length, then batch mean
    per_q_sum = torch.stack([rag_token_nll(scores[i : i + 1], tok[i : i + 1], mask[i : i + 1]) for i in range(B)])
    assert close(rag_token_nll(scores, tok, mask, "mean"), (per_q_sum / lens).mean())
    assert close(rag_token_nll(scores, tok, mask, "sum"), per_q_sum.mean())
    # nll_given_passages: same relation
    per_q = torch.stack([nll_given_passages(tok[i : i + 1], mask[i : i + 1]) for i in range(B)])
    assert close(nll_given_passages(tok, mask, reduction="mean"), (per_q / lens).mean())
    # RAG-Sequence "mean" is the tempered objective -log sum_k p_k p(y|z_k)^(1/|y|), NOT sum/|y|
    sc, tk, mk = hand_case()
    tempered = -math.log(sum(pk * math.prod(tp) ** 0.5 for pk, tp in zip(PRIOR, TOK_P)))
    assert close(rag_sequence_nll(sc, tk, mk, "mean"), tempered)
    assert not close(rag_sequence_nll(sc, tk, mk, "mean"), rag_sequence_nll(sc, tk, mk, "sum") / 2, 1e-5)
    # ... but with K = 1 it is exactly sum / |y|
    assert close(rag_sequence_nll(sc[:, :1], tk[:, :1], mk, "mean"), rag_sequence_nll(sc[:, :1], tk[:, :1], mk) / 2)


def test_batch_is_averaged_not_summed():
    scores, tok, mask = hand_case()
    s2, t2, m2 = (torch.cat([x, x]) for x in (scores, tok, mask))
    for loss in (rag_sequence_nll, rag_token_nll):
        assert close(loss(s2, t2, m2), loss(scores, tok, mask))


def test_rag_sequence_grad_wrt_scores_is_prior_minus_posterior():
    scores, tok, mask = hand_case()
    scores.requires_grad_(True)
    tok.requires_grad_(True)
    rag_sequence_nll(scores, tok, mask).backward()
    joint = [pk * math.prod(tp) for pk, tp in zip(PRIOR, TOK_P)]
    posterior = [j / sum(joint) for j in joint]
    expected = torch.tensor([[p - q for p, q in zip(PRIOR, posterior)]], dtype=D)
    assert torch.allclose(scores.grad, expected, atol=1e-12)
    # and w.r.t. each real token log-prob: -posterior_k
    assert torch.allclose(tok.grad, -torch.tensor(posterior, dtype=D)[None, :, None].expand(1, 2, 2))


def test_rag_sequence_grad_batch_scaling():
    g = torch.Generator().manual_seed(2)
    B, K, T = 4, 3, 5
    scores = torch.randn(B, K, generator=g, dtype=D, requires_grad=True)
    tok = -torch.rand(B, K, T, generator=g, dtype=D)
    mask = torch.ones(B, T)
    rag_sequence_nll(scores, tok, mask).backward()
    prior = scores.detach().softmax(-1)
    post = (prior.log() + tok.sum(-1)).softmax(-1)
    assert torch.allclose(scores.grad, (prior - post) / B)


def test_neg_inf_scores_drop_passage_and_keep_grads_finite():
    scores, tok, mask = hand_case()
    big_scores = torch.cat([scores, torch.tensor([[-INF]], dtype=D)], dim=1).requires_grad_(True)
    big_tok = torch.cat([tok, torch.full((1, 1, 2), -5.0, dtype=D)], dim=1).requires_grad_(True)
    for loss in (rag_sequence_nll, rag_token_nll):
        val = loss(big_scores, big_tok, mask)
        assert close(val, loss(scores, tok, mask))
        gs, gt = torch.autograd.grad(val, (big_scores, big_tok))
        assert torch.isfinite(gs).all() and torch.isfinite(gt).all()
        assert gs[0, 2] == 0 and torch.all(gt[0, 2] == 0)


def test_stable_for_extreme_values():
    scores = torch.tensor([[1e4, -1e4, 0.0]], dtype=torch.float32, requires_grad=True)
    tok = torch.tensor([[[-800.0, -900.0], [-1.0, -1.0], [-1e3, -1e3]]], requires_grad=True)
    mask = torch.ones(1, 2)
    # prior is ~one-hot on passage 0 -> both losses ~ -(-800 - 900) = 1700
    for loss in (rag_sequence_nll, rag_token_nll):
        val = loss(scores, tok, mask)
        assert close(val, 1700.0, 1e-2)
        gs, gt = torch.autograd.grad(val, (scores, tok))
        assert torch.isfinite(gs).all() and torch.isfinite(gt).all()


def test_b1_k1_everything_works():
    scores = torch.zeros(1, 1, dtype=D, requires_grad=True)
    tok = torch.tensor([[[math.log(0.5), math.log(0.25)]]], dtype=D, requires_grad=True)
    mask = torch.ones(1, 2)
    expected = -math.log(0.125)
    for val in (
        rag_sequence_nll(scores, tok, mask),
        rag_token_nll(scores, tok, mask),
        nll_given_passages(tok, mask),
        emdr2_loss(scores, seq_logprob(tok, mask)),
    ):
        assert close(val, expected)
    assert close(distill_kl(scores, seq_logprob(tok, mask)), 0.0)
    assert close(retrieval_entropy(scores)[0], 0.0)
    assert close(renormalised_log_probs(scores, torch.ones(1, 1, dtype=torch.bool))[0, 0], 0.0)
    loss = rag_sequence_nll(scores, tok, mask) + rag_token_nll(scores, tok, mask)
    gs, gt = torch.autograd.grad(loss, (scores, tok))
    assert torch.all(gs == 0) and torch.isfinite(gt).all()


def test_shape_errors():
    with pytest.raises(ValueError):
        rag_sequence_nll(torch.zeros(2, 3), torch.zeros(2, 3, 4), torch.ones(2, 5))
    with pytest.raises(ValueError):
        rag_token_nll(torch.zeros(2, 2), torch.zeros(2, 3, 4), torch.ones(2, 4))


# --------------------------------------------------------------------------- nll_given_passages
def test_nll_given_passages_hand_values():
    _, tok, mask = hand_case()
    lp = [math.log(0.5 * 0.2), math.log(0.1 * 0.9)]
    assert close(nll_given_passages(tok, mask), -(0.5 * lp[0] + 0.5 * lp[1]))
    w = torch.tensor([[0.25, 0.75]], dtype=D)
    assert close(nll_given_passages(tok, mask, w), -(0.25 * lp[0] + 0.75 * lp[1]))
    assert close(nll_given_passages(tok, mask, torch.tensor([0.25, 0.75], dtype=D)), -(0.25 * lp[0] + 0.75 * lp[1]))
    mean_lp = [lp[0] / 2, lp[1] / 2]
    assert close(nll_given_passages(tok, mask, reduction="mean"), -(0.5 * mean_lp[0] + 0.5 * mean_lp[1]))


def test_nll_given_passages_zero_weight_ignores_neg_inf_passage():
    _, tok, mask = hand_case()
    tok = tok.clone()
    tok[0, 1, 0] = -INF
    tok.requires_grad_(True)
    val = nll_given_passages(tok, mask, torch.tensor([[1.0, 0.0]], dtype=D))
    assert close(val, -math.log(0.1))
    (g,) = torch.autograd.grad(val, tok)
    assert torch.isfinite(g).all() and torch.all(g[0, 1] == 0)


# --------------------------------------------------------------------------- contrastive
def _hand_ce(logits_row, pos):
    z = [math.exp(v) for v in logits_row]
    return -math.log(z[pos] / sum(z))


def test_contrastive_matches_hand_cross_entropy():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=D)
    d = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=D)
    pos = torch.tensor([0, 1])
    tau = 0.5
    # logits = q @ d.T / tau = [[2, 0, 2], [0, 2, 2]]
    expected = 0.5 * (_hand_ce([2, 0, 2], 0) + _hand_ce([0, 2, 2], 1))
    assert close(contrastive_loss(q, d, pos, tau), expected)
    assert close(expected, -math.log(math.exp(2) / (2 * math.exp(2) + 1)))


def test_contrastive_hard_negatives_shared_and_per_question():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=D)
    d = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=D)
    pos = torch.tensor([0, 1])
    hn = torch.tensor([[0.5, 0.5]], dtype=D)  # shared, logits 0.5 for both
    exp_shared = 0.5 * (_hand_ce([1, 0, 0.5], 0) + _hand_ce([0, 1, 0.5], 1))
    assert close(contrastive_loss(q, d, pos, 1.0, hard_negatives=hn), exp_shared)
    hn3 = torch.tensor([[[2.0, 0.0]], [[0.0, -1.0]]], dtype=D)  # (B=2, M=1, H)
    exp_per_q = 0.5 * (_hand_ce([1, 0, 2], 0) + _hand_ce([0, 1, -1], 1))
    assert close(contrastive_loss(q, d, pos, 1.0, hard_negatives=hn3), exp_per_q)


def test_contrastive_mask_out_false_negatives():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=D)
    # column 2 is a second copy of question 0's positive passage (a false negative for q0)
    d = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], dtype=D)
    pos = torch.tensor([0, 1])
    mask_out = torch.tensor([[False, False, True], [False, False, False]])
    # logits: q0 -> [1, 0, 1 (masked)], q1 -> [0, 1, 0]
    expected = 0.5 * (_hand_ce([1, 0], 0) + _hand_ce([0, 1, 0], 1))
    assert close(contrastive_loss(q, d, pos, 1.0, mask_out=mask_out), expected)
    unmasked = 0.5 * (_hand_ce([1, 0, 1], 0) + _hand_ce([0, 1, 0], 1))
    assert close(contrastive_loss(q, d, pos, 1.0), unmasked)
    # flagging the positive itself is ignored (never masks the target)
    flag_pos = torch.tensor([[True, False, True], [False, True, False]])
    assert close(contrastive_loss(q, d, pos, 1.0, mask_out=flag_pos), expected)
    # grads finite and zero into masked column of d from q0
    qq = q.clone().requires_grad_(True)
    dd = d.clone().requires_grad_(True)
    contrastive_loss(qq, dd, pos, 1.0, mask_out=mask_out).backward()
    assert torch.isfinite(qq.grad).all() and torch.isfinite(dd.grad).all()


def test_contrastive_b1():
    q = torch.tensor([[1.0, 2.0]], dtype=D)
    d = torch.tensor([[0.5, 0.5]], dtype=D)
    assert close(contrastive_loss(q, d, torch.tensor([0]), 0.1), 0.0)


# --------------------------------------------------------------------------- distillation / EMDR^2
def test_distill_kl_hand_value_and_gradient_only_into_retriever():
    r = torch.tensor([[0.0, math.log(3.0)]], dtype=D, requires_grad=True)  # p_ret = [1/4, 3/4]
    gen = torch.tensor([[math.log(0.2), math.log(0.2)]], dtype=D, requires_grad=True)  # p_gen = [1/2, 1/2]
    val = distill_kl(r, gen)
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert close(val, expected)
    val.backward()
    assert gen.grad is None
    assert torch.allclose(r.grad, torch.tensor([[0.25 - 0.5, 0.75 - 0.5]], dtype=D))


def test_distill_kl_temperature_and_zero_when_matched():
    gen = torch.tensor([[-2.0, -4.0, -3.0], [-1.0, -1.0, -9.0]], dtype=D)
    tau = 2.0
    r = (gen / tau + 5.0).clone().requires_grad_(True)
    val = distill_kl(r, gen, gen_temperature=tau)
    assert close(val, 0.0)
    val.backward()
    assert torch.allclose(r.grad, torch.zeros_like(r), atol=1e-15)
    assert distill_kl(r, gen, gen_temperature=1.0) > 1e-3


def test_emdr2_value_and_only_retriever_gets_grad():
    scores, tok, mask = hand_case()
    scores.requires_grad_(True)
    tok.requires_grad_(True)
    gen = seq_logprob(tok, mask)
    val = emdr2_loss(scores, gen)
    assert close(val, -math.log(p_seq_hand(PRIOR, TOK_P)))
    gs, gt = torch.autograd.grad(val, (scores, tok), allow_unused=True)
    assert gt is None
    joint = [pk * math.prod(tp) for pk, tp in zip(PRIOR, TOK_P)]
    post = [j / sum(joint) for j in joint]
    assert torch.allclose(gs, torch.tensor([[PRIOR[0] - post[0], PRIOR[1] - post[1]]], dtype=D))


# --------------------------------------------------------------------------- distributions
def test_retrieval_entropy():
    scores = torch.tensor([[0.0, 0.0, 0.0, 0.0], [math.log(0.5), math.log(0.25), math.log(0.25), -INF]], dtype=D)
    scores.requires_grad_(True)
    h = retrieval_entropy(scores)
    assert h.shape == (2,)
    assert close(h[0], math.log(4))
    assert close(h[1], -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)))
    h.sum().backward()
    assert torch.isfinite(scores.grad).all()
    onehot = torch.tensor([[3.0, -INF]], dtype=D, requires_grad=True)
    h1 = retrieval_entropy(onehot)
    assert close(h1[0], 0.0)
    h1.sum().backward()
    assert torch.isfinite(onehot.grad).all()


def test_kl_categorical_hand_values():
    lp = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]], dtype=D).log()
    lq = torch.tensor([[0.25, 0.25, 0.5], [0.5, 0.25, 0.25]], dtype=D).log()
    kl = kl_categorical(lp, lq)
    assert kl.shape == (2,)
    assert close(kl[0], math.log(2))  # 0.5 ln2 + 0.5 ln2 + 0
    assert close(kl[1], math.log(2))
    assert close(kl_categorical(lq, lq)[0], 0.0)
    # sum (not mean) over the support: K=3 terms, not divided by 3
    p, q = [0.2, 0.3, 0.5], [0.5, 0.3, 0.2]
    hand = sum(a * math.log(a / b) for a, b in zip(p, q))
    assert close(kl_categorical(torch.tensor(p, dtype=D).log(), torch.tensor(q, dtype=D).log()), hand)


def test_kl_categorical_safe_where_p_zero():
    lp = torch.tensor([[0.0, -INF]], dtype=D, requires_grad=True)
    lq = torch.tensor([[0.0, -INF]], dtype=D, requires_grad=True)
    kl = kl_categorical(lp, lq)
    assert close(kl[0], 0.0)
    kl.sum().backward()
    assert torch.isfinite(lp.grad).all() and torch.isfinite(lq.grad).all()
    # q = 0 where p > 0 -> +inf, as it should be
    assert kl_categorical(torch.tensor([0.5, 0.5], dtype=D).log(), torch.tensor([1.0, 0.0], dtype=D).log()) == INF


def test_renormalised_log_probs_values():
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=D)
    support = torch.tensor([[True, False, True, False]])
    out = renormalised_log_probs(scores, support)
    z = math.exp(1) + math.exp(3)
    assert close(out[0, 0], 1 - math.log(z)) and close(out[0, 2], 3 - math.log(z))
    assert out[0, 1] == -INF and out[0, 3] == -INF
    assert close(out.exp().sum(), 1.0)


def test_renormalised_log_probs_finite_grads_with_inf_entries():
    # Entries outside the set hold garbage (+-inf, NaN); in-set entries include a -inf.
    scores = torch.tensor([[0.5, INF, -1.0, float("nan")], [-INF, 2.0, -INF, 0.0]], dtype=D, requires_grad=True)
    support = torch.tensor([[True, False, True, False], [True, True, False, True]])
    out = renormalised_log_probs(scores, support)
    assert not torch.isnan(out).any()
    target = torch.tensor([[0.5, 0.0, 0.5, 0.0], [0.0, 0.5, 0.0, 0.5]], dtype=D).log()
    loss = kl_categorical(target, out).sum() + retrieval_entropy(out).sum() - torch.logsumexp(out, -1).sum() - out[0, 0]
    loss.backward()
    assert torch.isfinite(scores.grad).all()
    assert scores.grad[0, 1] == 0 and scores.grad[0, 3] == 0 and scores.grad[1, 2] == 0


def test_renormalised_log_probs_rejects_empty_support():
    with pytest.raises(ValueError):
        renormalised_log_probs(torch.zeros(2, 3), torch.tensor([[True, False, False], [False] * 3]))
