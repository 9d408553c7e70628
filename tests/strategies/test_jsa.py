"""jsa: the generator is scored once per unique passage of each chain; the loss is the JSA loss
over the chain's states, recomputed here; the per-example cache is filled, used after the
warm-up, merged over ranks, and survives a resume and `train.init_from`."""

from __future__ import annotations

import math

import pytest
import torch

from ragtune import losses, run, rundir

from helpers import build, step_ctx, tiny_cfg


@pytest.fixture
def built(tmp_path):
    cfg = tiny_cfg(tmp_path, "strategy.name=jsa", "strategy.mis_steps=12", "strategy.cache_warmup=3")
    data, m, _ = build(cfg)
    m.eval()
    return cfg, data, m


def _spy(monkeypatch, m):
    """Record every generator call's number of sequences and grad mode, and the chain's inputs."""
    calls, chains, lats = [], [], []
    orig_pairs, orig_chain, orig_latent = m.generator.score_pairs, losses.mis_chain, m.strategy.latent

    def pairs(q, p, a):
        calls.append((len(q), torch.is_grad_enabled(), list(zip(q, p))))
        return orig_pairs(q, p, a)

    def chain(*args):
        out = orig_chain(*args)
        chains.append((args, out))
        return out

    def latent(*args):
        lats.append(orig_latent(*args))
        return lats[-1]

    monkeypatch.setattr(m.generator, "score_pairs", pairs)
    monkeypatch.setattr(losses, "mis_chain", chain)
    monkeypatch.setattr(m.strategy, "latent", latent)
    return calls, chains, lats


def test_one_generator_sequence_per_unique_passage_of_the_chain(built, monkeypatch):
    _, data, m = built
    calls, chains, lats = _spy(monkeypatch, m)
    batch = data.train[:4]
    loss, logs = m.strategy.loss(batch, m, step_ctx(m, k=3))
    (log_target, log_q, mask, steps, gen, init, proposals), (states, accepted) = chains[0]
    unique = [len(set(row)) for row in proposals.tolist()]  # no start state before the warm-up
    assert [c[1] for c in calls] == [False, True]  # sampler no-grad, then the states with grad
    assert calls[0][0] == sum(unique)  # not B * M = 48
    assert calls[1][0] == sum(len(set(row)) for row in states.tolist())
    assert math.isclose(logs["unique_per_chain"], sum(unique) / 4, rel_tol=1e-6)
    # the loss is the JSA loss of those states, and the chain's target log p(z|x) + log p_G(y|x,z)
    # at every visited passage, both recomputed from independent generator scores
    lat = lats[0]
    gen = m.generator.__class__
    want = 0.0
    for b, x in enumerate(batch):
        for c in range(mask.shape[1]):
            if math.isnan(float(log_target[b, c])):
                continue
            with torch.no_grad():
                text = m.passage_texts[int(lat.cands.rows[b, c])]
                g = float(gen.score_pairs(m.generator, [x.question], [text], [x.answers[0]])[0].sum())
            assert math.isclose(
                float(log_target[b, c]), float(lat.log_prior[b, c].detach()) + g, rel_tol=1e-4, abs_tol=1e-4
            )
            n = states[b].tolist().count(c)
            want -= n * (g + float(lat.log_q[b, c].detach()) + float(lat.log_prior[b, c].detach()))
    assert math.isclose(float(loss.detach()), want / (4 * steps), rel_tol=1e-4, abs_tol=1e-4)
    assert int((~torch.isnan(log_target)).sum()) == sum(unique)


def test_cache_is_filled_then_used_after_warmup(built, monkeypatch):
    _, data, m = built
    batch = data.train[:3]
    _, logs = m.strategy.loss(batch, m, step_ctx(m, step=0, k=2))
    assert logs["cache_hit_rate"] == 0.0 and set(m.strategy.cache) == {x.id for x in batch}
    _, logs = m.strategy.loss(batch, m, step_ctx(m, step=2, k=2))  # still warming up
    assert logs["cache_hit_rate"] == 0.0
    cached = {x.id: m.strategy.cache[x.id][0] for x in batch}
    assert {m.strategy.cache[x.id][1] for x in batch} == {2}  # the step each sample was drawn at
    _, chains, lats = _spy(monkeypatch, m)
    _, logs = m.strategy.loss(batch, m, step_ctx(m, step=3, k=2))
    assert logs["cache_hit_rate"] == 1.0
    (_, _, _, _, _, init, _), _ = chains[0]
    cands = lats[0].cands
    for b, x in enumerate(batch):  # each chain starts from its cached passage, flagged as cache
        assert int(init[b]) >= 0 and m.corpus[int(cands.rows[b, init[b]])].id == cached[x.id]
        assert bool(cands.has("cache")[b, init[b]])


def test_merge_extra_states_keeps_the_newest_sample_per_question(built):
    _, _, m = built
    r0 = {"cache": {"a": ("p1", 7), "b": ("p2", 3)}}
    r1 = {"cache": {"b": ("p9", 2), "c": ("p3", 5), "a": ("p0", 1)}}
    merged = m.strategy.merge_extra_states([r0, r1])
    assert merged["cache"] == {"a": ("p1", 7), "b": ("p2", 3), "c": ("p3", 5)}  # rank 0 newer: kept
    m.strategy.load_extra_state(merged)
    assert m.strategy.extra_state()["cache"] == merged["cache"]


def test_step_end_shares_new_entries_newest_first(built, monkeypatch):
    _, data, m = built
    s = m.strategy
    s.load_extra_state({"cache": {"a": ("p1", 1)}})
    s.loss(data.train[:2], m, step_ctx(m, step=4, k=2))
    assert set(s.pending) == {x.id for x in data.train[:2]}
    s.on_step_end(m, step_ctx(m, step=5))  # one process: nothing to share, the cache stays
    assert s.pending == {} and set(s.cache) == {"a", *(x.id for x in data.train[:2])}
    other = {"a": ("p7", 4), data.train[0].id: ("p8", 1)}  # another rank's share: newer a, older q0
    monkeypatch.setattr(m, "gather", lambda obj: [obj, other])
    mine = s.cache[data.train[0].id]
    s.on_step_end(m, step_ctx(m, step=6))
    assert s.cache["a"] == ("p7", 4) and s.cache[data.train[0].id] == mine


def test_mean_reduction_is_refused_and_a_nan_generator_diverges(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="strategy.reduction"):
        build(tiny_cfg(tmp_path / "a", "strategy.name=jsa", "strategy.reduction=mean"))
    data, m, _ = build(tiny_cfg(tmp_path / "b", "strategy.name=jsa", "strategy.mis_steps=4"))
    orig = m.generator.score_pairs
    monkeypatch.setattr(m.generator, "score_pairs", lambda q, p, a: tuple(t * float("nan") for t in orig(q, p, a)))
    loss, _ = m.strategy.loss(data.train[:2], m, step_ctx(m, k=2))
    assert not torch.isfinite(loss)  # the trainer stops the run as diverged


def test_cache_survives_a_resume_bit_identically_and_init_from(tmp_path):
    common = ["strategy.name=jsa", "strategy.mis_steps=8", "strategy.cache_warmup=1", "train.steps=4"]
    common += ["train.save_every=1", "eval.splits=[]"]
    a = run.train_and_evaluate(tiny_cfg(tmp_path / "a", *common))
    with pytest.raises(KeyboardInterrupt):
        run.train_and_evaluate(tiny_cfg(tmp_path / "b", *common, "debug.stop_after=2"))
    b = run.train_and_evaluate(tiny_cfg(tmp_path / "b", *common))
    assert a["status"] == b["status"] == "ok"
    fa = torch.load(rundir.final_path(tmp_path / "a"), weights_only=False)
    fb = torch.load(rundir.final_path(tmp_path / "b"), weights_only=False)
    assert fa["strategy_extra"]["cache"] and fa["strategy_extra"] == fb["strategy_extra"]
    assert all(torch.equal(fa["weights"][k], fb["weights"][k]) for k in fa["weights"])
    cfg = tiny_cfg(tmp_path / "c", *common, f"train.init_from={tmp_path / 'a'}")
    _, m, _ = build(cfg)
    assert m.strategy.cache == fa["strategy_extra"]["cache"]


@pytest.mark.slow
def test_two_real_ranks_share_the_cache_every_step(tmp_path):
    """torchrun, 2 ranks (gloo): the per-step all-gather in on_step_end runs on both ranks without
    a deadlock, and final.pt's cache holds one sample for every question of the 3 global batches
    (a batch per rank), each tagged with the step it was drawn at."""
    import os
    import subprocess
    import sys

    from helpers import ROOT, TINY, cache_dir

    run.load_data(tiny_cfg(tmp_path / "x").data)  # fill the data cache once, not from two processes
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    logs = tmp_path / "rank_logs"  # each rank's own stdout/stderr, for the failure message
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["--log-dir", str(logs), "--redirects", "3"]
    cmd += ["-m", "ragtune.cli", "train", TINY, "strategy.name=jsa", "strategy.mis_steps=6", "strategy.cache_warmup=0"]
    cmd += [f"data.cache_dir={cache_dir()}", "train.steps=3", "eval.splits=[]", f"run_dir={tmp_path / 'r'}"]
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    if res.returncode != 0:
        ranks = {str(p.relative_to(logs)): p.read_text(errors="replace")[-1500:] for p in sorted(logs.rglob("*.log"))}
        pytest.fail(f"torchrun exit {res.returncode}; per-rank logs: {ranks}; launcher: {res.stderr[-800:]}")
    cache = torch.load(rundir.final_path(tmp_path / "r"), weights_only=False)["strategy_extra"]["cache"]
    cfg = tiny_cfg(tmp_path / "y")
    assert len(cache) == 2 * 3 * cfg.train.batch_size  # 2 ranks x 3 steps x 4: 24 distinct (48 per epoch)
    assert {step for _, step in cache.values()} == {0, 1, 2}
