"""The reinforcement-learning objectives of ragtune.losses (Q-RAG value targets, GRPO, PPO/GAE)
against hand-computed numbers, naive loops written independently here, and the per-token GRPO
loss re-derived from the formulas of TRL's GRPOTrainer (float64 where it matters)."""

import math
import statistics

import pytest
import torch
from torch import nn

from ragtune.losses import (
    boltzmann_probs,
    clipped_policy_loss,
    clipped_value_loss,
    gae,
    group_advantages,
    grpo_loss,
    kl_k3,
    lambda_returns,
    masked_reduce,
    polyak_update_,
    soft_value,
)

D = torch.float64
NAN = float("nan")
INF = float("inf")


def t(x, dtype=D):
    return torch.tensor(x, dtype=dtype)


# --------------------------------------------------------------------------- lambda-returns
def test_lambda_returns_hand_values_with_a_terminal_step_and_padding():
    # gamma = 0.9, lam = 0.5
    # row 0: terminal at t=1, a new episode starts at t=2 and is cut by the window at t=3
    #   G3 = 0.5 + 0.9 * 6                       = 5.9      (last window position: bootstrap V(s_4)=6)
    #   G2 = 0 + 0.9 * (0.5 * 4 + 0.5 * 5.9)     = 4.455
    #   G1 = 1                                   (terminal: next value NaN is ignored, G2 not used)
    #   G0 = 0 + 0.9 * (0.5 * 2 + 0.5 * G1=1)    = 1.35
    # row 1: valid steps 0..1 only (window padding after), no terminal
    #   G1 = 0 + 0.9 * 5                         = 4.5      (last valid step bootstraps from V(s_2)=5)
    #   G0 = 1 + 0.9 * (0.5 * 3 + 0.5 * 4.5)     = 4.375
    rewards = t([[0.0, 1.0, 0.0, 0.5], [1.0, 0.0, 0.2, 9.0]])
    next_values = t([[2.0, NAN, 4.0, 6.0], [3.0, 5.0, NAN, NAN]])
    dones = torch.tensor([[0, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    got = lambda_returns(rewards, next_values, dones, gamma=0.9, lam=0.5, mask=mask)
    want = t([[1.35, 1.0, 4.455, 5.9], [4.375, 4.5, 0.0, 0.0]])
    assert torch.allclose(got, want, atol=1e-12, rtol=0)
    assert not got.requires_grad


def _random_window(seed, B=5, T=7):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(B, T, generator=g, dtype=D)
    next_values = torch.randn(B, T, generator=g, dtype=D)
    dones = torch.rand(B, T, generator=g) < 0.3
    return rewards, next_values, dones


def test_lambda_zero_is_one_step_td():
    rewards, nv, dones = _random_window(0)
    got = lambda_returns(rewards, nv, dones.float(), gamma=0.95, lam=0.0)
    want = rewards + 0.95 * (~dones).to(D) * nv
    assert torch.allclose(got, want, atol=1e-12, rtol=0)


def test_lambda_one_is_monte_carlo_within_each_episode():
    rewards, nv, dones = _random_window(1)
    gamma = 0.9
    B, T = rewards.shape
    want = torch.zeros(B, T, dtype=D)
    for b in range(B):
        for s in range(T):
            total, k = 0.0, s
            while True:  # discounted sum up to the episode end, bootstrap if the window ends first
                total += gamma ** (k - s) * float(rewards[b, k])
                if dones[b, k]:
                    break
                if k == T - 1:
                    total += gamma ** (T - s) * float(nv[b, T - 1])
                    break
                k += 1
            want[b, s] = total
    got = lambda_returns(rewards, nv, dones, gamma=gamma, lam=1.0)
    assert torch.allclose(got, want, atol=1e-12, rtol=0)


def test_lambda_returns_equal_the_forward_view_average_of_n_step_returns():
    # G^lam_t = (1 - lam) sum_{n<N} lam^{n-1} G^(n)_t + lam^{N-1} G^(N)_t, N = steps to the episode end
    rewards, nv, dones = _random_window(2)
    gamma, lam = 0.8, 0.6
    B, T = rewards.shape
    want = torch.zeros(B, T, dtype=D)
    for b in range(B):
        for s in range(T):
            e = s
            while not dones[b, e] and e < T - 1:
                e += 1
            n_max = e - s + 1

            def n_step(n, b=b, s=s, e=e):
                ret = sum(gamma**k * float(rewards[b, s + k]) for k in range(n))
                last = s + n - 1
                if not (last == e and dones[b, e]):
                    ret += gamma**n * float(nv[b, last])  # V(s_{last+1})
                return ret

            val = sum((1 - lam) * lam ** (n - 1) * n_step(n) for n in range(1, n_max))
            want[b, s] = val + lam ** (n_max - 1) * n_step(n_max)
    got = lambda_returns(rewards, nv, dones, gamma=gamma, lam=lam)
    assert torch.allclose(got, want, atol=1e-12, rtol=0)


def test_nothing_leaks_across_an_episode_end():
    rewards, nv, dones = _random_window(3, B=1, T=6)
    dones[:] = False
    dones[0, 2] = True  # episode 1 = steps 0..2, episode 2 = steps 3..5
    base = lambda_returns(rewards, nv, dones, gamma=0.99, lam=0.65)
    r2, nv2 = rewards.clone(), nv.clone()
    r2[0, 3:] += 100.0
    nv2[0, 2:] = NAN  # the terminal step's next value and everything after
    changed = lambda_returns(r2, nv2, dones, gamma=0.99, lam=0.65)
    assert torch.equal(changed[0, :3], base[0, :3])
    assert changed[0, 2] == rewards[0, 2]  # G = r at the terminal step
    assert not torch.equal(changed[0, 3:], base[0, 3:])  # the later episode did see the change


# --------------------------------------------------------------------------- soft value / Boltzmann
def test_soft_value_is_the_exact_scaled_logsumexp_over_valid_actions():
    q = t([[1.0, 2.0, 3.0, NAN], [0.5, -1.0, 7.0, 2.0], [4.0, 4.0, 4.0, 4.0]], dtype=D).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    v = soft_value(q, alpha=0.5, mask=mask)
    want0 = 0.5 * math.log(math.exp(2.0) + math.exp(4.0) + math.exp(6.0))
    want2 = 4.0 + 0.5 * math.log(2.0)
    assert abs(float(v[0].detach()) - want0) < 1e-12
    assert float(v[1].detach()) == 0.0  # no valid action
    assert abs(float(v[2].detach()) - want2) < 1e-12
    v.sum().backward()
    assert torch.isfinite(q.grad).all()
    assert torch.equal(q.grad[1], torch.zeros(4, dtype=D))
    assert q.grad[0, 3] == 0.0
    # d V / d q_a = softmax(q / alpha)_a over the valid actions
    p = torch.softmax(t([2.0, 4.0, 6.0]), 0)
    assert torch.allclose(q.grad[0, :3], p, atol=1e-12, rtol=0)


def test_soft_value_tends_to_the_max_as_alpha_goes_to_zero():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(6, 9, generator=g, dtype=D)
    mx = q.max(-1).values
    for alpha in (1e-1, 1e-2, 1e-4):
        v = soft_value(q, alpha)
        assert (v >= mx - 1e-12).all()
        assert (v <= mx + alpha * math.log(9) + 1e-12).all()
    assert torch.allclose(soft_value(q, 1e-6), mx, atol=1e-5, rtol=0)


def test_boltzmann_probs_restricted_to_the_top_valid_actions():
    q = t([[1.0, 3.0, 2.0, 5.0], [0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)  # action 3 (the best) is invalid
    p = boltzmann_probs(q, alpha=1.0, mask=mask, top=2)
    z = math.exp(3.0) + math.exp(2.0)
    assert torch.allclose(p[0], t([0.0, math.exp(3.0) / z, math.exp(2.0) / z, 0.0]), atol=1e-12, rtol=0)
    assert p[0, 0] == 0.0 and p[0, 3] == 0.0
    assert torch.equal(p[1], torch.zeros(4, dtype=D))
    p_all = boltzmann_probs(q, alpha=0.5, mask=mask, top=0)
    z = sum(math.exp(x / 0.5) for x in (1.0, 3.0, 2.0))
    assert torch.allclose(p_all[0], t([math.exp(2.0) / z, math.exp(6.0) / z, math.exp(4.0) / z, 0.0]))
    # top larger than the number of valid actions = all valid actions
    assert torch.allclose(boltzmann_probs(q, 0.5, mask, top=10), p_all, atol=1e-15, rtol=0)
    # no mask, top=1 is greedy
    assert torch.equal(boltzmann_probs(q[:1], 0.3, top=1), t([[0.0, 0.0, 0.0, 1.0]]))


# --------------------------------------------------------------------------- Polyak averaging
class _Tower(nn.Module):
    def __init__(self, width=2):
        super().__init__()
        self.lin = nn.Linear(2, width)
        self.bn = nn.BatchNorm1d(width)  # float buffers running_mean/var + long num_batches_tracked


def _filled(value, tracked):
    m = _Tower()
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(value)
        m.bn.running_mean.fill_(value)
        m.bn.running_var.fill_(value)
        m.bn.num_batches_tracked.fill_(tracked)
    return m


def test_polyak_update_exact_values():
    online = _filled(8.0, 7)
    for tau, want in ((0.0, 4.0), (1.0, 8.0), (0.25, 5.0)):  # 0.75 * 4 + 0.25 * 8 = 5 (exact in binary)
        target = _filled(4.0, 3)
        polyak_update_(target, online, tau)
        for p in list(target.parameters()) + [target.bn.running_mean, target.bn.running_var]:
            assert torch.equal(p, torch.full_like(p, want)), (tau, p)
        assert int(target.bn.num_batches_tracked) == 7  # non-floating buffers are copied, whatever tau
    assert all(torch.equal(p, torch.full_like(p, 8.0)) for p in online.parameters())  # online untouched
    assert not any(p.grad is not None for p in target.parameters())


def test_polyak_update_rejects_mismatched_modules():
    with pytest.raises(ValueError):
        polyak_update_(_Tower(2), _Tower(3), 0.1)  # shapes
    with pytest.raises(ValueError):
        polyak_update_(nn.Sequential(nn.Linear(2, 2)), _Tower(2), 0.1)  # names
    with pytest.raises(ValueError):
        polyak_update_(_Tower(2), _Tower(2), 1.5)


# --------------------------------------------------------------------------- GRPO pieces
def test_group_advantages_hand_values_and_exact_zeros_for_flat_groups():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 0.1, 0.1, 0.1, 0.1])
    adv = group_advantages(rewards, group_size=4)
    s = math.sqrt((4 * 0.5**2) / 3)  # unbiased std of [1, 0, 0, 1] = 0.57735...
    assert s == pytest.approx(statistics.stdev([1.0, 0.0, 0.0, 1.0]))
    want = torch.tensor([0.5, -0.5, -0.5, 0.5]) / (s + 1e-4)
    assert torch.allclose(adv[:4], want, atol=1e-6, rtol=0)
    assert torch.equal(adv[4:], torch.zeros(8))  # exactly zero, also where float mean(0.1) != 0.1
    raw = group_advantages(rewards, group_size=4, scale=False)
    assert torch.equal(raw[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]))
    assert torch.equal(raw[4:], torch.zeros(8))
    assert torch.equal(group_advantages(torch.tensor([3.0, -1.0]), group_size=1), torch.zeros(2))
    r3 = [0.0, 1.0, 5.0]
    a3 = group_advantages(torch.tensor(r3, dtype=D), group_size=3, eps=0.0)
    want3 = [(x - 2.0) / statistics.stdev(r3) for x in r3]
    assert torch.allclose(a3, t(want3), atol=1e-12, rtol=0)
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(5), group_size=2)


def test_kl_k3_zero_at_equality_and_the_formula_elsewhere():
    lp = t([[-1.0, -2.0, -0.5]])
    assert torch.equal(kl_k3(lp, lp), torch.zeros(1, 3, dtype=D))
    x = [0.5, -1.0, 2.0]  # ref_logp - logp
    ref = lp + t([x])
    want = t([[math.exp(v) - v - 1.0 for v in x]])
    assert torch.allclose(kl_k3(lp, ref), want, atol=1e-12, rtol=0)
    tiny = kl_k3(torch.zeros(1000), torch.linspace(-1e-7, 1e-7, 1000))  # float32, near-cancellation
    assert (tiny >= 0).all()
    lp_g = lp.clone().requires_grad_()
    kl_k3(lp_g, ref).sum().backward()
    assert torch.allclose(lp_g.grad, 1.0 - torch.exp(ref - lp), atol=1e-12, rtol=0)


RATIOS = [0.5, 0.9, 1.0, 1.1, 1.5]  # eps_low = 0.2, eps_high = 0.3: range [0.8, 1.3]


@pytest.mark.parametrize(
    "adv, want_loss, want_grad",
    [
        # A = +2: -min(2r, 2clip(r)); r=1.5 is clipped (-2 * 1.3) and has no gradient; r=0.5 is not
        (2.0, [-1.0, -1.8, -2.0, -2.2, -2.6], [-1.0, -1.8, -2.0, -2.2, 0.0]),
        # A = -2: 2 max(r, clip(r)); r=0.5 is clipped (2 * 0.8) and has no gradient; r=1.5 is not
        (-2.0, [1.6, 1.8, 2.0, 2.2, 3.0], [0.0, 1.8, 2.0, 2.2, 3.0]),
    ],
)
def test_clipped_policy_loss_hand_values_and_gradients(adv, want_loss, want_grad):
    old = torch.zeros(1, 5, dtype=D)
    logp = t([[math.log(r) for r in RATIOS]]).requires_grad_()  # ratio = exp(logp - 0) = r
    loss = clipped_policy_loss(logp, old, t([adv]), eps_low=0.2, eps_high=0.3)
    assert torch.allclose(loss, t([want_loss]), atol=1e-12, rtol=0)
    loss.sum().backward()  # unclipped: d/dlogp (-A r) = -A r
    assert torch.allclose(logp.grad, t([want_grad]), atol=1e-12, rtol=0)
    per_token = clipped_policy_loss(logp.detach(), old, torch.full((1, 5), adv, dtype=D), 0.2, 0.3)
    assert torch.allclose(per_token, t([want_loss]), atol=1e-12, rtol=0)  # (N, T) advantages


X = [[1.0, 2.0, NAN], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]]
M = [[1, 1, 0], [0, 0, 0], [1, 1, 1]]


@pytest.mark.parametrize(
    "reduction, max_len, want",
    [
        ("sequence", 0, (1.5 + 0.0 + 8.0) / 3),  # row means 1.5, (empty row) 0, 8
        ("token", 0, 27.0 / 5),  # (1 + 2 + 7 + 8 + 9) / 5 tokens
        ("constant", 4, 27.0 / (3 * 4)),  # / (N * max_len)
        ("sum", 0, 27.0),
    ],
)
def test_masked_reduce_by_hand(reduction, max_len, want):
    x = t(X).requires_grad_()
    out = masked_reduce(x, torch.tensor(M, dtype=torch.bool), reduction, max_len)
    assert abs(float(out.detach()) - want) < 1e-12
    out.backward()
    assert torch.equal(x.grad[torch.tensor(M) == 0], torch.zeros(4, dtype=D))
    zero = masked_reduce(t(X), torch.zeros(3, 3), reduction, max_len)
    assert float(zero) == 0.0


def test_masked_reduce_rejects_bad_arguments():
    with pytest.raises(ValueError):
        masked_reduce(torch.ones(2, 2), torch.ones(2, 2), "mean")
    with pytest.raises(ValueError):
        masked_reduce(torch.ones(2, 2), torch.ones(2, 2), "constant", max_len=0)


def _rollout(seed, N=6, T=8):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(N, T, generator=g, dtype=D) * 3
    old = logp + 0.4 * torch.randn(N, T, generator=g, dtype=D)
    ref = logp + 0.5 * torch.randn(N, T, generator=g, dtype=D)
    adv = torch.randn(N, generator=g, dtype=D)
    mask = torch.rand(N, T, generator=g) < 0.7
    mask[:, 0] = True
    return logp, old, ref, adv, mask


@pytest.mark.parametrize("term", ["policy", "kl", "both"])
def test_grpo_masked_tokens_get_exactly_zero_gradient(term):
    logp, old, ref, adv, mask = _rollout(0)
    mask[1, 2:5] = False  # e.g. retrieved <information> text inside a rollout
    logp = logp.masked_fill(~mask & (torch.arange(8) % 2 == 0), -INF)  # garbage at masked tokens
    old = old.masked_fill(~mask, NAN)
    ref = ref.masked_fill(~mask, INF)
    beta = 0.0 if term == "policy" else 0.3
    if term == "kl":
        adv = torch.zeros_like(adv)
    logp.requires_grad_()
    loss, stats = grpo_loss(logp, old, ref, adv, mask, beta=beta, eps_low=0.2, eps_high=0.28)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.equal(logp.grad[~mask], torch.zeros(int((~mask).sum()), dtype=D))
    assert (logp.grad[mask] != 0).sum() > mask.sum() // 2  # the generated tokens do learn
    assert all(math.isfinite(v) for v in stats.values())


@pytest.mark.parametrize("reduction", ["sequence", "token"])
def test_grpo_on_policy_gradient_is_reinforce_with_the_group_baseline(reduction):
    # A categorical policy pi = softmax(theta) over V tokens; one group of N completions.
    g = torch.Generator().manual_seed(1)
    V, N, T = 5, 4, 6
    theta = torch.randn(V, generator=g, dtype=D).requires_grad_()
    tokens = torch.randint(0, V, (N, T), generator=g)
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3, [1, 0, 1, 0, 1, 1], [1] * 2 + [0] * 4], dtype=torch.bool)
    rewards = t([1.0, 0.0, 0.0, 1.0])
    adv = group_advantages(rewards, N)
    logp = torch.log_softmax(theta, 0)[tokens]  # (N, T)
    loss, stats = grpo_loss(
        logp, logp.detach(), None, adv, mask, beta=0.0, eps_low=0.2, eps_high=0.2, reduction=reduction
    )
    (grad,) = torch.autograd.grad(loss, theta)
    # hand: d/dtheta log pi(k) = e_k - pi; loss = -(1/Z) sum_i w_i A_i sum_t log pi(o_it) at ratio 1
    pi = torch.softmax(theta.detach(), 0)
    want = torch.zeros(V, dtype=D)
    lengths = mask.sum(1)
    for i in range(N):
        weight = 1.0 / (N * int(lengths[i])) if reduction == "sequence" else 1.0 / int(mask.sum())
        for j in range(T):
            if mask[i, j]:
                want -= weight * float(adv[i]) * (torch.nn.functional.one_hot(tokens[i, j], V).to(D) - pi)
    assert torch.allclose(grad, want, atol=1e-12, rtol=0)
    assert stats["ratio"] == pytest.approx(1.0) and stats["clip_fraction"] == 0.0 and stats["kl"] == 0.0


def test_grpo_loss_needs_ref_logp_when_beta_is_nonzero():
    logp, old, _, adv, mask = _rollout(2)
    with pytest.raises(ValueError):
        grpo_loss(logp, old, None, adv, mask, beta=0.1, eps_low=0.2, eps_high=0.2)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
def test_grpo_matches_trl_per_token_loss_and_reductions(loss_type):
    # Re-derived from trl/trainer/grpo_trainer.py (GRPOTrainer._compute_loss, token-level importance
    # sampling) and _generate_and_score_completions (scale_rewards="group"), written out here.
    logp, old, ref, _, mask = _rollout(3, N=8, T=10)
    g = torch.Generator().manual_seed(4)
    rewards = torch.randint(0, 3, (8,), generator=g).to(D)
    rewards[4:] = 1.0  # a flat group
    eps_low, eps_high, beta, max_len = 0.2, 0.28, 0.04, 12

    grouped = rewards.view(-1, 4)
    mean = grouped.mean(1).repeat_interleave(4)
    var = ((grouped - grouped.mean(1, keepdim=True)) ** 2).mean(1) * (4 / 3)  # TRL nanstd: Bessel
    trl_adv = (rewards - mean) / (var.sqrt().repeat_interleave(4) + 1e-4)
    ours_adv = group_advantages(rewards, 4)
    assert torch.allclose(ours_adv, trl_adv, atol=1e-12, rtol=0)

    def trl(lp):
        coef_1 = torch.exp(lp - old)
        coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
        a = trl_adv.unsqueeze(1)
        per_token_loss = -torch.min(coef_1 * a, coef_2 * a)
        per_token_kl = torch.exp(ref - lp) - (ref - lp) - 1
        per_token_loss = per_token_loss + beta * per_token_kl
        m = mask.to(D)
        if loss_type == "grpo":
            loss = ((per_token_loss * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
        elif loss_type == "bnpo":
            loss = (per_token_loss * m).sum() / m.sum().clamp(min=1.0)
        else:
            loss = (per_token_loss * m).sum() / (per_token_loss.size(0) * max_len)
        low = (coef_1 < 1 - eps_low) & (a < 0)
        high = (coef_1 > 1 + eps_high) & (a > 0)
        clip = ((low | high).to(D) * m).sum() / m.sum()
        kl = (per_token_kl * m).sum() / m.sum()
        return loss, float(clip.detach()), float(kl.detach())

    reduction = {"grpo": "sequence", "bnpo": "token", "dr_grpo": "constant"}[loss_type]
    lp1 = logp.clone().requires_grad_()
    lp2 = logp.clone().requires_grad_()
    ours, stats = grpo_loss(lp1, old, ref, ours_adv, mask, beta, eps_low, eps_high, reduction, max_len)
    theirs, clip, kl = trl(lp2)
    assert abs(float(ours.detach()) - float(theirs.detach())) < 1e-12
    ours.backward()
    theirs.backward()
    assert torch.allclose(lp1.grad, lp2.grad, atol=1e-12, rtol=0)
    assert 0.0 < stats["clip_fraction"] < 1.0 and stats["clip_fraction"] == pytest.approx(clip, abs=1e-12)
    assert stats["kl"] == pytest.approx(kl, abs=1e-12)
    want_ratio = float((torch.exp(logp - old) * mask).sum() / mask.sum())
    assert stats["ratio"] == pytest.approx(want_ratio, abs=1e-12)


# --------------------------------------------------------------------------- PPO critic side
def test_gae_hand_values():
    # gamma = lam = 1: A_t = (sum of the remaining rewards) - V(s_t), returns = Monte-Carlo return
    r = t([[0.0, 0.0, 1.0]])
    v = t([[0.5, 0.6, 0.7]])
    adv, ret = gae(r, v, torch.ones(1, 3), gamma=1.0, lam=1.0)
    assert torch.allclose(adv, t([[0.5, 0.4, 0.3]]), atol=1e-12, rtol=0)
    assert torch.allclose(ret, t([[1.0, 1.0, 1.0]]), atol=1e-12, rtol=0)
    # lam = 0: A_t = delta_t = r_t + gamma V_{t+1} - V_t, V after the last token = 0
    adv0, _ = gae(r, v, torch.ones(1, 3), gamma=0.5, lam=0.0)
    assert torch.allclose(adv0, t([[0.5 * 0.6 - 0.5, 0.5 * 0.7 - 0.6, 1.0 - 0.7]]), atol=1e-12, rtol=0)


def test_gae_against_a_naive_loop_with_holes_in_the_mask():
    g = torch.Generator().manual_seed(5)
    N, T, gamma, lam = 4, 9, 0.97, 0.9
    r = torch.randn(N, T, generator=g, dtype=D)
    v = torch.randn(N, T, generator=g, dtype=D)
    mask = torch.rand(N, T, generator=g) < 0.6
    mask[0] = True
    mask[1] = False  # nothing generated
    r_g = r.masked_fill(~mask, NAN)  # unmasked positions are never read
    v_g = v.masked_fill(~mask, NAN)
    adv, ret = gae(r_g, v_g, mask, gamma, lam)
    want_adv = torch.zeros(N, T, dtype=D)
    for i in range(N):
        idx = [j for j in range(T) if mask[i, j]]  # the generated tokens, in order
        vals = [float(v[i, j]) for j in idx] + [0.0]  # V = 0 after the episode
        deltas = [float(r[i, j]) + gamma * vals[k + 1] - vals[k] for k, j in enumerate(idx)]
        for k, j in enumerate(idx):
            want_adv[i, j] = sum((gamma * lam) ** m * deltas[k + m] for m in range(len(idx) - k))
    assert torch.allclose(adv, want_adv, atol=1e-12, rtol=0)
    assert torch.allclose(ret, torch.where(mask, want_adv + v, torch.zeros(())), atol=1e-12, rtol=0)
    assert torch.equal(adv[1], torch.zeros(T, dtype=D))


def test_clipped_value_loss_by_hand():
    # clip = 0.2:
    #   token 0: (1 - 2)^2 = 1;     v_clip = 0.5 + 0.2 = 0.7, (0.7 - 2)^2 = 1.69 -> 1.69 (clipped, no grad)
    #   token 1: (2 - 1)^2 = 1;     v_clip = 2.5 - 0.2 = 2.3, (2.3 - 1)^2 = 1.69 -> 1.69 (clipped, no grad)
    #   token 2: (0 - 0.3)^2 = 0.09; v_clip = 0 (inside the range)               -> 0.09
    #   token 3: masked out (NaN)
    #   loss = 0.5 * (1.69 + 1.69 + 0.09) / 3;  d/dv2 = 0.5 * 2 * (0 - 0.3) / 3 = -0.1
    values = t([[1.0, 2.0, 0.0, NAN]]).requires_grad_()
    old = t([[0.5, 2.5, 0.0, NAN]])
    ret = t([[2.0, 1.0, 0.3, NAN]])
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    loss = clipped_value_loss(values, old, ret, mask, clip=0.2)
    assert abs(float(loss.detach()) - 0.5 * 3.47 / 3) < 1e-12
    loss.backward()
    assert torch.allclose(values.grad, t([[0.0, 0.0, -0.1, 0.0]]), atol=1e-12, rtol=0)
    plain = clipped_value_loss(values.detach(), old, ret, mask, clip=0.0)  # 0.5 * masked MSE
    assert abs(float(plain) - 0.5 * (1.0 + 1.0 + 0.09) / 3) < 1e-12
