"""The strategy lifecycle through the real trainer, with the out-of-tree toy strategy.

setup -> restore -> on_phase_start(resumed) -> loss / on_step_end, owned parts charged and
checkpointed under their own names, LossSum normalised exactly, per-phase optimiser settings,
a `kill -9` mid-training resumed bit-identical, strict restore.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from ragtune import run
from ragtune.components import BUILTIN_COMPONENTS
from ragtune.strategies import REGISTRY
from ragtune.trainer import phase_settings

from helpers import (
    ROOT,
    TINY,
    assert_same_tensors,
    build,
    cache_dir,
    deterministic_cost,
    final_weights,
    make_trainer,  # noqa: F401
    snapshot,
    step_lines,
    timeless,
    tiny_cfg,
)

TOY = "strategy.name=toy_strategy:PolyakToy"


def test_toy_trains_and_charges_its_own_components(tmp_path):
    res = run.train_and_evaluate(tiny_cfg(tmp_path, TOY, "train.steps=3"))
    assert res["status"] == "ok", res.get("reason")
    by_comp = res["cost"]["flops_by_component"]
    assert by_comp["posterior"]["train"] > 0  # the owned tower, under its own name
    assert by_comp["target"]["score"] > 0 and "train" not in by_comp["target"]
    assert "train" not in by_comp.get("query_encoder", {})  # never charged as the production tower
    w = final_weights(tmp_path)
    assert any(k.startswith("strategy.posterior.") for k in w) and any(k.startswith("strategy.target.") for k in w)
    final = torch.load(tmp_path / "final.pt", weights_only=False)
    assert final["strategy_extra"]["updates"] == 3 and final["strategy_extra"]["cache"]
    for split in ("dev", "test"):  # its own predict: its metric is averaged, its retrieved ids scored
        assert res[split]["toy_rounds"] == 1.0 and res[split]["errors"] == 0
        assert res[split]["retrieved_per_question"] == 2.0  # ctx.k = eval.k or train.k = 2 (tiny.yaml)


def test_hook_order_and_resumed_flag(tmp_path, monkeypatch, pinned_tokenizers):
    from toy_strategy import PolyakToy

    events = []
    for hook in ("setup", "on_phase_start", "on_step_end"):
        real = getattr(PolyakToy, hook)

        def wrapped(self, *a, _real=real, _hook=hook):
            events.append((_hook, a[-1] if _hook == "on_phase_start" else None))
            return _real(self, *a)

        monkeypatch.setattr(PolyakToy, hook, wrapped)
    common = [TOY, "train.steps=4", "train.save_every=1", "eval.splits=[]"]
    with pytest.raises(KeyboardInterrupt):
        run.train_and_evaluate(tiny_cfg(tmp_path, *common, "debug.stop_after=2"))
    assert events == [("setup", None), ("on_phase_start", False), ("on_step_end", None), ("on_step_end", None)]
    events.clear()
    run.train_and_evaluate(tiny_cfg(tmp_path, *common))
    assert events == [("setup", None), ("on_phase_start", True), ("on_step_end", None), ("on_step_end", None)]


def test_loss_sum_accumulation_equals_one_large_batch(tmp_path):
    """LossSum (sum over answer tokens): 2 x 4 accumulated == 1 x 8, to float precision."""
    common = [TOY, "train.steps=1", "train.clip_norm=0", "train.schedule=constant", "train.log_every=1"]
    cfg = tiny_cfg(tmp_path / "big", *common, "train.batch_size=8")
    data, m, _ = build(cfg)
    init = {k: v.clone() for k, v in m.state_dict().items()}

    def one_step(sub, bs, accum):
        c = tiny_cfg(tmp_path / sub, *common, f"train.batch_size={bs}", f"train.grad_accum={accum}")
        m.load_state_dict(init)
        make_trainer(c, data, m).fit()
        return snapshot(m), step_lines(tmp_path / sub / "metrics.jsonl")[-1]

    big, log_big = one_step("big", 8, 1)
    acc, log_acc = one_step("acc", 4, 2)
    half, _ = one_step("half", 4, 1)
    for comp in ("posterior", "generator"):
        for n in big[comp]:
            assert torch.allclose(acc[comp][n], big[comp][n], rtol=0, atol=1e-6), f"{comp}.{n}"
    assert math.isclose(log_acc["loss"], log_big["loss"], rel_tol=1e-6)
    diff = max(float((half[c][n] - big[c][n]).abs().max()) for c in ("posterior", "generator") for n in big[c])
    assert diff > 1e-5  # negative control: half the batch is a different step


def test_phase_settings_resolution(tmp_path):
    from toy_strategy import PolyakToy

    s = PolyakToy()
    cfg = tiny_cfg(tmp_path, TOY, "train.lr.query_encoder=0.002", "train.weight_decay=0.1")
    got = phase_settings(cfg.train, s, s.phases()[0])
    assert got["lr"] == {"posterior": 0.002, "generator": cfg.train.lr.generator}  # part: its family's rate
    assert got["weight_decay"] == 0.1 and got["betas"] == [0.9, 0.999]
    cfg = tiny_cfg(
        tmp_path,
        TOY,
        "train.lr.posterior=0.3",
        "train.phase.main.lr.generator=0.04",
        "train.phase.main.weight_decay=0.2",
        "train.phase.main.betas=[0.8,0.9]",
    )
    got = phase_settings(cfg.train, s, s.phases()[0])
    assert got["lr"] == {"posterior": 0.3, "generator": 0.04}
    assert got["weight_decay"] == 0.2 and got["betas"] == [0.8, 0.9]


def test_per_phase_lr_reaches_the_optimizer(tmp_path):
    cfg = tiny_cfg(
        tmp_path,
        "strategy.name=two_phase",
        "train.steps=4",
        "train.schedule=constant",
        "train.lr.generator=0.01",
        "train.phase.retriever.lr.query_encoder=0.003",
        "train.log_every=1",
    )
    data, m, _ = build(cfg)
    make_trainer(cfg, data, m).fit()
    rows = [r for r in step_lines(tmp_path / "metrics.jsonl") if "loss" in r]
    assert [r.get("lr/generator") for r in rows[:2]] == [0.01, 0.01]
    assert [r.get("lr/query_encoder") for r in rows[2:]] == [0.003, 0.003]


def test_fused_adamw_matches_the_per_tensor_loop(tmp_path):
    common = ["strategy.name=joint", "train.steps=3", "train.log_every=1", "eval.splits=[]"]
    a = run.train_and_evaluate(tiny_cfg(tmp_path / "a", *common, "train.adamw_impl=auto"))
    b = run.train_and_evaluate(tiny_cfg(tmp_path / "b", *common, "train.adamw_impl=for_loop"))
    assert a["status"] == b["status"] == "ok"
    la, lb = step_lines(tmp_path / "a" / "metrics.jsonl"), step_lines(tmp_path / "b" / "metrics.jsonl")
    for x, y in zip(la, lb):
        assert math.isclose(x["loss"], y["loss"], rel_tol=1e-5)
    wa, wb = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_restore_is_strict(tmp_path, pinned_tokenizers):
    common = [TOY, "train.steps=4", "train.save_every=1", "eval.splits=[]"]
    with pytest.raises(KeyboardInterrupt):
        run.train_and_evaluate(tiny_cfg(tmp_path, *common, "debug.stop_after=2"))
    path = tmp_path / "checkpoints" / "last.pt"
    state = torch.load(path, weights_only=False)
    key = next(k for k in state["weights"] if k.startswith("strategy.target."))
    del state["weights"][key]
    torch.save(state, path)
    with pytest.raises(ValueError, match="lacks 1 weights"):
        run.train_and_evaluate(tiny_cfg(tmp_path, *common))


def _cli(run_dir, *extra):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    cmd = [
        sys.executable,
        "-m",
        "ragtune.cli",
        "train",
        TINY,
        TOY,
        f"data.cache_dir={cache_dir()}",
        "train.steps=8",
        "train.save_every=2",
        "train.log_every=1",
        "train.threads=1",
        *extra,
        f"run_dir={run_dir}",
    ]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.mark.slow
def test_kill_9_mid_training_resumes_bit_identical(tmp_path):
    """A real SIGKILL after the step-4 checkpoint; the resumed run equals an undisturbed one."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert _cli(a).wait(timeout=300) == 0
    proc = _cli(b, "debug.step_sleep=0.5")
    deadline = time.time() + 240
    while time.time() < deadline:
        lines = step_lines(b / "metrics.jsonl") if (b / "metrics.jsonl").exists() else []
        if any(r.get("step", 0) >= 5 for r in lines):
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (b / "result.json").exists() and (b / "checkpoints" / "last.pt").exists()
    assert _cli(b).wait(timeout=300) == 0
    ra, rb = (json.loads((d / "result.json").read_text()) for d in (a, b))
    assert ra["status"] == rb["status"] == "ok"
    assert_same_tensors(final_weights(a), final_weights(b))
    fa, fb = (torch.load(d / "final.pt", weights_only=False)["strategy_extra"] for d in (a, b))
    assert fa == fb and fa["updates"] == 8
    assert step_lines(a / "metrics.jsonl") == step_lines(b / "metrics.jsonl")
    assert deterministic_cost(ra["cost"]) == deterministic_cost(rb["cost"])
    assert timeless(ra["test"]) == timeless(rb["test"])


def test_non_finite_weight_from_a_hook_is_diverged_and_never_saved(tmp_path, monkeypatch):
    from toy_strategy import PolyakToy

    def poison(self, rag, ctx):
        if ctx.step == 2:
            with torch.no_grad():
                next(self.target.parameters()).fill_(float("inf"))

    monkeypatch.setattr(PolyakToy, "on_step_end", poison)
    res = run.train_and_evaluate(tiny_cfg(tmp_path, TOY, "train.steps=4", "train.save_every=1"))
    assert res["status"] == "diverged" and "strategy.target." in res["reason"] and "step 2" in res["reason"]
    assert not (tmp_path / "final.pt").exists() and res["test"] is None
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=False)
    assert state["step"] == 1 and all(
        torch.isfinite(v).all() for v in state["weights"].values() if v.is_floating_point()
    )


@pytest.mark.parametrize("name", sorted(set(REGISTRY) - {"none"}) + ["toy_strategy:PolyakToy"])
def test_huge_learning_rate_is_diverged_with_finite_saved_weights(tmp_path, name):
    lrs = [f"train.lr.{c}=1e30" for c in BUILTIN_COMPONENTS]
    res = run.train_and_evaluate(
        tiny_cfg(tmp_path, f"strategy.name={name}", "train.steps=4", "train.save_every=1", *lrs)
    )
    assert res["status"] == "diverged", res
    assert not (tmp_path / "final.pt").exists()
    ckpt = tmp_path / "checkpoints" / "last.pt"
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        assert all(torch.isfinite(v).all() for v in state["weights"].values() if v.is_floating_point())
