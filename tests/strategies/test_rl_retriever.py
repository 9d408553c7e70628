"""rl_retriever (Q-RAG): the targets are Polyak-averaged only after rl steps and never re-copied on
resume; each phase changes exactly its parameters; the returns fed to the loss are the gated
lambda-returns of a scripted episode, recomputed by hand from the target towers; the reward comes
once, at first coverage; collection is no-grad in eval mode; predict is greedy, deterministic,
batched (one search per step) and reports its rounds."""

from __future__ import annotations

import math

import pytest
import torch

from ragtune import losses, run, rundir
from ragtune.candidates import Candidates
from ragtune.config import ConfigError
from ragtune.strategies.rl_retriever import Options, RLRetriever
from ragtune.strategy import LossSum, StepContext

from helpers import build, changed_components, make_trainer, snapshot, step_ctx, tiny_cfg

RL = "strategy.name=rl_retriever"
TOWERS = ("query_encoder", "doc_encoder")
TARGETS = ("target_query", "target_doc")


def _params(mod):
    return {n: p.detach().clone() for n, p in mod.named_parameters()}


@torch.no_grad()
def _perturb(mod, seed, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    for p in mod.parameters():
        p.add_(torch.randn(p.shape, generator=g) * scale)


def _ctx(m, phase, k=2):
    return step_ctx(m, phase, k=k) if phase else StepContext(None, 0, 0, 0, {}, k)


def _spy_returns(monkeypatch):
    seen = []
    orig = losses.lambda_returns

    def spy(rewards, next_values, dones, gamma, lam, mask=None):
        out = orig(rewards, next_values, dones, gamma, lam, mask)
        seen.append({"rewards": rewards, "next_values": next_values, "dones": dones, "mask": mask, "out": out})
        return out

    monkeypatch.setattr(losses, "lambda_returns", spy)
    return seen


def _script(monkeypatch, s, plan):
    """Replace exploration by a fixed plan {batch position: [corpus row per step]}; returns the
    calls [(step, running positions)]."""
    calls = []

    def choose(q, valid, rows, explore, step, running):
        calls.append((step, list(running)))
        pos = []
        for i, b in enumerate(running):
            hit = ((rows[i] == plan[b][step]) & valid[i]).nonzero()
            assert hit.numel() == 1, f"row {plan[b][step]} is not a valid action of question {b} at step {step}"
            pos.append(int(hit[0, 0]))
        return torch.tensor(pos)

    monkeypatch.setattr(s, "_choose", choose)
    return calls


def _rl_step(s, batch, m, ctx):
    """The rl phase as the trainer runs it: `collect` on the questions, `loss` on their episodes;
    (loss, collect logs + loss logs)."""
    items, clogs = s.collect(batch, m, ctx)
    assert len(items) == len(batch)
    out, logs = s.loss(items, m, ctx)
    return out, {**clogs, **logs}


# ---- targets: Polyak in the rl phase only, copied on a fresh rl start only --------------------------
def test_polyak_update_only_after_rl_steps_and_only_of_the_targets(tmp_path):
    _, m, _ = build(tiny_cfg(tmp_path, RL, "strategy.tau=0.25"))
    s = m.strategy
    for i, name in enumerate(TOWERS):
        _perturb(getattr(m.retriever, name), seed=i)
    online = {c: _params(getattr(m.retriever, c)) for c in TOWERS}
    target0 = {c: _params(getattr(s, c)) for c in TARGETS}
    gen0 = _params(m.generator)
    for phase in ("reader", ""):  # the reader phase and evaluation (no phase): nothing moves
        s.on_step_end(m, _ctx(m, phase))
        for c in TARGETS:
            assert all(torch.equal(v, target0[c][n]) for n, v in getattr(s, c).named_parameters())
    s.on_step_end(m, _ctx(m, "rl"))
    for tgt, src in zip(TARGETS, TOWERS):
        for n, v in getattr(s, tgt).named_parameters():
            assert torch.allclose(v, 0.75 * target0[tgt][n] + 0.25 * online[src][n], atol=1e-6), n
        assert any(not torch.equal(v, target0[tgt][n]) for n, v in getattr(s, tgt).named_parameters())
    for c in TOWERS:  # the online towers and the generator are untouched by the hook
        assert all(torch.equal(v, online[c][n]) for n, v in getattr(m.retriever, c).named_parameters())
    assert all(torch.equal(v, gen0[n]) for n, v in m.generator.named_parameters())


def test_targets_copied_when_the_rl_phase_starts_fresh_never_on_resume(tmp_path):
    _, m, _ = build(tiny_cfg(tmp_path, RL))
    s = m.strategy
    for i, name in enumerate(TOWERS):
        _perturb(getattr(m.retriever, name), seed=10 + i)
    before = {c: _params(getattr(s, c)) for c in TARGETS}
    s.on_phase_start(m, _ctx(m, "rl"), resumed=True)  # the checkpoint restored the targets
    s.on_phase_start(m, _ctx(m, "reader"), resumed=False)  # not the rl phase
    for c in TARGETS:
        assert all(torch.equal(v, before[c][n]) for n, v in getattr(s, c).named_parameters()), c
    s.on_phase_start(m, _ctx(m, "rl"), resumed=False)
    for tgt, src in zip(TARGETS, TOWERS):
        online = _params(getattr(m.retriever, src))
        assert all(torch.equal(v, online[n]) for n, v in getattr(s, tgt).named_parameters()), tgt
        assert any(not torch.equal(v, before[tgt][n]) for n, v in getattr(s, tgt).named_parameters())


def test_a_run_resumed_inside_the_rl_phase_is_bit_identical(tmp_path):
    """Killed after step 2 (1 reader step, 1 rl step), resumed: the targets come from the
    checkpoint (a re-copy would make them equal to the online towers and change the result)."""
    common = [RL, "strategy.reader_fraction=0.25", "train.steps=4", "train.save_every=1", "eval.splits=[]"]
    a = run.train_and_evaluate(tiny_cfg(tmp_path / "a", *common))
    with pytest.raises(KeyboardInterrupt):
        run.train_and_evaluate(tiny_cfg(tmp_path / "b", *common, "debug.stop_after=2"))
    b = run.train_and_evaluate(tiny_cfg(tmp_path / "b", *common))
    assert a["status"] == b["status"] == "ok"
    wa = torch.load(rundir.final_path(tmp_path / "a"), weights_only=False)["weights"]
    wb = torch.load(rundir.final_path(tmp_path / "b"), weights_only=False)["weights"]
    assert wa.keys() == wb.keys() and any(k.startswith("strategy.target_query.") for k in wa)
    assert all(torch.equal(wa[k], wb[k]) for k in wa), [k for k in wa if not torch.equal(wa[k], wb[k])][:3]
    online = {k.split(".", 2)[-1]: v for k, v in wa.items() if k.startswith("retriever.query_encoder.")}
    target = {k.split(".", 2)[-1]: v for k, v in wa.items() if k.startswith("strategy.target_query.")}
    assert any(not torch.equal(target[n], online[n]) for n in online)  # Polyak lags behind


@pytest.mark.parametrize("hook", [True, False], ids=["polyak", "no-hook"])
def test_each_phase_changes_exactly_its_parameters(tmp_path, monkeypatch, hook):
    if not hook:
        monkeypatch.setattr(RLRetriever, "on_step_end", lambda *a: None)
    want = {"reader": {"generator"}, "imitate": set(TOWERS), "rl": set(TOWERS) | (set(TARGETS) if hook else set())}
    for phase, trained in want.items():
        cfg = tiny_cfg(
            tmp_path / phase,
            RL,
            "strategy.reader_fraction=0.3",
            "strategy.imitate_fraction=0.3",
            "train.steps=4",
            f"train.only_phase={phase}",
        )
        data, m, _ = build(cfg)
        before = snapshot(m)
        make_trainer(cfg, data, m).fit()
        changed = {c for c, names in changed_components(before, snapshot(m)).items() if names}
        assert changed == trained, (phase, changed)


# ---- the returns and rewards fed to the loss -------------------------------------------------
@torch.no_grad()
def _heads(s, a, twin, q_scale):
    if not twin:
        return q_scale * (s * a).sum(-1, keepdim=True)
    h = s.shape[-1] // 2
    return 2 * q_scale * torch.stack([(s[..., :h] * a[..., :h]).sum(-1), (s[..., h:] * a[..., h:]).sum(-1)], -1)


@pytest.mark.parametrize("twin", [False, True], ids=["single", "twin"])
def test_returns_are_the_gated_lambda_returns_of_a_scripted_episode(tmp_path, monkeypatch, twin):
    alpha, gamma, lam, pen, qs = 0.05, 0.9, 0.6, 0.1, 1.5
    opts = [f"strategy.alpha={alpha}", f"strategy.gamma={gamma}", f"strategy.lam={lam}", f"strategy.twin={twin}"]
    opts += [f"strategy.step_penalty={pen}", f"strategy.q_scale={qs}", "strategy.pool=candidates", "strategy.horizon=3"]
    data, m, _ = build(tiny_cfg(tmp_path, RL, *opts))
    m.eval()
    s = m.strategy
    _perturb(s.target_query, 1)  # the targets differ from the online towers: V must use the targets
    _perturb(s.target_doc, 2)
    batch = [data.train[5], data.train[6]]  # two gold passages each
    g0, g1 = (m.rows_of(x.gold_passage_ids) for x in batch)
    d1 = [r for r in m.rows_of(batch[1].candidate_passage_ids) if r not in g1]
    plan = {0: [g0[0], g0[1]], 1: d1[:3]}  # q0 covers its gold at step 1 (inside the window); q1 never
    calls = _script(monkeypatch, s, plan)
    seen = _spy_returns(monkeypatch)
    out, logs = _rl_step(s, batch, m, step_ctx(m, "rl", k=2))
    assert [c[1] for c in calls] == [[0, 1], [0, 1], [1]]  # q0's episode ended at coverage

    texts = m.passage_texts

    def state(b, rows):
        return " [SEP] ".join([batch[b].question] + [texts[r] for r in rows])

    def value(b, chosen):  # V(s) = alpha logsumexp(min_h Q_target / alpha) over the unselected candidates
        acts = [r for r in m.rows_of(batch[b].candidate_passage_ids) if r not in chosen]
        e = m.encode([state(b, chosen)], s.target_query, "target_query", 128)  # (1, H)
        a = m.encode([texts[r] for r in acts], s.target_doc, "target_doc", 40)  # (A, H)
        q = _heads(e, a, twin, qs).min(-1).values  # (A,)
        return alpha * float(torch.logsumexp(q / alpha, 0))

    r = seen[0]
    G = {
        (0, 1): 1.0 - pen,  # terminal: G = r
        (0, 0): -pen + gamma * ((1 - lam) * value(0, plan[0][:1]) + lam * (1.0 - pen)),
        (1, 2): -pen,  # the horizon is terminal too
    }
    G[(1, 1)] = -pen + gamma * ((1 - lam) * value(1, plan[1][:2]) + lam * G[(1, 2)])
    G[(1, 0)] = -pen + gamma * ((1 - lam) * value(1, plan[1][:1]) + lam * G[(1, 1)])
    assert r["mask"].tolist() == [[True, True, False], [True, True, True]]
    assert r["dones"].tolist() == [[False, True, False], [False, False, True]]
    for (b, t), want in G.items():
        assert math.isclose(float(r["out"][b, t]), want, rel_tol=1e-5, abs_tol=1e-5), (b, t)
    assert float(r["out"][0, 2]) == 0.0
    # the loss: each head of the online Q(s_t, a_t) regressed on G_t, summed over the 5 valid steps
    total = 0.0
    for (b, t), want in G.items():
        e = m.encode([state(b, plan[b][:t])], m.retriever.query_encoder, "query_encoder", 128)
        a = m.index.lookup(torch.tensor([plan[b][t]]))
        total += float(((_heads(e, a, twin, qs) - want) ** 2).mean())
    assert isinstance(out, LossSum) and out.count == 5.0
    assert math.isclose(float(out.total.detach()), total, rel_tol=1e-4, abs_tol=1e-5)
    assert math.isclose(logs["episode_return"], ((1 - 2 * pen) + (-3 * pen)) / 2, rel_tol=1e-6)
    assert logs["episode_steps"] == 2.5 and logs["coverage_rate"] == 0.5 and logs["pool_recall"] == 1.0


def test_reward_given_once_at_first_coverage_and_answer_em_at_the_end(tmp_path, monkeypatch):
    data, m, _ = build(tiny_cfg(tmp_path / "c", RL, "strategy.pool=candidates", "strategy.horizon=4"))
    s = m.strategy
    batch = [data.train[0], data.train[6]]  # one gold passage; two
    g0, g1 = (m.rows_of(x.gold_passage_ids) for x in batch)
    d0 = [r for r in m.rows_of(batch[0].candidate_passage_ids) if r not in g0]
    d1 = [r for r in m.rows_of(batch[1].candidate_passage_ids) if r not in g1]
    plan = {0: [d0[0], g0[0], d0[1], d0[2]], 1: [g1[0], d1[0], d1[1], g1[1]]}
    calls = _script(monkeypatch, s, plan)
    seen = _spy_returns(monkeypatch)
    _rl_step(s, batch, m, step_ctx(m, "rl"))
    assert seen[0]["rewards"].tolist() == [[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
    assert seen[0]["mask"].tolist() == [[True, True, False, False], [True] * 4]
    assert [b for _, running in calls for b in running].count(0) == 2  # nothing chosen after coverage

    data, m, _ = build(
        tiny_cfg(tmp_path / "e", RL, "strategy.pool=candidates", "strategy.horizon=4", "strategy.reward=answer_em")
    )
    s = m.strategy
    _script(monkeypatch, s, plan)
    seen = _spy_returns(monkeypatch)
    read = []

    def generate_multi(questions, passage_lists, max_new_tokens=None):
        read.append(passage_lists)
        return [batch[0].answers[0], "not it"]

    monkeypatch.setattr(m.generator, "generate_multi", generate_multi)
    _rl_step(s, batch, m, step_ctx(m, "rl"))
    assert seen[0]["rewards"].tolist() == [[0.0, 0.0, 0.0, 1.0], [0.0] * 4]  # EM, once, at the last step
    assert seen[0]["mask"].tolist() == [[True] * 4] * 2  # no early end without the coverage reward
    assert read == [[[m.passage_texts[r] for r in plan[b]] for b in (0, 1)]]  # in selection order


@torch.no_grad()
def test_fact_reward_pays_each_gold_passage_once_at_the_step_that_selects_it(tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path, RL, "strategy.pool=candidates", "strategy.horizon=4", "strategy.fact_reward=0.25")
    data, m, _ = build(cfg)
    batch = [data.train[6]]  # two gold passages
    (g,) = (m.rows_of(x.gold_passage_ids) for x in batch)
    d = [r for r in m.rows_of(batch[0].candidate_passage_ids) if r not in g]
    _script(monkeypatch, m.strategy, {0: [g[1], d[0], g[0], d[1]]})
    seen = _spy_returns(monkeypatch)
    _rl_step(m.strategy, batch, m, step_ctx(m, "rl"))
    assert seen[0]["rewards"].tolist() == [[0.25, 0.0, 1.25]]  # + 1 at coverage (step 2): the episode ends
    assert seen[0]["dones"].tolist() == [[False, False, True]]


# ---- the imitation phase -----------------------------------------------------------------------
def test_imitation_scores_each_state_of_the_gold_chain_against_its_next_gold_passage(tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path, RL, "strategy.imitate_fraction=0.3", "strategy.imitate_negatives=3")
    data, m, _ = build(cfg)
    s = m.strategy
    batch = [data.train[0], data.train[6]]  # one gold passage; two (hop order)
    chains = [m.rows_of(x.gold_passage_ids) for x in batch]
    texts, seen = [], {}
    orig_states, orig_loss = s.encode_states, losses.contrastive_loss

    def encode_states(rag, t, target=False):
        texts.extend(t)
        return orig_states(rag, t, target)

    def spy(q, d, positives, temperature, hard_negatives=None, mask_out=None):
        seen.update(q=q, d=d, pos=positives, temp=temperature, hard=hard_negatives, mask=mask_out)
        return orig_loss(q, d, positives, temperature, hard_negatives, mask_out)

    monkeypatch.setattr(s, "encode_states", encode_states)
    monkeypatch.setattr(losses, "contrastive_loss", spy)
    loss, logs = s.loss(batch, m, step_ctx(m, "imitate"))
    q0, q1 = batch[0].question, batch[1].question
    assert texts == [q0, q1, s.state_text(m, q1, chains[1][:1])]  # s_0 of each, then s_1 after gold_1
    uniq = sorted({r for c in chains for r in c})
    want_pos = [chains[0][0], chains[1][0], chains[1][1]]
    assert [uniq[i] for i in seen["pos"].tolist()] == want_pos
    # a state's own gold passages are out of its softmax (its positive is restored by the loss)
    assert seen["mask"].tolist() == [[r in set(c) for r in uniq] for c in (chains[0], chains[1], chains[1])]
    assert seen["hard"].shape[:2] == (3, 3) and seen["temp"] == m.retriever.temperature
    assert isinstance(loss, LossSum) and loss.count == 3 and logs["imitate_states"] == 3.0
    # the mined negatives are never gold passages of the state's question nor in-batch candidates
    top = m.search(seen["q"].detach(), len(m.index)).tolist()
    for i, c in enumerate((chains[0], chains[1], chains[1])):
        mined = [r for r in top[i] if r not in set(c) and r not in set(uniq)][:3]
        assert torch.allclose(seen["hard"][i], m.passage_embeddings(torch.tensor(mined)).to(seen["hard"].dtype))
    logits = torch.cat([seen["q"] @ seen["d"].T, torch.einsum("ph,pmh->pm", seen["q"], seen["hard"])], 1)
    logits = logits / seen["temp"]
    logits[:, : len(uniq)] = logits[:, : len(uniq)].masked_fill(seen["mask"], float("-inf"))
    cols = seen["pos"]
    logits[torch.arange(3), cols] = (seen["q"] * seen["d"][cols]).sum(-1) / seen["temp"]
    want = -(logits.log_softmax(-1)[torch.arange(3), cols]).sum()
    assert torch.allclose(loss.total, want, atol=1e-5)


def test_imitation_mines_as_many_negatives_as_the_poorest_rank(tmp_path, monkeypatch):
    """The mined negatives per state are the minimum over the ranks (the same passage-tower calls
    on every rank): a rank that could mine 3 takes 1 when another can mine only 1, none when
    another can mine none (then no rank encodes negatives)."""
    cfg = tiny_cfg(tmp_path, RL, "strategy.imitate_fraction=0.3", "strategy.imitate_negatives=3")
    data, m, _ = build(cfg)
    seen = []
    orig = losses.contrastive_loss

    def spy(q, d, positives, temperature, hard_negatives=None, mask_out=None):
        seen.append(None if hard_negatives is None else hard_negatives.shape[1])
        return orig(q, d, positives, temperature, hard_negatives, mask_out)

    monkeypatch.setattr(losses, "contrastive_loss", spy)
    for other in (None, 1, 0):  # one process; a second rank with 1; with 0
        monkeypatch.setattr(m, "gather", lambda x, o=other: [x] if o is None else [x, o])
        m.strategy.loss(data.train[:2], m, step_ctx(m, "imitate"))
    assert seen == [3, 1, None]


def test_imitation_order_any_targets_every_gold_passage_not_selected_yet(tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path, RL, "strategy.imitate_fraction=0.3", "strategy.imitate_order=any")
    data, m, _ = build(cfg)
    s = m.strategy
    x = data.train[6]  # two gold passages
    g = m.rows_of(x.gold_passage_ids)
    texts, seen = [], {}
    orig_states, orig_loss = s.encode_states, losses.contrastive_loss
    monkeypatch.setattr(s, "encode_states", lambda rag, t, target=False: texts.extend(t) or orig_states(rag, t))
    monkeypatch.setattr(
        losses, "contrastive_loss", lambda q, d, p, *a, **k: seen.update(p=p) or orig_loss(q, d, p, *a, **k)
    )
    loss, _ = s.loss([x], m, step_ctx(m, "imitate"))
    s1 = s.state_text(m, x.question, g[:1])
    assert texts == [x.question, x.question, s1] and loss.count == 3  # s_0 -> gold_1 and gold_2; s_1 -> gold_2
    assert [sorted(g)[i] for i in seen["p"].tolist()] == [g[0], g[1], g[1]]


def test_imitation_phase_runs_between_the_reader_and_rl_phases():
    ph = RLRetriever(Options(reader_fraction=0.2, imitate_fraction=0.3, towers="state")).phases()
    assert [(p.name, sorted(p.trains), round(p.fraction, 6)) for p in ph] == [
        ("reader", ["generator"], 0.2),
        ("imitate", ["query_encoder"], 0.3),
        ("rl", ["query_encoder"], 0.5),
    ]


# ---- collection, predict -----------------------------------------------------------------------
def _spy_calls(monkeypatch, m):
    encodes, searches = [], []
    orig_encode, orig_search = m.encode, m.search

    def encode(texts, tower, component, max_length):
        encodes.append((component, len(texts), torch.is_grad_enabled(), tower.training))
        return orig_encode(texts, tower, component, max_length)

    def search(q, k):
        searches.append((q.shape[0], k, torch.is_grad_enabled()))
        return orig_search(q, k)

    monkeypatch.setattr(m, "encode", encode)
    monkeypatch.setattr(m, "search", search)
    return encodes, searches


def test_collection_is_no_grad_in_eval_mode_and_searches_once_per_step(tmp_path, monkeypatch):
    data, m, _ = build(tiny_cfg(tmp_path, RL, "strategy.horizon=3"))
    m.set_modes(set(TOWERS))  # as the trainer leaves them: dropout on in the trained towers
    encodes, searches = _spy_calls(monkeypatch, m)
    batch = data.train[:6]
    out, logs = _rl_step(m.strategy, batch, m, step_ctx(m, "rl"))
    *collect, last = encodes
    assert last[0] == "query_encoder" and last[2] and last[3]  # the recompute: with grad, train mode
    assert last[1] == out.count
    assert collect and all(not grad and not training for _, _, grad, training in collect)
    steps = [n for c, n, _, _ in collect if c == "query_encoder"]  # one state encode per step ...
    assert len(searches) == len(steps) and [n for n, _, _ in searches] == steps  # ... and one search
    assert steps[0] == len(batch) and steps == sorted(steps, reverse=True) and len(steps) <= 3
    assert all(not grad for _, _, grad in searches)
    assert [c for c, *_ in collect if c.startswith("target")] == ["target_query", "target_doc"]
    assert m.retriever.query_encoder.training  # modes restored after collection
    assert out.total.requires_grad


def test_predict_is_greedy_batched_deterministic_and_in_selection_order(tmp_path, monkeypatch):
    data, m, _ = build(tiny_cfg(tmp_path, RL, "strategy.horizon=3", "strategy.pool_size=5"))
    m.eval()
    batch = data.dev[:5]
    read = []
    orig = m.generator.generate_multi

    def generate_multi(questions, passage_lists, max_new_tokens=None):
        read.append(passage_lists)
        return orig(questions, passage_lists, max_new_tokens)

    monkeypatch.setattr(m.generator, "generate_multi", generate_multi)
    encodes, searches = _spy_calls(monkeypatch, m)
    rng = torch.random.get_rng_state()
    ctx = StepContext(None, 0, 0, 0, {}, 2)
    first = m.strategy.predict(batch, m, ctx)
    assert searches == [(5, 5, False), (5, 6, False), (5, 7, False)]  # one search per step, whole batch
    assert [n for c, n, *_ in encodes] == [5, 5, 5]  # one state encode per step
    again = m.strategy.predict(batch, m, ctx)
    assert first == again and torch.equal(rng, torch.random.get_rng_state())  # no sampling
    for x, p, passages in zip(batch, first, read[0]):
        assert p["rounds"] == p["queries"] == 3 and p["metrics"] == {}
        ids = p["retrieved_ids"]
        assert len(set(ids)) == 3
        assert passages == [m.passage_texts[m.corpus.row(i)] for i in ids]  # read in selection order
        chosen = []  # the greedy policy, by hand: argmax of state . passage over the unselected top 5
        with torch.no_grad():
            for _ in range(3):
                text = " [SEP] ".join([x.question] + [m.passage_texts[r] for r in chosen])
                e = m.retriever.encode([text], m.retriever.query_encoder, "query_encoder", 128)
                top = [r for r in m.index.search(e, 5 + len(chosen))[1][0].tolist() if r not in chosen][:5]
                q = (m.index.lookup(torch.tensor(top)) @ e[0]).tolist()
                chosen.append(top[max(range(len(top)), key=q.__getitem__)])
        assert ids == [m.corpus[r].id for r in chosen]


# ---- the reader phase ----------------------------------------------------------------------------
@pytest.mark.parametrize("context, reduction", [("gold", "sum"), ("padded", "mean")])
def test_reader_phase_reads_the_gold_passages_in_one_prompt(tmp_path, monkeypatch, context, reduction):
    opts = [f"strategy.reader_context={context}", f"strategy.reduction={reduction}"]
    data, m, _ = build(tiny_cfg(tmp_path, RL, *opts))
    m.eval()
    batch = [data.train[0], data.train[5], data.train[6]]
    calls = []
    orig = m.generator.score_multi

    def score_multi(questions, passage_lists, answers):
        calls.append(passage_lists)
        out = orig(questions, passage_lists, answers)
        calls.append(out)
        return out

    monkeypatch.setattr(m.generator, "score_multi", score_multi)
    out, logs = m.strategy.loss(batch, m, step_ctx(m, "reader", k=3))
    passages, (tok, mask) = calls
    for x, ps in zip(batch, passages):
        gold = [m.passage_texts[r] for r in m.rows_of(x.gold_passage_ids)]
        assert ps[: len(gold)] == gold  # gold passages first, in hop order
        assert len(ps) == (3 if context == "padded" else len(gold))
        assert len(set(ps)) == len(ps)
    nll = -(tok * mask).sum(-1).detach()  # (B,)
    if reduction == "sum":
        assert isinstance(out, LossSum) and out.count == float(mask.sum())
        assert math.isclose(float(out.total.detach()), float(nll.sum()), rel_tol=1e-5)
    else:
        assert math.isclose(float(out.detach()), float((nll / mask.sum(-1)).mean()), rel_tol=1e-5)
    assert logs["answer_tokens"] == float(mask.sum())


def test_reader_fraction_zero_has_only_the_rl_phase():
    assert [p.name for p in RLRetriever(Options(reader_fraction=0.0)).phases()] == ["rl"]
    ph = RLRetriever().phases()
    assert [(p.name, sorted(p.trains), p.fraction) for p in ph] == [
        ("reader", ["generator"], 0.3),
        ("rl", ["doc_encoder", "query_encoder"], 0.7),
    ]


@pytest.mark.parametrize(
    "override",
    [
        "gamma=1.5",
        "gamma=0",
        "lam=-0.1",
        "tau=0",
        "tau=2",
        "alpha=0",
        "reader_fraction=1.0",
        "imitate_fraction=0.7",  # with the default reader_fraction 0.3: no step left for rl
        "imitate_negatives=-1",
        "imitate_order=random",
        "fact_reward=-0.5",
        "pool=web",
        "pool_size=0",
        "reward=f1",
        "explore_top=0",
        "q_scale=-1",
        "reader_context=all",
    ],
)
def test_bad_options_name_their_key(tmp_path, override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"strategy\.{key}\b"):
        tiny_cfg(tmp_path, RL, f"strategy.{override}")


def test_a_prompt_that_cannot_fit_is_left_out_not_fatal(tmp_path, monkeypatch):
    """A question whose multi-passage prompt exceeds the generator's limits: the reader phase leaves
    it out (logged), predict still reports its retrieval, with an error and an empty answer."""
    data, m, _ = build(tiny_cfg(tmp_path, RL, "strategy.horizon=2"))
    m.eval()
    long_q = data.train[1].question
    orig_render, orig_score = m.generator.render_prompt, m.generator.score_multi

    def render_prompt(question, passages):
        if question == long_q:
            raise ValueError("does not fit generator.max_prompt_length")
        return orig_render(question, passages)

    scored = []

    def score_multi(questions, passage_lists, answers):
        scored.append(list(questions))
        return orig_score(questions, passage_lists, answers)

    monkeypatch.setattr(m.generator, "render_prompt", render_prompt)
    monkeypatch.setattr(m.generator, "score_multi", score_multi)
    batch = data.train[:3]
    out, logs = m.strategy.loss(batch, m, step_ctx(m, "reader"))
    assert scored == [[batch[0].question, batch[2].question]] and logs["reader_skipped"] == 1.0
    preds = m.strategy.predict(batch, m, StepContext(None, 0, 0, 0, {}, 2))
    assert "does not fit" in preds[1]["error"] and preds[1]["prediction"] == ""
    assert len(preds[1]["retrieved_ids"]) == 2 and preds[1]["rounds"] == 2
    assert "error" not in preds[0] and "error" not in preds[2]


def test_collection_encodes_each_pool_passage_once_while_the_passage_tower_trains(tmp_path, monkeypatch):
    data, m, _ = build(tiny_cfg(tmp_path, RL, "strategy.horizon=3"))
    m.set_modes(set(TOWERS))
    m.doc_trained = True  # as in the rl phase: action embeddings re-encoded by the passage tower
    rows_asked, qs = [], []
    orig_pe, orig_choose = m.passage_embeddings, m.strategy._choose

    def passage_embeddings(rows, mask=None):
        if not torch.is_grad_enabled():
            rows_asked.extend(rows.flatten().tolist())
        return orig_pe(rows, mask)

    def choose(q, valid, rows, explore, step, running):
        qs.append((q.clone(), rows.clone(), valid.clone()))
        return orig_choose(q, valid, rows, explore, step, running)

    monkeypatch.setattr(m, "passage_embeddings", passage_embeddings)
    monkeypatch.setattr(m.strategy, "_choose", choose)
    _rl_step(m.strategy, data.train[:6], m, step_ctx(m, "rl"))
    pooled = {r for _, rows, valid in qs for r in rows[valid].tolist()}
    assert len(rows_asked) == len(set(rows_asked)) and set(rows_asked) == pooled  # once each
    q, rows, valid = qs[0]  # step 0 of question 0: fresh eval-mode encodes of the question and its pool
    m.eval()
    with torch.no_grad():
        a = m.retriever.encode_passages([m.passage_texts[r] for r in rows[0][valid[0]].tolist()])  # (P, H)
        e = m.retriever.encode([data.train[0].question], m.retriever.query_encoder, "query_encoder", 128)  # (1, H)
    assert torch.allclose(q[0][valid[0]], (a @ e[0]), atol=1e-5)


def test_state_only_towers_use_the_stored_index_as_the_action_side(tmp_path):
    """towers=state: the rl phase trains the query tower only, owns no passage-tower target, and the
    target's action embeddings are exactly the stored index embeddings (nothing re-encoded)."""
    cfg = tiny_cfg(tmp_path, RL, "strategy.towers=state", "strategy.reader_fraction=0", "train.steps=2")
    data, m, ledger = build(cfg)
    s = m.strategy
    assert [p.name for p in s.parts()] == ["target_query"] and s.phases()[0].trains == {"query_encoder"}
    assert not hasattr(s, "target_doc")
    rows = torch.tensor([[0, 3, 5], [2, 1, 0]])
    cands = Candidates.from_lists(rows.tolist(), [[8] * 3] * 2, rows.device)
    calls = ledger.deterministic_view()["calls"]["total"]
    with m.scoring():
        got = s._target_actions(m, cands)  # (2, 3, H)
    assert torch.equal(got, m.index.lookup(rows)) and ledger.deterministic_view()["calls"]["total"] == calls
    before = snapshot(m)
    make_trainer(cfg, data, m).fit()
    changed = changed_components(before, snapshot(m))
    assert changed["query_encoder"] and not changed["doc_encoder"] and changed["target_query"]


def test_state_only_towers_refuse_shared_towers(tmp_path):
    """With one shared tower, training the state tower trains the passage tower too: refused."""
    cfg = tiny_cfg(tmp_path, RL, "strategy.towers=state", "retriever.shared_towers=true")
    with pytest.raises(ConfigError, match="strategy.towers"):
        build(cfg)
