"""rag_r1: SFT trajectories from gold chains (turn structure per question kind and mode, gold
first, loss mask 0 and zero gradient on observations, one batched retrieval per turn), GRPO
collection (one batched retrieval per turn whatever the number of queries, reward = the
evaluator's EM of the extracted answer, zero-std groups without policy gradient), reduction
exactness under splitting, the reference model's snapshot, exactly the generator trained, greedy
prediction bookkeeping, and a bit-identical resume in the middle of RL."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from ragtune import losses, metrics, run, rundir
from ragtune.config import ConfigError
from ragtune.data import Question
from ragtune.generator import Sampled
from ragtune.strategies import rag_r1 as mod
from ragtune.strategies import search_format as fmt
from ragtune.strategy import Strategy

from helpers import (
    assert_same_tensors,
    build,
    changed_components,
    deterministic_cost,
    final_weights,
    make_trainer,
    snapshot,
    step_ctx,
    step_lines,
    timeless,
    tiny_cfg,
)

# roomier positions and turns than tiny.yaml, so bridge and comparison chains fit
ROOMY = ["strategy.name=rag_r1", "generator.tiny.max_position=512", "generator.max_context_length=512"]
ROOMY += ["strategy.max_turn_tokens=96"]


def _built(tmp_path, *extra):
    cfg = tiny_cfg(tmp_path, *ROOMY, *extra)
    data, m, _ = build(cfg)
    return cfg, data, m


def _kind(data, kind):
    return next(q for q in data.train if q.meta.get("kind") == kind)


def _segments(m, ex):
    """[(mask value, decoded text)] of consecutive runs of an example's loss mask."""
    out, start = [], 0
    for i in range(1, len(ex.ids) + 1):
        if i == len(ex.ids) or ex.loss_mask[i] != ex.loss_mask[start]:
            out.append((ex.loss_mask[start], m.generator.decode_ids(ex.ids[start:i])))
            start = i
    return out


def _examples(m, questions, phase="sft"):
    with m.scoring():
        return m.strategy.build_examples(step_ctx(m, phase).phase, questions, m)


# ---- stage 1: trajectories -----------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["multi", "single"])
def test_comparison_issues_parallel_queries_in_multi_mode_and_sequential_ones_in_single(tmp_path, mode):
    _, data, m = _built(tmp_path, f"strategy.queries={mode}")
    q = _kind(data, "comparison")
    (ex,) = _examples(m, [q])
    seg = _segments(m, ex)
    turns = [t for k, t in seg if k == 1]
    searches = [fmt.parse_turn(t, mode).queries for t in turns[:-1]]
    if mode == "multi":
        assert searches == [tuple(q.sub_queries)]  # both sub-queries in one search turn
    else:
        assert searches == [(q.sub_queries[0],), (q.sub_queries[1],)]  # one per turn
    assert fmt.extract_answer(turns, forced=False) == q.answers[0]
    assert [k for k, _ in seg] == [1, 0] * len(searches) + [1]  # turn, observation, ..., answer


def test_bridge_searches_in_order_with_the_intermediate_answer(tmp_path):
    _, data, m = _built(tmp_path)
    q = _kind(data, "bridge")
    (ex,) = _examples(m, [q])
    seg = _segments(m, ex)
    turns, obs = [t for k, t in seg if k == 1], [t for k, t in seg if k == 0]
    first, second = (fmt.parse_turn(t) for t in turns[:2])
    assert first.queries == (q.sub_queries[0],) and second.queries == (q.sub_queries[1],)
    assert q.sub_answers[0] in second.queries[0]  # the second hop names the first hop's answer ...
    assert f"found {q.sub_answers[0]}" in turns[1]  # ... which the think of that turn states
    # gold context: each hop's gold passage opens its information block
    for o, gold in zip(obs, q.gold_passage_ids):
        assert o.startswith(f"\n{fmt.INFO_OPEN} (1) {m.strategy.passage(m, m.corpus.row(gold))} (2) ")
    assert fmt.well_formed(turns, forced=False)


def test_chain_using_every_turn_ends_with_the_forced_tag_and_single_hop_searches_the_question(tmp_path):
    _, data, m = _built(tmp_path, "strategy.max_turns=1")
    single = _kind(data, "single")
    bridge = _kind(data, "bridge")
    out = _examples(m, [single, bridge])
    assert [e.qid for e in out] == [single.id] and m.strategy.sft_stats["turns"] == 1  # bridge needs 2
    seg = _segments(m, out[0])
    assert fmt.parse_turn(seg[0][1]).queries == (single.question,)
    # the forced "<answer>" is not learned (mask 0), the model writes the rest
    assert seg[1][0] == 0 and seg[1][1].endswith(fmt.FINAL_TEXT)
    assert seg[2] == (1, fmt.forced_answer_turn(single.answers[0]))


def test_retrieved_context_keeps_only_chains_whose_blocks_hold_every_gold(tmp_path, capsys):
    _, data, m = _built(tmp_path, "strategy.sft_context=retrieved")
    out = _examples(m, data.train)
    byid = {q.id: q for q in data.train}
    st = m.strategy.sft_stats
    assert st["retrieval"] > 0 and st["built"] == len(out) > 0
    for e in out:
        obs = "".join(t for k, t in _segments(m, e) if k == 0)
        for gold in byid[e.qid].gold_passage_ids:
            assert m.strategy.passage(m, m.corpus.row(gold)) in obs
    assert "sft_context=retrieved kept" in capsys.readouterr().out


def test_too_long_trajectories_are_skipped_and_counted_never_truncated(tmp_path, capsys):
    cfg = tiny_cfg(tmp_path, "strategy.name=rag_r1")  # tiny.yaml: 256 positions
    data, m, _ = build(cfg)
    out = _examples(m, data.train)
    st = m.strategy.sft_stats
    assert st["context"] > 0 and st["built"] == len(out) == len(data.train) - st["context"] - st["turn_tokens"]
    assert all(len(e.prompt_ids) + len(e.ids) <= 256 for e in out)
    assert f"skipped {st['context']} longer than 256 tokens" in capsys.readouterr().out


def test_sft_retrieval_is_one_batched_call_per_turn_index(tmp_path, monkeypatch):
    _, data, m = _built(tmp_path)
    calls = []
    enc, search = m.encode_questions, m.search
    monkeypatch.setattr(m, "encode_questions", lambda qs: calls.append(("encode", len(qs))) or enc(qs))
    monkeypatch.setattr(m, "search", lambda q, k: calls.append(("search", q.shape[0], k)) or search(q, k))
    _examples(m, data.train)
    plans = [p for p in map(m.strategy.plan, data.train) if p is not None]
    depth = max(len(p.searches) for p in plans)
    per_turn = [sum(len(p.searches[t][1]) for p in plans if t < len(p.searches)) for t in range(depth)]
    assert calls == [c for n in per_turn for c in (("encode", n), ("search", n, 2))]


def test_separator_in_a_sub_query_is_an_error_in_multi_mode(tmp_path):
    _, data, m = _built(tmp_path)
    q = _kind(data, "comparison")
    bad = Question(
        "x",
        q.question,
        q.answers,
        q.gold_passage_ids,
        meta=dict(q.meta),
        sub_queries=["AC|DC", "b"],
        sub_answers=["1", "2"],
    )
    with pytest.raises(ValueError, match="question 'x'.*reserved separator"):
        _examples(m, [bad])
    m.strategy.opts.queries = "single"
    assert len(_examples(m, [bad])) == 1  # ordinary text in single mode


def test_observation_tokens_have_mask_zero_and_exactly_zero_gradient(tmp_path, monkeypatch):
    _, data, m = _built(tmp_path)
    items = _examples(m, data.train[:12])[:4]
    seen = {}
    real = m.generator.token_logprobs

    def leaf(*args, **kw):
        lp, mask = real(*args, **kw)
        seen["lp"], seen["mask"] = lp.detach().clone().requires_grad_(True), mask
        return seen["lp"], mask

    monkeypatch.setattr(m.generator, "token_logprobs", leaf)
    m.set_modes({"generator"})
    out, logs = m.strategy.loss(items, m, step_ctx(m, "sft"))
    out.total.backward()
    grad, mask = seen["lp"].grad, seen["mask"]
    for n, e in enumerate(items):
        assert mask[n, : len(e.ids)].tolist() == [float(v) for v in e.loss_mask]
    assert torch.equal(grad[mask == 0], torch.zeros_like(grad[mask == 0]))
    assert torch.equal(grad[mask != 0], -torch.ones_like(grad[mask != 0]))  # d(sum NLL)/d log p = -1
    assert out.count == sum(sum(e.loss_mask) for e in items)
    # the same for the policy loss, with garbage off the model tokens
    lp = torch.randn(3, 6, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 0, 1, 0], [0, 1, 1, 1, 0, 0], [1, 0, 0, 0, 0, 0]], dtype=torch.float32)
    old = torch.where(mask != 0, lp.detach() + 0.1, torch.full_like(lp, float("nan")))
    ref = torch.where(mask != 0, lp.detach() - 0.2, torch.full_like(lp, -float("inf")))
    for red in losses.RL_REDUCTIONS:
        lp.grad = None
        total, _, _ = mod.policy_loss_sum(lp, old, ref, torch.tensor([1.0, -0.5, 2.0]), mask, 0.04, 0.2, 0.2, red, 10)
        total.backward()
        assert torch.equal(lp.grad[mask == 0], torch.zeros(int((mask == 0).sum()))), red
        assert bool((lp.grad[mask != 0] != 0).all()), red


@pytest.mark.parametrize("reduction", losses.RL_REDUCTIONS)
def test_policy_loss_sum_reproduces_the_reduction_over_any_split(reduction):
    g = torch.Generator().manual_seed(0)
    N, T = 6, 9
    lp = -torch.rand(N, T, generator=g)
    old = lp + 0.3 * torch.randn(N, T, generator=g)
    ref = lp + 0.3 * torch.randn(N, T, generator=g)
    adv = torch.randn(N, generator=g)
    mask = (torch.rand(N, T, generator=g) > 0.4).float()
    args = (0.04, 0.2, 0.28)
    whole, _ = losses.grpo_loss(lp, old, ref, adv, mask, *args, reduction, 30)
    if reduction == "sum":  # per-sequence token sums averaged over sequences (see the docstring)
        whole = whole / N
    parts = [
        mod.policy_loss_sum(lp[a:b], old[a:b], ref[a:b], adv[a:b], mask[a:b], *args, reduction, 30)
        for a, b in ((0, 1), (1, 4), (4, 6))
    ]
    split = sum(float(t) for t, _, _ in parts) / sum(c for _, c, _ in parts)
    assert math.isclose(split, float(whole), rel_tol=1e-5, abs_tol=1e-7)


# ---- stage 2: collection with a scripted generator -----------------------------------------------
def _script(monkeypatch, m, turns):
    """Replace sampling: call i of sample_ids returns turns[i] (one text per context, in order)."""
    calls = []

    def sample_ids(contexts, max_new_tokens=None, do_sample=True, temperature=None, stop=None):
        texts = turns[len(calls)]
        assert len(texts) == len(contexts)
        calls.append((len(contexts), do_sample, temperature))
        ids = [m.generator.encode_text(t) for t in texts]
        return Sampled(
            ids, [[-0.5] * len(x) for x in ids], ["stop"] * len(ids), [m.generator.decode_ids(x) for x in ids]
        )

    monkeypatch.setattr(m.generator, "sample_ids", sample_ids)
    return calls


def _count_retrieval(monkeypatch, m):
    calls = []
    enc, search = m.encode_questions, m.search
    monkeypatch.setattr(m, "encode_questions", lambda qs: calls.append(("encode", list(qs))) or enc(qs))
    monkeypatch.setattr(m, "search", lambda q, k: calls.append(("search", q.shape[0], k)) or search(q, k))
    return calls


def _collect(m, batch):
    with m.scoring():
        return m.strategy.collect(batch, m, step_ctx(m, "rl"))


def test_collect_one_batched_retrieval_per_turn_and_em_reward(tmp_path, monkeypatch):
    _, data, m = _built(tmp_path, "strategy.group_size=2", "strategy.temperature=0.7")
    batch = data.train[:2]
    gold = batch[0].answers[0]
    turn1 = [
        "<think> a </think> <search> q one | q two, with comma | q three </search>",
        "<think> b </think> <search> q four </search>",
        "<think> c </think> <search> | </search>",  # empty: no query, no retrieval for it
        "<think> d </think> <answer> wrong </answer>",
    ]
    turn2 = [
        f"<think> e </think> <answer> The {gold.upper()}. </answer>",  # EM after normalisation
        "<think> f </think> <answer> nope </answer>",
        "<think> g </think> <answer> wrong </answer>",
    ]
    sampled = _script(monkeypatch, m, [turn1, turn2])
    calls = _count_retrieval(monkeypatch, m)
    items, logs = _collect(m, batch)
    assert sampled == [(4, True, 0.7), (3, True, 0.7)]  # sampled at the strategy's temperature
    # ONE encode + ONE search for the 4 queries of turn 1; none in turn 2 (nobody searched)
    assert calls == [("encode", ["q one", "q two, with comma", "q three", "q four"]), ("search", 4, 2)]
    want = [
        metrics.exact_match(a, batch[j // 2].answers)
        for j, a in enumerate([f"The {gold.upper()}.", "nope", "wrong", "wrong"])
    ]
    assert want[0] == 1.0 and [it.reward for it in items] == want
    assert [it.advantage for it in items[2:]] == [0.0, 0.0]  # a zero-std group
    assert items[0].advantage > 0 > items[1].advantage
    assert logs["zero_std_groups"] == 0.5 and logs["em"] == 0.25
    assert logs["rounds"] == 0.5 and logs["queries_per_round"] == 2.0  # 4 queries in 2 rounds
    # retrieved text and forced text carry loss mask 0; old log-probs are the sampling ones
    empty = m.generator.encode_text(fmt.observation([]))
    assert items[2].ids[len(m.generator.encode_text(turn1[2])) :][: len(empty)] == empty
    for it in items:
        assert [lp for lp, k in zip(it.old_logprobs, it.loss_mask) if k] == [-0.5] * sum(it.loss_mask)
        assert len(it.ref_logprobs) == len(it.ids)


def test_format_reward_and_zero_std_groups_give_no_policy_gradient(tmp_path, monkeypatch):
    _, data, m = _built(tmp_path, "strategy.group_size=2", "strategy.format_reward=0.5", "strategy.beta=0")
    batch = data.train[:2]
    ok = "<think> t </think> <answer> wrong </answer>"
    _script(monkeypatch, m, [[ok, "no tags at all", ok, ok]])
    items, logs = _collect(m, batch)
    assert [it.reward for it in items] == [0.5, 0.0, 0.5, 0.5] and logs["format_rate"] == 0.75
    assert all(it.ref_logprobs is None for it in items)  # beta = 0: no reference forward
    m.set_modes({"generator"})
    for group, moves in ((items[2:], False), (items[:2], True)):
        m.generator.zero_grad(set_to_none=True)
        out, _ = m.strategy.loss(group, m, step_ctx(m, "rl"))
        out.total.backward()
        grads = [p.grad for p in m.generator.parameters() if p.grad is not None]
        assert any(bool((g != 0).any()) for g in grads) == moves


def test_predict_answers_greedily_and_counts_rounds_queries_and_passages(tmp_path, monkeypatch):
    _, data, m = _built(tmp_path)
    batch = data.train[:4]
    s = "<think> t </think> <search> {} </search>"
    sampled = _script(
        monkeypatch,
        m,
        [
            [s.format("qa | qb"), "no tags", "<think> t </think> <answer> Sumras Inst", s.format("qc")],
            [s.format("qa"), s.format("")],  # a repeated query: passages not listed twice; an empty search
            ["<think> t </think> <answer> done </answer>", s.format("qd")],
            [" Foo </answer>"],  # the forced final turn after max_turns=3 searches
        ],
    )
    calls = _count_retrieval(monkeypatch, m)
    out = m.strategy.predict(batch, m, step_ctx(m))
    assert [c[1] for c in sampled] == [False] * 4  # greedy
    assert [p["prediction"] for p in out] == ["done", "", "Sumras Inst", "Foo"]
    assert [(p["rounds"], p["queries"]) for p in out] == [(2, 3), (0, 0), (0, 0), (2, 2)]
    assert [c[1] for c in calls if c[0] == "encode"] == [["qa", "qb", "qc"], ["qa"], ["qd"]]
    with torch.no_grad():
        rows = {x: m.search(m.encode_questions([x]), 2)[0].tolist() for x in ("qa", "qb", "qc", "qd")}
    ids = lambda *qs: list(dict.fromkeys(m.corpus[r].id for x in qs for r in rows[x]))  # noqa: E731
    assert out[0]["retrieved_ids"] == ids("qa", "qb") and out[3]["retrieved_ids"] == ids("qc", "qd")
    assert out[1]["retrieved_ids"] == [] and out[2]["retrieved_ids"] == []
    assert [p["metrics"] for p in out] == [
        {"format_ok": 1.0, "answered": 1.0},
        {"format_ok": 0.0, "answered": 0.0},
        {"format_ok": 0.0, "answered": 1.0},
        {"format_ok": 0.0, "answered": 1.0},  # its second search was empty
    ]


# ---- the reference model, declared parameters, options ------------------------------------------
def test_reference_is_snapshotted_at_rl_start_unless_resumed(tmp_path):
    _, _, m = _built(tmp_path)
    s = m.strategy
    assert m.component_params()["reference"] == [] and not any(p.requires_grad for p in s.reference.parameters())
    with torch.no_grad():
        for p in m.generator.parameters():
            p.add_(0.01)
    gen = lambda: {k: v.clone() for k, v in m.generator.model.state_dict().items()}  # noqa: E731
    ref = lambda: {k: v.clone() for k, v in s.reference.model.state_dict().items()}  # noqa: E731
    before = ref()
    s.on_phase_start(m, step_ctx(m, "sft"), False)
    s.on_phase_start(m, step_ctx(m, "rl"), True)
    assert_same_tensors(ref(), before)  # resumed: the checkpoint's reference is kept
    s.on_phase_start(m, step_ctx(m, "rl"), False)
    assert_same_tensors(ref(), gen())
    assert s.reference.component == "reference"


def test_only_the_generator_is_optimised_and_the_reference_changes_only_by_its_snapshot(tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path, *ROOMY, "train.steps=4", "eval.splits=[]")
    data, m, _ = build(cfg)
    monkeypatch.setattr(mod.RAGR1, "on_phase_start", Strategy.on_phase_start)
    before = snapshot(m)
    make_trainer(cfg, data, m).fit()
    changed = changed_components(before, snapshot(m))
    assert changed["generator"]
    assert not changed["reference"] and not changed["query_encoder"] and not changed["doc_encoder"]


LORA = ["generator.lora.enabled=true"]
REF = "strategy.reference.adapter."


def _policy_key(ref_key: str) -> str:
    """The policy adapter's name (in the generator's model) of a reference weight's checkpoint key."""
    head, leaf = ref_key[len(REF) :].rsplit(".", 1)
    return f"{head}.default.{leaf}"


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_lora_reference_is_a_frozen_adapter_never_optimised_and_checkpointed_alone(tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path, *ROOMY, *LORA, "train.steps=4", "train.save_every=1", "eval.splits=[]")
    data, m, _ = build(cfg)
    s = m.strategy
    ref_ids = {id(p) for p in s.reference.parameters()}
    policy = m.generator.trainable_parameters()
    assert ref_ids and m.component_params()["reference"] == []
    assert not ref_ids & {id(p) for p in m.component_params()["generator"]}
    trainer = make_trainer(cfg, data, m)
    for phase in s.phases():
        opt, _, _ = trainer._start_phase(phase, 2)
        assert [id(p) for g in opt.param_groups for p in g["params"]] == [id(p) for p in policy]
        assert not any(p.requires_grad for p in s.reference.parameters())
    monkeypatch.setattr(mod.RAGR1, "on_phase_start", Strategy.on_phase_start)  # no snapshot
    before = snapshot(m)
    trainer.fit()
    changed = changed_components(before, snapshot(m))
    assert changed["generator"] and all(
        ".lora_A.default." in n or ".lora_B.default." in n for n in changed["generator"]
    )
    assert not changed["reference"] and not changed["query_encoder"] and not changed["doc_encoder"]
    weights = torch.load(rundir.checkpoints_dir(tmp_path) / "last.pt", weights_only=False)["weights"]
    ref = {k: v for k, v in weights.items() if k.startswith("strategy.reference.")}
    assert ref and all(k.startswith(REF) and (".lora_A." in k or ".lora_B." in k) for k in ref)
    assert sum(v.numel() for v in ref.values()) == sum(p.numel() for p in policy)  # an adapter, no base
    assert not any(".reference." in k for k in weights if k.startswith("generator."))
    assert not all(torch.equal(v, weights["generator.model." + _policy_key(k)]) for k, v in ref.items())


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_lora_ppo_critic_copies_the_policy_before_the_reference_adapter_joins_it(tmp_path):
    _, _, m = _built(tmp_path, *LORA, "strategy.algorithm=ppo")
    s = m.strategy
    assert [p.name for p in s.parts()] == ["reference", "critic"] and list(s._modules) == ["reference", "critic"]
    assert not any("reference" in n.split(".") for n, _ in s.critic.named_parameters())
    with torch.no_grad():
        for p in m.generator.trainable_parameters():
            p.add_(0.01)
    s.on_phase_start(m, step_ctx(m, "rl"), False)  # snapshot + the critic's trunk loaded strictly
    gen = m.generator.model.state_dict()
    assert all(torch.equal(v, gen[_policy_key(REF + k)]) for k, v in s.reference.adapter.state_dict().items())


@pytest.mark.parametrize(
    "override, key",
    [
        ("strategy.group_size=1", "strategy.group_size"),
        ("strategy.sft_fraction=1.0", "strategy.sft_fraction"),
        ("strategy.algorithm=reinforce", "strategy.algorithm"),
        ("strategy.gamma=0.9", "strategy.gamma"),  # a ppo-only option under grpo
        ("strategy.reduction=mean", "strategy.reduction"),
        ("strategy.queries=both", "strategy.queries"),
        ("strategy.eps_low=1.5", "strategy.eps_low"),
        ("strategy.beta=-1", "strategy.beta"),
    ],
)
def test_options_are_validated(tmp_path, override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        tiny_cfg(tmp_path, "strategy.name=rag_r1", override)


def test_sft_fraction_zero_is_rl_only():
    s = mod.RAGR1(mod.Options(sft_fraction=0.0, updates=2))
    assert [(p.name, p.collect, p.updates) for p in s.phases()] == [("rl", True, 2)]
    assert [(p.name, p.examples) for p in mod.RAGR1().phases()] == [("sft", True), ("rl", False)]


# ---- resume in the middle of RL ------------------------------------------------------------------
def test_resume_mid_rl_is_bit_identical(tmp_path, monkeypatch):
    """An untrained tiny generator never answers, so every reward would be 0 and RL would not move;
    a length-parity reward on the last turn makes the advantages (and the updates) non-zero."""
    monkeypatch.setattr(mod.RAGR1, "_answer", lambda self, t: (t.turns[-1] if t.turns else "", False))
    monkeypatch.setattr(mod, "metrics", SimpleNamespace(exact_match=lambda pred, golds: float(len(pred) % 2)))
    starts = []
    real_start = mod.RAGR1.on_phase_start

    def on_phase_start(self, rag, ctx, resumed):
        real_start(self, rag, ctx, resumed)
        starts.append((ctx.phase.name, resumed, {k: v.clone() for k, v in rag.generator.model.state_dict().items()}))

    monkeypatch.setattr(mod.RAGR1, "on_phase_start", on_phase_start)
    common = [*ROOMY, "train.steps=6", "train.save_every=1", "train.log_every=1", "strategy.max_turns=1"]
    common += ["eval.splits=[test]"]
    a, b = tmp_path / "a", tmp_path / "b"
    ra = run.train_and_evaluate(tiny_cfg(a, *common))
    assert [(n, r) for n, r, _ in starts] == [("sft", False), ("rl", False)]
    sft_end = starts[1][2]
    starts.clear()
    with pytest.raises(KeyboardInterrupt):
        run.train_and_evaluate(tiny_cfg(b, *common, "debug.stop_after=5"))
    assert torch.load(rundir.checkpoints_dir(b) / "last.pt", weights_only=False)["step"] == 5
    starts.clear()
    rb = run.train_and_evaluate(tiny_cfg(b, *common))
    assert [(n, r) for n, r, _ in starts] == [("rl", True)]  # resumed: not snapshotted again
    assert ra["status"] == rb["status"] == "ok"
    wa, wb = final_weights(a), final_weights(b)
    assert_same_tensors(wa, wb)  # generator AND reference
    ref = {k[len("strategy.reference.model.") :]: v for k, v in wa.items() if k.startswith("strategy.reference.")}
    assert_same_tensors(ref, sft_end)  # the reference is the SFT result ...
    gen = {k[len("generator.model.") :]: v for k, v in wa.items() if k.startswith("generator.")}
    assert not all(torch.equal(gen[k], ref[k]) for k in ref)  # ... and RL moved the generator away from it
    rows = step_lines(a / "metrics.jsonl")
    assert any(r.get("phase") == "rl" and r.get("grad_norm", 0) > 0 for r in rows)
    assert rows == step_lines(b / "metrics.jsonl")
    assert timeless(ra["test"]) == timeless(rb["test"])


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_lora_resume_mid_rl_is_bit_identical_with_the_reference_adapter_restored(tmp_path, monkeypatch):
    """test_resume_mid_rl_is_bit_identical under LoRA: the reference is an adapter in the
    generator's model, restored from the checkpoint on resume (created from the untrained adapter
    in setup, so a reference not restored would differ from the SFT result), never re-copied."""
    monkeypatch.setattr(mod.RAGR1, "_answer", lambda self, t: (t.turns[-1] if t.turns else "", False))
    monkeypatch.setattr(mod, "metrics", SimpleNamespace(exact_match=lambda pred, golds: float(len(pred) % 2)))
    starts = []
    real_start = mod.RAGR1.on_phase_start

    def on_phase_start(self, rag, ctx, resumed):
        real_start(self, rag, ctx, resumed)
        starts.append((ctx.phase.name, resumed, {k: v.clone() for k, v in rag.generator.model.state_dict().items()}))

    monkeypatch.setattr(mod.RAGR1, "on_phase_start", on_phase_start)
    common = [*ROOMY, *LORA, "train.steps=6", "train.save_every=1", "train.log_every=1", "strategy.max_turns=1"]
    common += ["eval.splits=[test]"]
    a, b = tmp_path / "a", tmp_path / "b"
    ra = run.train_and_evaluate(tiny_cfg(a, *common))
    assert [(n, r) for n, r, _ in starts] == [("sft", False), ("rl", False)]
    sft_end = starts[1][2]
    starts.clear()
    with pytest.raises(KeyboardInterrupt):
        run.train_and_evaluate(tiny_cfg(b, *common, "debug.stop_after=5"))
    assert torch.load(rundir.checkpoints_dir(b) / "last.pt", weights_only=False)["step"] == 5
    starts.clear()
    rb = run.train_and_evaluate(tiny_cfg(b, *common))
    assert [(n, r) for n, r, _ in starts] == [("rl", True)]  # resumed: not snapshotted again
    assert ra["status"] == rb["status"] == "ok"
    wa, wb = final_weights(a), final_weights(b)
    assert_same_tensors(wa, wb)  # generator AND reference adapter
    ref = {_policy_key(k): v for k, v in wa.items() if k.startswith("strategy.reference.")}
    assert ref and all(k.startswith(REF) for k in wa if k.startswith("strategy.reference."))
    assert_same_tensors(ref, {k: sft_end[k] for k in ref})  # the reference is the SFT adapter ...
    gen = {k[len("generator.model.") :]: v for k, v in wa.items() if k.startswith("generator.")}
    assert not all(torch.equal(gen[k], ref[k]) for k in ref)  # ... and RL moved the policy adapter away
    assert not any(".reference." in k for k in gen)
    rows = step_lines(a / "metrics.jsonl")
    assert any(r.get("phase") == "rl" and r.get("grad_norm", 0) > 0 for r in rows)
    assert rows == step_lines(b / "metrics.jsonl")
    assert timeless(ra["test"]) == timeless(rb["test"])
    assert deterministic_cost(ra["cost"]) == deterministic_cost(rb["cost"])
    assert ra["cost"]["flops_by_component"]["reference"]["score"] > 0


@pytest.mark.parametrize("updates", [1, 2])
def test_one_update_per_collection_has_ratio_exactly_one(tmp_path, monkeypatch, updates):
    """updates=1: the old policy is the current one (ratio exactly 1, nothing clipped) whatever the
    sampling log-probs say; updates>1: the sampling log-probs are the old policy."""
    _, data, m = _built(tmp_path, "strategy.group_size=2", "strategy.format_reward=0.5", f"strategy.updates={updates}")
    ok = "<think> t </think> <answer> wrong </answer>"
    _script(monkeypatch, m, [[ok, "no tags at all", ok, ok]])  # sampling log-probs are a fake -0.5
    items, _ = _collect(m, data.train[:2])
    m.set_modes({"generator"})
    _, logs = m.strategy.loss(items, m, step_ctx(m, "rl"))
    if updates == 1:
        assert logs["ratio"] == 1.0 and logs["clip_fraction"] == 0.0
    else:
        assert logs["ratio"] != 1.0
