"""The shared trainer: what trains, gradient accumulation, exact resume, divergence, schedules, sampler."""

from __future__ import annotations

import math

import pytest
import torch

from ragtune import cli, run
from ragtune.config import ConfigError
from ragtune.sampler import BatchSampler
from ragtune.strategies import REGISTRY
from ragtune.strategy import Phase
from ragtune.trainer import Diverged, lr_lambda, phase_plan

from helpers import (
    TINY,
    assert_same_tensors,
    build,
    changed_components,
    deterministic_cost,
    final_weights,  # noqa: F401
    load_json,
    make_trainer,
    snapshot,
    step_lines,
    timeless,
    tiny_cfg,
)


# --------------------------------------------------------------------------- what trains
def _component_cases():
    cases = []
    for name, cls in sorted(REGISTRY.items()):
        phases = cls().phases()
        cases.append((name, (), ""))
        if len(phases) > 1:
            # rag_r1's rl phase alone, from an untrained tiny model: every reward is 0, so GRPO's
            # gradient is exactly 0 (correct); tests/strategies/test_rag_r1.py checks that phase
            # with a reward that varies
            cases += [(name, (), p.name) for p in phases if (name, p.name) != ("rag_r1", "rl")]
    cases += [
        ("joint", ("strategy.train_doc_encoder=true",), ""),
        ("independent", ("strategy.train_doc_encoder=true",), "retriever"),
        ("rl_retriever", ("strategy.towers=state",), "rl"),
    ]
    return cases


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_lora_trains_only_adapters(tmp_path):
    cfg = tiny_cfg(tmp_path, "strategy.name=joint", "train.steps=2", "generator.lora.enabled=true")
    data, m, _ = build(cfg)
    before = snapshot(m)
    make_trainer(cfg, data, m).fit()
    changed = changed_components(before, snapshot(m))
    assert changed["generator"] and all("lora_" in n for n in changed["generator"])
    assert {n for n in before["generator"] if "lora_" in n} == set(changed["generator"])
    assert changed["query_encoder"] and not changed["doc_encoder"]


def test_shared_towers_train_both_sides_and_refresh(tmp_path):
    cfg = tiny_cfg(tmp_path, "strategy.name=joint", "train.steps=2", "retriever.shared_towers=true")
    data, m, _ = build(cfg)
    assert m.retriever.shared
    before = snapshot(m)
    make_trainer(cfg, data, m).fit()
    changed = changed_components(before, snapshot(m))
    assert changed["query_encoder"] and changed["generator"]
    _assert_index_is_fresh(m)  # the passage side changed, so the index was rebuilt


def _assert_index_is_fresh(m):
    assert m.index.version >= 2
    with torch.no_grad():
        fresh = torch.cat(
            [m.retriever.encode_passages(m.passage_texts[i : i + 64]) for i in range(0, len(m.passage_texts), 64)]
        )
    assert torch.allclose(m.index.emb, fresh, atol=1e-5)


@pytest.mark.parametrize("refresh_every", [0, 1])
def test_index_matches_trained_doc_encoder_after_fit(tmp_path, refresh_every):
    cfg = tiny_cfg(
        tmp_path,
        "strategy.name=joint",
        "strategy.train_doc_encoder=true",
        "train.steps=3",
        f"index.refresh_every={refresh_every}",
    )
    data, m, ledger = build(cfg)
    calls0 = ledger.deterministic_view()["calls"]["index"]
    make_trainer(cfg, data, m).fit()
    _assert_index_is_fresh(m)
    batches = -(-len(m.passage_texts) // cfg.index.batch_size)
    refreshes = 3 if refresh_every else 1  # after every step, or once at the phase end (never twice)
    assert ledger.deterministic_view()["calls"]["index"] - calls0 == refreshes * batches
    assert not m.doc_trained


@pytest.mark.parametrize(
    "name, extra, only",
    _component_cases(),
    ids=lambda v: ("+".join(x.split(".")[-1] for x in v) or "-") if isinstance(v, tuple) else (v or "all"),
)
def test_exactly_declared_components_change(tmp_path, name, extra, only):
    overrides = [f"strategy.name={name}", "train.steps=2", *extra] + ([f"train.only_phase={only}"] if only else [])
    cfg = tiny_cfg(tmp_path, *overrides)
    data, m, _ = build(cfg)
    phases = m.strategy.phases()
    declared = {c for p in phases if not only or p.name == only for c in p.trains}
    before = snapshot(m)
    trainer = make_trainer(cfg, data, m)
    trainer.fit()
    changed = changed_components(before, snapshot(m))
    assert trainer.step == sum(n for _, _, n in phase_plan(phases, 2, only)) > 0 or not phases
    # a frozen part changes only through the strategy's hooks (a Polyak target, a reference
    # snapshot at a phase start), never through the optimizer: the strategies' own tests check how
    frozen = {p.name for p in m.strategy.parts() if not p.trainable}
    for comp, names in changed.items():
        if comp in frozen:
            continue
        if comp in declared and before[comp]:
            assert names, f"{name}/{only or 'all'}: {comp} is declared trained but did not change"
        else:
            assert not names, f"{name}/{only or 'all'}: {comp} is not declared trained but changed: {names[:3]}"
    if not phases:
        assert not any(changed.values())


def test_only_phase_unknown_is_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"'train\.only_phase'"):
        tiny_cfg(tmp_path, "strategy.name=two_phase", "train.only_phase=nonesuch")


# --------------------------------------------------------------------------- gradient accumulation
def test_sampler_micro_batches_are_the_big_batch():
    """Premise of the accumulation test: 2 batches of 4 = the first batch of 8 (same permutation)."""
    small, big = BatchSampler(48, 4, seed=0), BatchSampler(48, 8, seed=0)
    for _ in range(8):  # crosses the epoch boundary too
        assert small.next() + small.next() == big.next()


def test_grad_accum_equivalence(tmp_path):
    """One step of 4 x 2 accumulated micro-batches = one step of a batch of 8 (joint: a batch-mean loss)."""
    common = [
        "strategy.name=joint",
        "train.steps=1",
        "train.clip_norm=0",
        "train.schedule=constant",
        "train.warmup_steps=0",
        "train.log_every=1",
    ]
    cfg = tiny_cfg(tmp_path / "big", *common, "train.batch_size=8", "train.grad_accum=1")
    data, m, _ = build(cfg)
    init = {k: v.clone() for k, v in m.state_dict().items()}
    before = snapshot(m)

    def one_step(sub, bs, accum):
        cfg = tiny_cfg(tmp_path / sub, *common, f"train.batch_size={bs}", f"train.grad_accum={accum}")
        m.load_state_dict(init)  # the same pipeline (and tokenizer) from the same weights every time
        make_trainer(cfg, data, m).fit()
        return snapshot(m), step_lines(tmp_path / sub / "metrics.jsonl")[-1]

    big, log_big = one_step("big", 8, 1)
    acc, log_acc = one_step("acc", 4, 2)
    half, _ = one_step("half", 4, 1)
    moved = 0.0
    for comp in ("query_encoder", "generator"):
        tol = {"query_encoder": 1e-6, "generator": 1e-5}[comp]
        for n in big[comp]:  # Adam moves each weight by about lr (1e-4, 1e-3): compare at 1% of that
            assert torch.allclose(acc[comp][n], big[comp][n], rtol=0, atol=tol), f"{comp}.{n}"
            moved = max(moved, float((big[comp][n] - before[comp][n]).abs().max()))
    assert moved > 1e-4  # the step really moved the weights (lr.generator = 1e-3)
    # negative control: one micro-batch of 4 alone is a different step
    diff = max(float((half[c][n] - big[c][n]).abs().max()) for c in ("query_encoder", "generator") for n in big[c])
    assert diff > 1e-5
    assert math.isclose(log_acc["loss"], log_big["loss"], rel_tol=1e-5)
    assert log_acc["step"] == log_big["step"] == 1


# --------------------------------------------------------------------------- exact resume
@pytest.mark.parametrize(
    "name, extra, stop",
    [
        ("joint", (), 1),  # killed before the first checkpoint: starts over
        ("joint", (), 3),
        ("two_phase", (), 3),  # killed right after the phase-1 checkpoint
        ("independent", (), 4),
        ("joint", ("strategy.train_doc_encoder=true", "index.refresh_every=2"), 3),
        ("two_phase", (), 2),  # inside phase 1, resume crosses the phase boundary
        ("two_phase", (), 5),  # inside phase 2
        ("joint", ("strategy.train_doc_encoder=true",), 6),  # killed right after the final checkpoint
    ],
    ids=lambda v: ("+".join(x.split("=")[0].split(".")[-1] for x in v) or "-") if isinstance(v, tuple) else str(v),
)
def test_exact_resume(tmp_path, name, extra, stop, pinned_tokenizers):
    torch.set_num_threads(1)
    common = [
        f"strategy.name={name}",
        "train.steps=6",
        "train.save_every=2",
        "train.log_every=1",
        "train.eval_every=3",
        *extra,
    ]
    a = run.train_and_evaluate(tiny_cfg(tmp_path / "a", *common))
    with pytest.raises(KeyboardInterrupt):
        run.train_and_evaluate(tiny_cfg(tmp_path / "b", *common, f"debug.stop_after={stop}"))
    assert not (tmp_path / "b" / "result.json").exists()
    assert (tmp_path / "b" / "checkpoints" / "last.pt").exists() == (stop >= 2)
    b = run.train_and_evaluate(tiny_cfg(tmp_path / "b", *common))
    assert a["status"] == b["status"] == "ok" and a["steps"] == b["steps"] == 6
    wa, wb = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert wa and any(k.startswith("generator.") for k in wa)
    assert_same_tensors(wa, wb)
    ia = torch.load(tmp_path / "a" / "final.pt", weights_only=False)["index"]
    ib = torch.load(tmp_path / "b" / "final.pt", weights_only=False)["index"]
    assert (ia is None) == (ib is None)
    if ia is not None:
        assert ia["version"] == ib["version"] and torch.equal(ia["emb"], ib["emb"])
    la, lb = step_lines(tmp_path / "a" / "metrics.jsonl"), step_lines(tmp_path / "b" / "metrics.jsonl")
    assert [r["step"] for r in la if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert la == lb
    assert deterministic_cost(a["cost"]) == deterministic_cost(b["cost"])
    assert timeless(a["dev"]) == timeless(b["dev"]) and timeless(a["test"]) == timeless(b["test"])
    for f in ("predictions.jsonl", "predictions_dev.jsonl"):
        assert (tmp_path / "a" / f).read_text() == (tmp_path / "b" / f).read_text()


def test_init_from_continues_from_final_weights(tmp_path, pinned_tokenizers):
    """two_phase one phase at a time: generator run, then retriever run started from its weights."""
    common = ["strategy.name=two_phase", "train.steps=4", "eval.splits=[]"]
    g = run.train_and_evaluate(tiny_cfg(tmp_path / "g", *common, "train.only_phase=generator"))
    assert g["status"] == "ok" and g["steps"] == 2
    cfg = tiny_cfg(tmp_path / "r", *common, "train.only_phase=retriever", f"train.init_from={tmp_path / 'g'}")
    _, m, _ = build(cfg)
    wg = final_weights(tmp_path / "g")
    assert_same_tensors(wg, {k: v for k, v in m.state_dict().items() if k in wg})
    r = run.train_and_evaluate(cfg)
    assert r["status"] == "ok"
    wr = final_weights(tmp_path / "r")
    gen = [k for k in wg if k.startswith("generator.")]
    assert gen and all(torch.equal(wg[k], wr[k]) for k in gen)  # phase 2 keeps phase 1's generator
    qe = [k for k in wg if k.startswith("retriever.query_encoder.")]
    assert qe and any(not torch.equal(wg[k], wr[k]) for k in qe)  # and trains the query encoder
    with pytest.raises(ConfigError, match=r"'train\.init_from'"):
        build(tiny_cfg(tmp_path / "x", *common, f"train.init_from={tmp_path / 'nowhere'}"))


def test_load_weights_subset_and_unexpected_keys(tmp_path):
    from ragtune.checkpoint import load_weights, trained_weights

    cfg = tiny_cfg(tmp_path, "strategy.name=joint", "train.steps=1")
    data, m, _ = build(cfg)
    make_trainer(cfg, data, m).fit()
    saved = trained_weights(m, ["generator"])
    assert saved and all(k.startswith("generator.") for k in saved)
    _, fresh2, _ = build(cfg)
    load_weights(fresh2, saved)
    assert_same_tensors(saved, {k: v for k, v in fresh2.state_dict().items() if k in saved})
    with pytest.raises(ValueError, match="unexpected"):
        load_weights(fresh2, {"nonsense.weight": torch.zeros(1)})
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))  # checkpoints are renamed into place


def test_finished_run_is_not_redone(tmp_path, pinned_tokenizers):
    cfg = tiny_cfg(tmp_path, "strategy.name=joint", "train.steps=1", "eval.splits=[]")
    first = run.train_and_evaluate(cfg)
    mtime = (tmp_path / "final.pt").stat().st_mtime_ns
    assert first["status"] == "ok"
    assert run.train_and_evaluate(cfg) == load_json(tmp_path / "result.json")
    assert (tmp_path / "final.pt").stat().st_mtime_ns == mtime


# --------------------------------------------------------------------------- divergence
def _poison(monkeypatch, at_step: int, where: str):
    cls = REGISTRY["joint"]
    real = cls.loss

    def loss(self, batch, m, ctx):
        value, logs = real(self, batch, m, ctx)
        if ctx.step + 1 == at_step:  # `ctx.step` counts finished steps
            if where == "loss":
                value = value * float("nan")
            else:  # finite loss, NaN gradient: d/dx sqrt(|0 * x|) = inf * 0
                p = next(m.generator.model.parameters())
                value = value + (p.sum() * 0.0).abs().sqrt()
        return value, logs

    monkeypatch.setattr(cls, "loss", loss)


def test_nan_loss_marks_run_diverged(tmp_path, monkeypatch):
    _poison(monkeypatch, 2, "loss")
    res = run.train_and_evaluate(tiny_cfg(tmp_path, "strategy.name=joint", "train.steps=4", "train.save_every=1"))
    assert res["status"] == "diverged"
    assert "step 2" in res["reason"]
    assert res["dev"] is None and res["test"] is None
    assert load_json(tmp_path / "result.json")["status"] == "diverged"
    assert not (tmp_path / "final.pt").exists() and not (tmp_path / "predictions.jsonl").exists()
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=False)
    assert state["step"] == 1
    assert state["weights"] and all(torch.isfinite(v).all() for v in state["weights"].values() if v.is_floating_point())


def test_nan_gradient_is_never_applied(tmp_path, monkeypatch):
    _poison(monkeypatch, 2, "grad")
    cfg = tiny_cfg(tmp_path, "strategy.name=joint", "train.steps=4", "train.save_every=1")
    data, m, _ = build(cfg)
    trainer = make_trainer(cfg, data, m)
    with pytest.raises(Diverged, match="step 2"):
        trainer.fit()
    saved = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=False)
    assert saved["step"] == 1
    now = {k: v for k, v in m.state_dict().items() if k in saved["weights"]}
    assert_same_tensors(saved["weights"], now)  # the poisoned step changed nothing
    assert all(torch.isfinite(v).all() for v in now.values() if v.is_floating_point())


def test_cli_diverged_exit_code(tmp_path, monkeypatch, capsys):
    _poison(monkeypatch, 1, "loss")
    code = cli.main(
        [
            "train",
            TINY,
            "strategy.name=joint",
            "train.steps=2",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"run_dir={tmp_path / 'run'}",
        ]
    )
    assert code == 3
    assert "diverged" in capsys.readouterr().out


# --------------------------------------------------------------------------- schedules and plans
def test_lr_lambda_values():
    f = lr_lambda("constant", 0, 10)
    assert [f(s) for s in (0, 5, 9)] == [1.0, 1.0, 1.0]
    f = lr_lambda("constant", 4, 10)
    assert [f(s) for s in (0, 1, 3, 4, 9)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    f = lr_lambda("linear", 0, 10)  # 1 - s/10
    for s, want in [(0, 1.0), (1, 0.9), (5, 0.5), (9, 0.1), (10, 0.0), (12, 0.0)]:
        assert f(s) == pytest.approx(want)
    f = lr_lambda("linear", 2, 10)  # warmup (s+1)/2, then 1 - (s-2)/8
    for s, want in [(0, 0.5), (1, 1.0), (2, 1.0), (6, 0.5), (9, 0.125), (10, 0.0)]:
        assert f(s) == pytest.approx(want)
    f = lr_lambda("cosine", 0, 8)  # (1 + cos(pi s / 8)) / 2
    for s, want in [(0, 1.0), (2, (1 + 2**-0.5) / 2), (4, 0.5), (6, (1 - 2**-0.5) / 2), (8, 0.0), (9, 0.0)]:
        assert f(s) == pytest.approx(want, abs=1e-12)
    f = lr_lambda("cosine", 2, 10)
    assert [f(0), f(1)] == [0.5, 1.0] and f(6) == pytest.approx(0.5) and f(10) == pytest.approx(0.0)


def test_scheduler_drives_optimizer_lr(tmp_path):
    """The trainer's LambdaLR applies f(step) to each component's own base learning rate."""
    cfg = tiny_cfg(
        tmp_path,
        "strategy.name=joint",
        "train.steps=4",
        "train.schedule=linear",
        "train.warmup_steps=2",
        "train.log_every=1",
        "train.lr.generator=0.01",
        "train.lr.query_encoder=0.001",
    )
    data, m, _ = build(cfg)
    make_trainer(cfg, data, m).fit()
    rows = [r for r in step_lines(tmp_path / "metrics.jsonl") if "loss" in r]
    # the lr logged after step s is the one for the next step: f(s) with warmup 2 over 4 steps
    f = [1.0, 1.0, 0.5, 0.0]  # f(1)=(1+1)/2, f(2)=1-(0/2), f(3)=1-1/2, f(4)=0
    for r, want in zip(rows, f):
        assert r["lr/generator"] == pytest.approx(0.01 * want)
        assert r["lr/query_encoder"] == pytest.approx(0.001 * want)
    assert "lr/doc_encoder" not in rows[0]


def _phases(*fracs):
    comps = ["generator", "query_encoder", "doc_encoder"]
    return [Phase(f"p{i}", frozenset({comps[i]}), f) for i, f in enumerate(fracs)]


def test_phase_plan_splits_and_selects():
    ph = _phases(0.3, 0.7)
    assert phase_plan(ph, 10) == [(0, ph[0], 3), (1, ph[1], 7)]
    assert phase_plan(ph, 7) == [(0, ph[0], 2), (1, ph[1], 5)]  # round(2.1) = 2, the rest to the last
    ph3 = _phases(0.2, 0.3, 0.5)
    assert [n for _, _, n in phase_plan(ph3, 7)] == [1, 2, 4]  # round(1.4), round(2.1), 7 - 3
    assert [n for _, _, n in phase_plan(ph3, 11)] == [2, 3, 6]  # round(2.2), round(3.3), 11 - 5
    assert [n for _, _, n in phase_plan(_phases(1.0), 5)] == [5]
    assert phase_plan([], 5) == []
    for total in range(1, 30):
        assert sum(n for _, _, n in phase_plan(ph3, total)) == total
    assert phase_plan(ph3, 7, only="p1") == [(1, ph3[1], 2)]
    assert phase_plan(ph3, 7, only="p2") == [(2, ph3[2], 4)]
    with pytest.raises(ValueError, match=r"train\.only_phase"):
        phase_plan(ph3, 7, only="p9")


# --------------------------------------------------------------------------- sampler
def _take(s, n):
    return [s.next() for _ in range(n)]


def test_sampler_deterministic_and_seeded():
    assert _take(BatchSampler(20, 3, seed=5), 10) == _take(BatchSampler(20, 3, seed=5), 10)
    assert _take(BatchSampler(20, 3, seed=5), 10) != _take(BatchSampler(20, 3, seed=6), 10)


@pytest.mark.parametrize("n, bs", [(12, 3), (10, 3), (5, 8)])
def test_sampler_covers_every_index_once_per_epoch(n, bs):
    s = BatchSampler(n, bs, seed=1)
    stream = [i for b in _take(s, 4 * n) for i in b]
    assert all(len(b) == bs for b in _take(BatchSampler(n, bs, seed=1), 5))
    epochs = [stream[e * n : (e + 1) * n] for e in range(len(stream) // n)]
    assert len(epochs) >= 3
    for e in epochs:
        assert sorted(e) == list(range(n))
    assert epochs[0] != epochs[1]  # a fresh permutation per epoch


def test_sampler_state_round_trip():
    s = BatchSampler(10, 3, seed=2)
    _take(s, 4)  # mid-way through epoch 1
    state = s.state_dict()
    r = BatchSampler(10, 3, seed=2)
    r.load_state_dict(state)
    assert _take(r, 7) == _take(s, 7)


@pytest.mark.parametrize("n, bs, world", [(10, 2, 3), (16, 4, 2), (7, 3, 4)])
def test_sampler_ranks_partition_the_global_batch(n, bs, world):
    ranks = [BatchSampler(n, bs, seed=3, rank=r, world=world) for r in range(world)]
    single = BatchSampler(n, bs * world, seed=3)
    for _ in range(6):
        parts = [s.next() for s in ranks]
        assert all(len(p) == bs for p in parts)
        assert [i for p in parts for i in p] == single.next()


def test_sampler_rejects_empty():
    with pytest.raises(ValueError):
        BatchSampler(0, 4, seed=0)


def test_per_component_grad_norms_are_window_means_and_survive_resume(tmp_path):
    common = ["strategy.name=joint", "train.steps=4", "eval.splits=[]"]
    run.train_and_evaluate(tiny_cfg(tmp_path / "every", *common, "train.log_every=1"))
    run.train_and_evaluate(tiny_cfg(tmp_path / "window", *common, "train.log_every=4"))
    every = [r for r in step_lines(tmp_path / "every" / "metrics.jsonl") if "loss" in r]
    (window,) = [r for r in step_lines(tmp_path / "window" / "metrics.jsonl") if "loss" in r]
    for comp in ("generator", "query_encoder"):
        key = f"grad_norm/{comp}"
        assert all(r[key] > 0 for r in every)
        assert window[key] == pytest.approx(sum(r[key] for r in every) / 4, rel=1e-12)  # mean, not last
        assert window[key] != pytest.approx(every[-1][key])
    # a checkpoint in the middle of a window: the resumed run logs the same means
    with pytest.raises(KeyboardInterrupt):
        run.train_and_evaluate(
            tiny_cfg(tmp_path / "cut", *common, "train.log_every=4", "train.save_every=1", "debug.stop_after=2")
        )
    run.train_and_evaluate(tiny_cfg(tmp_path / "cut", *common, "train.log_every=4", "train.save_every=1"))
    assert step_lines(tmp_path / "cut" / "metrics.jsonl") == step_lines(tmp_path / "window" / "metrics.jsonl")


def test_grad_norms_match_clip_grad_norm_bitwise():
    from ragtune.trainer import grad_norms

    g = torch.Generator().manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(5, 3, generator=g)) for _ in range(3)]
    b = [torch.nn.Parameter(torch.randn(7, generator=g)), torch.nn.Parameter(torch.randn(2, 2, generator=g))]
    for p in a + b:
        p.grad = torch.randn(p.shape, generator=g) * 3
    opt = torch.optim.SGD([{"params": a, "name": "x"}, {"params": b, "name": "y"}], lr=0.1)
    total, per = grad_norms(opt)
    assert torch.equal(total, torch.nn.utils.get_total_norm([p.grad for p in a + b]))
    assert per["x"] == pytest.approx(float(torch.cat([p.grad.flatten() for p in a]).norm()), rel=1e-6)
    assert per["y"] == pytest.approx(float(torch.cat([p.grad.flatten() for p in b]).norm()), rel=1e-6)
    ref = [p.grad.clone() for p in a + b]
    torch.nn.utils.clip_grads_with_norm_(a + b, 1.0, total)
    ref_params = [torch.nn.Parameter(torch.zeros_like(r)) for r in ref]
    for p, r in zip(ref_params, ref):
        p.grad = r
    torch.nn.utils.clip_grad_norm_(ref_params, 1.0)
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(a + b, ref_params))
