"""Collect-then-learn and example phases in the shared trainer (with tests/toy_collect.py).

Collection runs without grad once per `updates` optimizer steps and its experience is split into
updates x grad_accum micro-batches in order; accumulation inside a collection equals one large
micro-batch; checkpoints fall on collection boundaries and a run stopped anywhere resumes
bit-identical (weights, log lines, ledger); an example phase is built once, deterministically,
resumed with its own sampler, and its rebuild on resume is not charged twice.
"""

from __future__ import annotations

import math

import pytest
import torch

from ragtune import run
from ragtune.config import ConfigError
from ragtune.strategy import Phase, Strategy

from helpers import (
    assert_same_tensors,
    build,
    deterministic_cost,
    final_weights,
    make_trainer,
    snapshot,
    step_lines,
    tiny_cfg,
)

TOY = "strategy.name=toy_collect:CollectToy"
COMMON = [TOY, "eval.splits=[]", "train.log_every=1", "train.schedule=constant", "train.clip_norm=0"]


@pytest.fixture(autouse=True)
def _fresh_calls():
    from toy_collect import CollectToy

    CollectToy.calls = []
    yield CollectToy.calls


def test_collect_once_per_updates_and_micro_batches_in_order(tmp_path, _fresh_calls):
    cfg = tiny_cfg(tmp_path, *COMMON, "train.steps=8", "train.grad_accum=2", "strategy.updates=2")
    data, m, _ = build(cfg)
    make_trainer(cfg, data, m).fit()
    calls = _fresh_calls
    assert calls[0] == ("build", len(data.train), False)  # examples built once, without grad
    collects = [c for c in calls if c[0] == "collect"]
    # rl: 4 steps, one collection per 2 steps, each over grad_accum x batch_size questions, no grad
    assert collects == [("collect", 0, 8, False), ("collect", 2, 8, False)]
    rl_losses = [c for c in calls if c[0] == "loss" and c[1] == "rl"]
    # 8 items -> updates (2) x grad_accum (2) micro-batches of 2, the steps of one collection share it
    assert [(c[2], c[3]) for c in rl_losses] == [(0, 2), (0, 2), (1, 2), (1, 2), (2, 2), (2, 2), (3, 2), (3, 2)]
    sft = [c for c in calls if c[0] == "loss" and c[1] == "sft"]
    assert len(sft) == 4 * 2 and all(c[3] == 4 for c in sft)
    rows = [r for r in step_lines(tmp_path / "metrics.jsonl") if r.get("phase") == "rl"]
    assert len(rows) == 4 and all("collect/weight" in r for r in rows)


@pytest.mark.parametrize("phase", ["sft", "rl"])
def test_accumulation_equals_one_micro_batch(tmp_path, phase):
    """One step of grad_accum 2 x batch 4 == grad_accum 1 x batch 8: over examples (sft), and over one
    collection (rl, updates=1: the same questions, the same random weights)."""
    common = [*COMMON, "train.steps=2", "strategy.updates=1", f"train.only_phase={phase}"]
    cfg = tiny_cfg(tmp_path / "big", *common, "train.batch_size=8")
    data, m, _ = build(cfg)
    init = {k: v.clone() for k, v in m.state_dict().items()}

    def fit(sub, bs, accum):
        m.load_state_dict(init)
        torch.manual_seed(0)
        make_trainer(
            tiny_cfg(tmp_path / sub, *common, f"train.batch_size={bs}", f"train.grad_accum={accum}"), data, m
        ).fit()
        return snapshot(m)["generator"], step_lines(tmp_path / sub / "metrics.jsonl")[-1]

    big, log_big = fit("big", 8, 1)
    acc, log_acc = fit("acc", 4, 2)
    for n in big:
        assert torch.allclose(acc[n], big[n], rtol=0, atol=1e-6), n
    assert math.isclose(log_acc["loss"], log_big["loss"], rel_tol=1e-6)
    if phase == "rl":
        assert log_acc["collect/weight"] == pytest.approx(log_big["collect/weight"], abs=1e-7)


@pytest.mark.parametrize("stop", [3, 5, 6])  # inside the example phase, mid-collection, on a boundary
def test_stopped_anywhere_resumes_bit_identical(tmp_path, stop):
    common = [*COMMON, "train.steps=8", "train.save_every=1", "strategy.updates=2"]
    a, b = tmp_path / "a", tmp_path / "b"
    ra = run.train_and_evaluate(tiny_cfg(a, *common))
    with pytest.raises(KeyboardInterrupt):
        run.train_and_evaluate(tiny_cfg(b, *common, f"debug.stop_after={stop}"))
    last = torch.load(b / "checkpoints" / "last.pt", weights_only=False)
    if last["phase_idx"] == 1:  # the rl phase (steps 5-8): only boundaries are saved
        assert last["phase_step"] % 2 == 0
    # stop=5 stops after the first step of a collection: the checkpoint is the boundary before it
    assert last["step"] == {3: 3, 5: 4, 6: 6}[stop]
    rb = run.train_and_evaluate(tiny_cfg(b, *common))
    assert ra["status"] == rb["status"] == "ok"
    assert_same_tensors(final_weights(a), final_weights(b))
    assert step_lines(a / "metrics.jsonl") == step_lines(b / "metrics.jsonl")
    # the examples rebuilt on resume are not charged twice
    assert deterministic_cost(ra["cost"]) == deterministic_cost(rb["cost"])


def test_declaration_errors():
    class Bad(Strategy):
        name = "bad"

        def __init__(self, phases):
            super().__init__()
            self._p = phases

        def phases(self):
            return self._p

    with pytest.raises(ValueError, match="updates=2"):
        Bad([Phase("p", frozenset({"generator"}), updates=2)]).check_declaration()
    with pytest.raises(ValueError, match="updates=0"):
        Bad([Phase("p", frozenset({"generator"}), collect=True, updates=0)]).check_declaration()
    with pytest.raises(ValueError, match="cannot both"):
        Bad([Phase("p", frozenset({"generator"}), collect=True, examples=True)]).check_declaration()
    Bad([Phase("p", frozenset({"generator"}), collect=True, updates=3)]).check_declaration()


def test_too_little_experience_and_diagnostics_are_errors(tmp_path):
    cfg = tiny_cfg(
        tmp_path / "a", *COMMON, "train.steps=4", "strategy.updates=2", "train.grad_accum=4", "train.batch_size=1"
    )
    data, m, _ = build(cfg)
    with pytest.raises(ValueError, match="collected 4 items for 8 micro-batches"):
        make_trainer(cfg, data, m).fit()
    cfg = tiny_cfg(tmp_path / "b", *COMMON, "train.steps=4", "diagnostics.grad_variance_every=1")
    with pytest.raises(ConfigError, match="diagnostics.grad_variance_every"):
        make_trainer(cfg, data, m)  # at construction: before any phase trains
    # rl_retriever: its reader phase could replay fixed batches, its rl phase (collected) cannot
    cfg = tiny_cfg(tmp_path / "c", "strategy.name=rl_retriever", "train.steps=4", "diagnostics.grad_variance_every=1")
    data, m, _ = build(cfg)
    with pytest.raises(ConfigError, match="phase 'rl' of 'rl_retriever'"):
        make_trainer(cfg, data, m)
