"""rag_r1 with algorithm=ppo: the critic part (built only under ppo, its trunk copied from the
generator at the rl start, never on resume, charged under its own name), values aligned with the
states that chose each token, GAE over the model tokens only (hand-computed), the KL as a reward
penalty or a loss term, whitening, exactly zero gradient on observation tokens in both loss
terms, ratio exactly 1 at one update per collection, reduction exactness under any split and
accumulation 2x4 == 1x8 in the trainer, exactly the declared parameters trained, a bit-identical
resume in the middle of RL, and a CLI run that trains and evaluates."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from ragtune import losses, run, rundir
from ragtune.cli import main as cli_main
from ragtune.config import ConfigError
from ragtune.flops import forward_flops
from ragtune.generator import Sampled
from ragtune.strategies import rag_r1 as mod
from ragtune.strategies import rag_r1_ppo as ppo

from helpers import (
    TINY,
    assert_same_tensors,
    build,
    cache_dir,
    changed_components,
    deterministic_cost,
    final_weights,
    load_json,
    make_trainer,
    snapshot,
    step_ctx,
    step_lines,
    timeless,
    tiny_cfg,
)

ROOMY = ["strategy.name=rag_r1", "strategy.algorithm=ppo", "generator.tiny.max_position=512"]
ROOMY += ["generator.max_context_length=512", "strategy.max_turn_tokens=96"]
SEARCH = "<think> a </think> <search> q one </search>"
ANSWER = "<think> b </think> <answer> x </answer>"


def _built(tmp_path, *extra):
    cfg = tiny_cfg(tmp_path, *ROOMY, *extra)
    data, m, ledger = build(cfg)
    return cfg, data, m, ledger


def _script(monkeypatch, m, turns, logprob=-0.5):
    """Replace sampling: call i of sample_ids returns turns[i] (one text per context, in order)."""
    calls = []

    def sample_ids(contexts, max_new_tokens=None, do_sample=True, temperature=None, stop=None):
        texts = turns[len(calls)]
        assert len(texts) == len(contexts)
        calls.append(len(contexts))
        ids = [m.generator.encode_text(t) for t in texts]
        return Sampled(
            ids, [[logprob] * len(x) for x in ids], ["stop"] * len(ids), [m.generator.decode_ids(x) for x in ids]
        )

    monkeypatch.setattr(m.generator, "sample_ids", sample_ids)
    return calls


def _collect(m, batch):
    with m.scoring():
        return m.strategy.collect(batch, m, step_ctx(m, "rl"))


def _on(e):
    return [i for i, k in enumerate(e.loss_mask) if k]


# ---- pure functions ------------------------------------------------------------------------------
def test_gae_over_model_tokens_only_hand_computed():
    """Row 0: model, model, observation, observation, model, padding; gamma 0.9, lam 0.8; the values
    at the observation and padding positions are garbage that must not matter. Model-token chain:
    V = (0.5, 0.2, 0.7), reward 1 on the last model token:
      d2 = 1 - 0.7 = 0.3                      A2 = 0.3
      d1 = 0.9 * 0.7 - 0.2 = 0.43             A1 = 0.43 + 0.72 * 0.3 = 0.646
      d0 = 0.9 * 0.2 - 0.5 = -0.32            A0 = -0.32 + 0.72 * 0.646 = 0.14512
    Row 1: the same layout, kl (0.2, 0.4, -, -, -0.2) in the reward with beta 0.5, gamma = lam = 1,
    V = (0.1, 0.3, 0.6): r = (-0.1, -0.2, 1.1), A_t = sum of r from t - V_t = (0.7, 0.6, 0.5)."""
    mask = torch.tensor([[1, 1, 0, 0, 1, 0], [1, 1, 0, 0, 1, 0]], dtype=torch.float32)
    kl = torch.tensor([[0.0] * 6, [0.2, 0.4, 7.0, 7.0, -0.2, 7.0]])
    r0 = ppo.token_rewards(torch.tensor([1.0]), mask[:1], None, 0.5)
    assert r0.tolist() == [[0.0, 0.0, 0.0, 0.0, 1.0, 0.0]]
    r1 = ppo.token_rewards(torch.tensor([1.0]), mask[1:], kl[1:], 0.5)
    assert torch.allclose(r1, torch.tensor([[-0.1, -0.2, 0.0, 0.0, 1.1, 0.0]]))
    v = torch.tensor([[0.5, 0.2, 9.0, -9.0, 0.7, 5.0], [0.1, 0.3, 9.0, -9.0, 0.6, 5.0]])
    a0, ret0 = losses.gae(r0, v[:1], mask[:1], 0.9, 0.8)
    a1, ret1 = losses.gae(r1, v[1:], mask[1:], 1.0, 1.0)
    want_a = [[0.14512, 0.646, 0.0, 0.0, 0.3, 0.0], [0.7, 0.6, 0.0, 0.0, 0.5, 0.0]]
    want_r = [[0.64512, 0.846, 0.0, 0.0, 1.0, 0.0], [0.8, 0.9, 0.0, 0.0, 1.1, 0.0]]
    assert torch.allclose(torch.cat([a0, a1]), torch.tensor(want_a), atol=1e-6)
    assert torch.allclose(torch.cat([ret0, ret1]), torch.tensor(want_r), atol=1e-6)


def test_whiten_is_over_model_tokens_and_ranks():
    adv = torch.tensor([[1.0, 2.0, 99.0], [3.0, -99.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.float32)
    out = ppo.whiten(adv, mask)
    want = (torch.tensor([1.0, 2.0, 3.0]) - 2.0) / math.sqrt(1.0 + 1e-8)  # unbiased var of 1, 2, 3 is 1
    assert torch.allclose(out[mask != 0], want) and out[mask == 0].tolist() == [0.0, 0.0, 0.0]
    # two ranks: statistics over both collections (the other rank holds 5, 7)
    other = [(12.0, 2), None]

    def gather(obj):
        if isinstance(obj, tuple):
            return [obj, other[0]]
        mean = 18.0 / 5
        return [obj, (5 - mean) ** 2 + (7 - mean) ** 2]

    out2 = ppo.whiten(adv, mask, gather)
    both = torch.tensor([1.0, 2.0, 3.0, 5.0, 7.0], dtype=torch.float64)
    want2 = (both[:3] - both.mean()) / math.sqrt(float(both.var()) + 1e-8)
    assert torch.allclose(out2[mask != 0].double(), want2, atol=1e-6)


def _loss_inputs(N=5, T=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(N, T, generator=g) > 0.35).float()
    mask[:, 0] = 1.0
    lp = -torch.rand(N, T, generator=g)
    return dict(
        logp=lp,
        old_logp=lp + 0.3 * torch.randn(N, T, generator=g),
        ref_logp=lp + 0.3 * torch.randn(N, T, generator=g),
        adv=torch.randn(N, T, generator=g),
        values=torch.randn(N, T, generator=g),
        old_values=torch.randn(N, T, generator=g),
        returns=torch.randn(N, T, generator=g),
        mask=mask,
    )


KW = dict(beta=0.04, eps_low=0.2, eps_high=0.28, vf_coef=0.5, cliprange_value=0.3, max_len=30)


@pytest.mark.parametrize("reduction", losses.RL_REDUCTIONS)
def test_ppo_loss_sum_reproduces_the_reduction_over_any_split(reduction):
    x = _loss_inputs(N=6, T=9)
    N = 6
    pol, _ = losses.grpo_loss(
        x["logp"], x["old_logp"], x["ref_logp"], x["adv"], x["mask"], 0.04, 0.2, 0.28, reduction, 30
    )
    vl = lambda s: losses.clipped_value_loss(x["values"][s], x["old_values"][s], x["returns"][s], x["mask"][s], 0.3)  # noqa: E731
    n_tok = float(x["mask"].sum())
    value = {
        "sequence": sum(float(vl(slice(i, i + 1))) for i in range(N)) / N,
        "token": float(vl(slice(None))),
        "constant": float(vl(slice(None))) * n_tok / (N * 30),
        "sum": float(vl(slice(None))) * n_tok / N,
    }[reduction]
    whole = float(pol) / (N if reduction == "sum" else 1) + 0.5 * value
    parts = [ppo.ppo_loss_sum(*(x[k][a:b] for k in x), reduction=reduction, **KW) for a, b in ((0, 1), (1, 4), (4, 6))]
    split = sum(float(t) for t, _, _ in parts) / sum(c for _, c, _ in parts)
    assert math.isclose(split, whole, rel_tol=1e-5, abs_tol=1e-7)


def test_observation_tokens_get_exactly_zero_gradient_in_both_loss_terms():
    x = _loss_inputs()
    # anchors inside the clip ranges, so every model token keeps a gradient in both terms
    x["old_logp"], x["old_values"] = x["logp"] + 0.01, x["values"] + 0.05
    off = x["mask"] == 0
    for k in ("old_logp", "ref_logp", "adv", "old_values", "returns"):
        x[k] = torch.where(off, torch.full_like(x[k], float("nan")), x[k])
    for red in losses.RL_REDUCTIONS:
        lp = torch.where(off, torch.full_like(x["logp"], -float("inf")), x["logp"]).requires_grad_(True)
        v = torch.where(off, torch.full_like(x["values"], float("inf")), x["values"]).requires_grad_(True)
        args = (lp, x["old_logp"], x["ref_logp"], x["adv"], v, x["old_values"], x["returns"], x["mask"])
        total, _, _ = ppo.ppo_loss_sum(*args, reduction=red, **KW)
        total.backward()
        for g in (lp.grad, v.grad):
            assert torch.equal(g[off], torch.zeros(int(off.sum()))), red
            assert bool((g[~off] != 0).all()), red


# ---- the critic part -----------------------------------------------------------------------------
def test_the_critic_exists_only_under_ppo(tmp_path):
    _, _, m, _ = _built(tmp_path / "ppo")
    s = m.strategy
    assert [p.name for p in s.parts()] == ["reference", "critic"]
    assert s.phases()[-1].trains == {"generator", "critic"} and s.phases()[0].trains == {"generator"}
    assert s.lr_family("critic") == "generator" and m.component_params()["critic"]
    assert any(k.startswith("strategy.critic.trunk.") for k in m.state_dict())
    g = mod.RAGR1()
    assert [p.name for p in g.parts()] == ["reference"] and all(p.trains == {"generator"} for p in g.phases())
    _, mg, _ = build(tiny_cfg(tmp_path / "grpo", "strategy.name=rag_r1"))
    assert not hasattr(mg.strategy, "critic") and not any("critic" in k for k in mg.state_dict())


def test_the_critic_trains_in_float32_when_the_generator_is_loaded_in_bf16(tmp_path):
    lora = ["generator.lora.enabled=true", "generator.lora.target_modules=[q_proj,v_proj]"]
    _, _, m, _ = _built(tmp_path, "generator.dtype=bfloat16", *lora)
    critic = m.component_params()["critic"]
    assert critic and all(p.dtype == torch.float32 for p in critic)  # its copied trunk: master weights
    base = [p for n, p in m.generator.model.named_parameters() if "lora_" not in n]
    assert base and all(p.dtype == torch.bfloat16 for p in base)  # the frozen base stays as loaded


def test_critic_trunk_is_copied_at_rl_start_unless_resumed_and_its_calls_are_charged(tmp_path):
    _, _, m, ledger = _built(tmp_path)
    s = m.strategy
    with torch.no_grad():
        for p in m.generator.parameters():
            p.add_(0.01)
    dec = lambda: dict(m.generator.model.get_decoder().state_dict())  # noqa: E731
    trunk = lambda: {k: v.clone() for k, v in s.critic.trunk.state_dict().items()}  # noqa: E731
    head = {k: v.clone() for k, v in s.critic.head.state_dict().items()}
    before = trunk()
    s.on_phase_start(m, step_ctx(m, "sft"), False)
    s.on_phase_start(m, step_ctx(m, "rl"), True)
    assert_same_tensors(trunk(), before)  # resumed: the checkpoint's critic is kept
    s.on_phase_start(m, step_ctx(m, "rl"), False)
    assert_same_tensors(trunk(), dec())
    assert_same_tensors({k: v.clone() for k, v in s.critic.head.state_dict().items()}, head)
    # one call, charged once as `score` under "critic" by the generator's formula
    flops = lambda: ledger.totals(False)["flops_by_component"].get("critic", {})  # noqa: E731
    assert flops() == {}
    ctxs, tgts = [[1, 2, 3], [4, 5]], [[6, 7], [8, 9, 10, 11]]
    with m.scoring():
        v, mask = s.critic.values(ctxs, tgts, [[1, 0], [1, 1, 0, 1]])
    assert v.shape == (2, 4) and mask.tolist() == [[1, 0, 0, 0], [1, 1, 0, 1]]
    assert v[mask == 0].tolist() == [0.0] * 4
    assert flops() == {"score": forward_flops(s.critic.shape(), [6, 6], head_positions=4)}
    assert s.critic.shape().head_params == s.critic.head.weight.numel()


def test_values_are_read_at_the_state_that_chose_each_token(tmp_path, monkeypatch):
    """The collected values and the GAE equal a direct critic forward of each state and GAE on the
    model-token subsequence (observations removed), with the reward on the last model token."""
    _, data, m, _ = _built(
        tmp_path, "strategy.group_size=2", "strategy.whiten_advantages=false", "strategy.gamma=0.9", "strategy.lam=0.8"
    )
    _script(monkeypatch, m, [[SEARCH, ANSWER, SEARCH, SEARCH], [ANSWER, ANSWER, ANSWER]])
    monkeypatch.setattr(mod.RAGR1, "_answer", lambda self, t: (t.turns[-1], len(t.turns) == 2))
    monkeypatch.setattr(mod, "metrics", SimpleNamespace(exact_match=lambda pred, golds: float(bool(pred))))
    items, logs = _collect(m, data.train[:2])
    assert len(items) == 4 and set(logs) >= {"value", "return", "explained_variance"}
    e = items[0]
    on = _on(e)
    assert 0 in e.loss_mask and e.reward == 1.0  # an observation inside, a reward at the end
    with torch.no_grad():
        base = m.strategy.critic
        for t in (on[0], on[-1], next(i for i in on if i > e.loss_mask.index(0))):
            state = torch.tensor([e.prompt_ids + e.ids[:t]])
            h = base.trunk(input_ids=state, attention_mask=torch.ones_like(state)).last_hidden_state[0, -1]
            assert math.isclose(e.old_values[t], float(base.head(h)), rel_tol=1e-4, abs_tol=1e-5)
    for it in items:
        on = _on(it)
        v = torch.tensor([[it.old_values[i] for i in on]])
        r = torch.zeros_like(v)
        r[0, -1] = it.reward
        a, ret = losses.gae(r, v, torch.ones_like(v), 0.9, 0.8)
        assert torch.allclose(torch.tensor([[it.advantages[i] for i in on]]), a, atol=1e-6)
        assert torch.allclose(torch.tensor([[it.returns[i] for i in on]]), ret, atol=1e-6)
        off = [i for i, k in enumerate(it.loss_mask) if not k]
        assert all(it.advantages[i] == it.returns[i] == it.old_values[i] == 0.0 for i in off)


@pytest.mark.parametrize("kl_in_reward", [False, True])
def test_kl_as_reward_penalty_or_as_loss_term(tmp_path, monkeypatch, kl_in_reward):
    _, data, m, _ = _built(
        tmp_path, "strategy.group_size=2", "strategy.whiten_advantages=false", f"strategy.kl_in_reward={kl_in_reward}"
    )
    with torch.no_grad():  # the policy moves away from the reference (a copy of the untrained model)
        for p in m.generator.parameters():
            p.add_(0.05 * torch.randn_like(p))
    _script(monkeypatch, m, [[ANSWER, SEARCH, ANSWER, ANSWER], [ANSWER]])
    items, logs = _collect(m, data.train[:2])
    beta = m.strategy.opts.beta
    for it in items:  # gamma = lam = 1: A_t = (rewards from t on) - V_t
        on = _on(it)
        kl = [it.old_logprobs[i] - it.ref_logprobs[i] if kl_in_reward else 0.0 for i in on]
        r = [-beta * k for k in kl]
        r[-1] += it.reward
        want = [sum(r[n:]) - it.old_values[i] for n, i in enumerate(on)]
        assert [it.advantages[i] for i in on] == pytest.approx(want, abs=1e-5)
    assert ("kl_reward" in logs) == kl_in_reward
    m.set_modes({"generator", "critic"})
    _, out = m.strategy.loss(items, m, step_ctx(m, "rl"))
    assert (out["kl"] > 0) == (not kl_in_reward)  # the k3 loss term only without the reward penalty


# ---- the loss on collected experience ------------------------------------------------------------
def test_observation_tokens_get_zero_gradient_through_the_pipeline(tmp_path, monkeypatch):
    _, data, m, _ = _built(tmp_path, "strategy.group_size=2")
    _script(monkeypatch, m, [[SEARCH, SEARCH, ANSWER, SEARCH], [ANSWER, ANSWER, ANSWER]])
    items, _ = _collect(m, data.train[:2])
    seen = {}
    real_lp, real_v = m.generator.token_logprobs, m.strategy.critic.values

    def leaf(real, key):
        def f(*args, **kw):
            x, mask = real(*args, **kw)
            garbage = torch.where(mask != 0, x.detach(), torch.full_like(x, 3.0))  # off the model tokens
            seen[key], seen["mask"] = garbage.requires_grad_(True), mask
            return seen[key], mask

        return f

    monkeypatch.setattr(m.generator, "token_logprobs", leaf(real_lp, "lp"))
    monkeypatch.setattr(m.strategy.critic, "values", leaf(real_v, "v"))
    m.set_modes({"generator", "critic"})
    out, _ = m.strategy.loss(items, m, step_ctx(m, "rl"))
    out.total.backward()
    mask = seen["mask"]
    assert bool((mask == 0).any())
    for n, e in enumerate(items):
        assert mask[n, : len(e.ids)].tolist() == [float(k) for k in e.loss_mask]
    for key in ("lp", "v"):
        g = seen[key].grad
        assert torch.equal(g[mask == 0], torch.zeros_like(g[mask == 0])), key
        assert bool((g[mask != 0] != 0).any()), key


@pytest.mark.parametrize("updates", [1, 2])
def test_one_update_per_collection_has_ratio_exactly_one_and_no_value_clipping(tmp_path, monkeypatch, updates):
    """updates=1: the old policy and values are the current ones whatever the collection stored;
    updates>1: the sampling log-probs (a fake -0.5) and the stored values are the anchors."""
    _, data, m, _ = _built(tmp_path, "strategy.group_size=2", f"strategy.updates={updates}")
    _script(monkeypatch, m, [[ANSWER, SEARCH, ANSWER, ANSWER], [ANSWER]])
    items, _ = _collect(m, data.train[:2])
    for it in items:
        it.old_values = [v + 1.0 if k else 0.0 for v, k in zip(it.old_values, it.loss_mask)]
    m.set_modes({"generator", "critic"})
    _, logs = m.strategy.loss(items, m, step_ctx(m, "rl"))
    if updates == 1:
        assert logs["ratio"] == 1.0 and logs["clip_fraction"] == 0.0 and logs["value_clip_fraction"] == 0.0
    else:
        assert logs["ratio"] != 1.0 and logs["value_clip_fraction"] > 0.0


@pytest.mark.parametrize(
    "override, key",
    [
        ("strategy.gamma=1.5", "strategy.gamma"),
        ("strategy.lam=-0.1", "strategy.lam"),
        ("strategy.vf_coef=0", "strategy.vf_coef"),
        ("strategy.cliprange_value=-1", "strategy.cliprange_value"),
        ("strategy.scale_rewards=false", "strategy.scale_rewards"),  # a grpo-only option under ppo
        ("strategy.algorithm=grpo", "strategy.kl_in_reward"),
    ],
)
def test_ppo_options_are_validated(tmp_path, override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        tiny_cfg(tmp_path, "strategy.name=rag_r1", "strategy.algorithm=ppo", "strategy.kl_in_reward=true", override)


def test_group_size_one_is_allowed_under_ppo():
    s = mod.RAGR1(mod.Options(algorithm="ppo", group_size=1))
    s.opts.validate()
    with pytest.raises(ConfigError, match="'strategy.group_size'"):
        mod.Options(group_size=1).validate()


# ---- training ------------------------------------------------------------------------------------
RL = [*ROOMY, "strategy.max_turns=1", "strategy.group_size=2", "eval.splits=[]", "train.log_every=1"]


def test_exactly_the_declared_parameters_change_in_each_phase(tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path, *RL, "train.steps=4")
    data, m, _ = build(cfg)
    seen = {}
    real = mod.RAGR1.on_phase_start

    def on_phase_start(self, rag, ctx, resumed):
        seen[ctx.phase.name] = snapshot(rag)  # before the hook: what the previous phase left
        real(self, rag, ctx, resumed)
        seen[ctx.phase.name + "+hook"] = snapshot(rag)

    monkeypatch.setattr(mod.RAGR1, "on_phase_start", on_phase_start)
    before = snapshot(m)
    make_trainer(cfg, data, m).fit()
    sft = changed_components(before, seen["rl"])  # the sft phase
    assert sft["generator"] and not sft["critic"] and not sft["reference"]
    assert not sft["query_encoder"] and not sft["doc_encoder"]
    rl = changed_components(seen["rl+hook"], snapshot(m))  # the rl phase, after its snapshots
    assert rl["generator"] and rl["critic"]
    assert any(n.startswith("trunk.") for n in rl["critic"]) and "head.weight" in rl["critic"]
    assert not rl["reference"] and not rl["query_encoder"] and not rl["doc_encoder"]


def test_accumulation_2x4_equals_1x8(tmp_path):
    """One rl step (updates=1) of grad_accum 2 x batch 4 == grad_accum 1 x batch 8: the same
    collection of 8 questions, the same start, generator and critic alike."""
    common = [*RL, "train.steps=2", "train.only_phase=rl", "train.schedule=constant", "train.clip_norm=0"]
    common += ["strategy.sft_fraction=0.5", "train.lr.generator=1e-3"]
    cfg = tiny_cfg(tmp_path / "big", *common, "train.batch_size=8")
    data, m, _ = build(cfg)
    init = {k: v.clone() for k, v in m.state_dict().items()}

    def fit(sub, bs, accum):
        m.load_state_dict(init)
        torch.manual_seed(0)
        make_trainer(
            tiny_cfg(tmp_path / sub, *common, f"train.batch_size={bs}", f"train.grad_accum={accum}"), data, m
        ).fit()
        s = snapshot(m)
        return {**s["generator"], **{f"critic.{k}": v for k, v in s["critic"].items()}}, step_lines(
            tmp_path / sub / "metrics.jsonl"
        )[0]

    big, log_big = fit("big", 8, 1)
    acc, log_acc = fit("acc", 4, 2)
    moved = [n for n in big if n.startswith("critic.") and not torch.equal(big[n], init[f"strategy.{n}"])]
    assert moved and any(not torch.equal(big[n], init[f"generator.{n}"]) for n in big if n.startswith("model."))
    for n in big:
        assert torch.allclose(acc[n], big[n], rtol=0, atol=1e-6), n
    assert math.isclose(log_acc["loss"], log_big["loss"], rel_tol=1e-5, abs_tol=1e-7)
    assert log_acc["collect/value"] == pytest.approx(log_big["collect/value"], abs=1e-7)


def test_resume_mid_rl_is_bit_identical(tmp_path, monkeypatch):
    """As the GRPO resume test (a length-parity reward makes the updates non-zero), with the critic:
    weights (critic included), metrics lines and ledger bit-identical; the resumed rl phase does
    not copy the critic's trunk again."""
    monkeypatch.setattr(mod.RAGR1, "_answer", lambda self, t: (t.turns[-1] if t.turns else "", False))
    monkeypatch.setattr(mod, "metrics", SimpleNamespace(exact_match=lambda pred, golds: float(len(pred) % 2)))
    starts = []
    real_start = mod.RAGR1.on_phase_start

    def on_phase_start(self, rag, ctx, resumed):
        real_start(self, rag, ctx, resumed)
        trunk = {k: v.clone() for k, v in self.critic.trunk.state_dict().items()}
        starts.append((ctx.phase.name, resumed, trunk))

    monkeypatch.setattr(mod.RAGR1, "on_phase_start", on_phase_start)
    common = [*ROOMY, "train.steps=6", "train.save_every=1", "train.log_every=1", "strategy.max_turns=1"]
    common += ["eval.splits=[test]"]
    a, b = tmp_path / "a", tmp_path / "b"
    ra = run.train_and_evaluate(tiny_cfg(a, *common))
    assert [(n, r) for n, r, _ in starts] == [("sft", False), ("rl", False)]
    rl_start = starts[1][2]
    starts.clear()
    with pytest.raises(KeyboardInterrupt):
        run.train_and_evaluate(tiny_cfg(b, *common, "debug.stop_after=5"))
    assert torch.load(rundir.checkpoints_dir(b) / "last.pt", weights_only=False)["step"] == 5
    starts.clear()
    rb = run.train_and_evaluate(tiny_cfg(b, *common))
    assert [(n, r) for n, r, _ in starts] == [("rl", True)]  # resumed: not copied again
    assert ra["status"] == rb["status"] == "ok"
    wa, wb = final_weights(a), final_weights(b)
    assert_same_tensors(wa, wb)  # generator, reference AND critic
    critic = {k[len("strategy.critic.trunk.") :]: v for k, v in wa.items() if k.startswith("strategy.critic.trunk.")}
    assert critic.keys() == rl_start.keys() and "strategy.critic.head.weight" in wa
    assert not all(torch.equal(critic[k], rl_start[k]) for k in critic)  # RL trained the critic
    rows = step_lines(a / "metrics.jsonl")
    assert any(r.get("phase") == "rl" and r.get("grad_norm/critic", 0) > 0 for r in rows)
    assert rows == step_lines(b / "metrics.jsonl")
    assert deterministic_cost(ra["cost"]) == deterministic_cost(rb["cost"])
    assert timeless(ra["test"]) == timeless(rb["test"])


def test_cli_trains_and_evaluates_with_ppo(tmp_path):
    args = ["train", TINY, "strategy.name=rag_r1", "strategy.algorithm=ppo", "train.steps=2"]
    args += ["train.schedule=constant", "train.lr.critic=2e-4"]  # the critic's own rate
    assert cli_main([*args, f"data.cache_dir={cache_dir()}", f"run_dir={tmp_path}"]) == 0
    (rl,) = [r for r in step_lines(tmp_path / "metrics.jsonl") if r.get("phase") == "rl"]
    assert rl["lr/critic"] == 2e-4 and rl["lr/generator"] != 2e-4 and rl["grad_norm/critic"] > 0
    res = load_json(tmp_path / "result.json")
    assert res["status"] == "ok" and res["steps"] == 2 and res["strategy"] == "rag_r1"
    for split in ("dev", "test"):
        assert res[split]["n"] == 16 and 0.0 <= float(res[split]["em"]) <= 1.0
    by_comp = res["cost"]["flops_by_component"]
    assert by_comp["critic"]["train"] > 0 and by_comp["critic"]["score"] > 0  # its own name, never "generator"
    assert any(k.startswith("strategy.critic.") for k in final_weights(tmp_path))


def test_grpo_declaration_is_unchanged():
    s = mod.RAGR1()
    assert [p.name for p in s.parts()] == ["reference"]
    assert [(p.name, sorted(p.trains)) for p in s.phases()] == [("sft", ["generator"]), ("rl", ["generator"])]
    assert mod.RAGR1.trains_description() == "sft: generator -> rl: generator (+ frozen reference)"
