"""Strategy state across data-parallel ranks: every save (last.pt, final.pt) holds every rank's
`extra_state()` merged by `merge_extra_states`, and every rank loads that merged state at resume
and at `train.init_from`. A fake 2-rank gather in one process, then two real gloo processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from ragtune import checkpoint, run
from ragtune.strategy import Strategy

from helpers import ROOT, TINY, build, cache_dir, tiny_cfg

TOY = "strategy.name=rank_toy:RankToy"
OTHER = {"seen": {"train-99999": [1], "train-00000": [1]}}  # what the fake rank 1 saw


def _fake_two_ranks(monkeypatch, other=OTHER):
    monkeypatch.setattr(checkpoint, "_world_size", lambda: 2)
    monkeypatch.setattr(checkpoint, "_all_gather", lambda obj: [obj, other])


def test_merged_extra_state_uses_the_strategy_merge(monkeypatch):
    from rank_toy import RankToy  # tests/ is on sys.path (conftest)

    toy = RankToy()
    toy.seen = {"train-00000": [0], "train-00001": [0]}
    assert checkpoint.merged_extra_state(toy) == toy.extra_state()  # one process: its own state
    _fake_two_ranks(monkeypatch)
    merged = checkpoint.merged_extra_state(toy)["seen"]
    assert merged == {"train-00000": [0, 1], "train-00001": [0], "train-99999": [1]}

    class Plain(Strategy):
        def extra_state(self):
            return {"rank": 0}

    _fake_two_ranks(monkeypatch, {"rank": 1})
    assert checkpoint.merged_extra_state(Plain()) == {"rank": 0}  # the default keeps rank 0's


def test_saves_hold_the_merged_state_and_init_from_loads_it(tmp_path, monkeypatch):
    _fake_two_ranks(monkeypatch)
    res = run.train_and_evaluate(tiny_cfg(tmp_path / "a", TOY, "train.steps=2", "eval.splits=[]"))
    assert res["status"] == "ok"
    final = torch.load(tmp_path / "a" / "final.pt", weights_only=False)["strategy_extra"]["seen"]
    last = torch.load(tmp_path / "a" / "checkpoints" / "last.pt", weights_only=False)["strategy_extra"]["seen"]
    assert final == last and final["train-99999"] == [1] and final["train-00000"][-1] == 1
    assert sum(v == [0] for v in final.values()) >= 4  # this process's questions are there too
    monkeypatch.undo()
    _, m, _ = build(tiny_cfg(tmp_path / "b", TOY, f"train.init_from={tmp_path / 'a'}"))
    assert m.strategy.seen == final


def _torchrun(run_dir, loaded_dir, *extra):
    os.makedirs(loaded_dir, exist_ok=True)
    env = {**os.environ, "RANK_TOY_LOADED": str(loaded_dir), "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "ragtune.cli", "train", TINY, TOY, f"data.cache_dir={cache_dir()}", "train.steps=4"]
    cmd += ["train.save_every=2", "eval.splits=[]", *extra, f"run_dir={run_dir}"]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)


def _loaded(folder):
    """{rank: [state loaded, ...]} from the toy's load log."""
    return {r: [json.loads(ln) for ln in (folder / f"loaded.rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)}


@pytest.mark.slow
def test_two_real_ranks_save_the_union_and_both_load_it(tmp_path):
    run.load_data(tiny_cfg(tmp_path / "x").data)  # fill the data cache once, not from two processes
    cut = _torchrun(tmp_path / "b", tmp_path / "cut", "debug.stop_after=2", "diagnostics.grad_variance_every=1")
    assert cut.returncode != 0 and (tmp_path / "b" / "checkpoints" / "last.pt").exists(), cut.stderr[-2000:]
    ckpt = torch.load(tmp_path / "b" / "checkpoints" / "last.pt", weights_only=False)["strategy_extra"]["seen"]
    assert {r for v in ckpt.values() for r in v} == {0, 1}  # both ranks' questions
    rows = [json.loads(ln) for ln in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "grad_var_draws" in r] == [1, 2]  # the diagnostic ran on both ranks
    res = _torchrun(tmp_path / "b", tmp_path / "resume")
    assert res.returncode == 0, res.stderr[-2000:]
    loaded = _loaded(tmp_path / "resume")
    assert loaded[0] == loaded[1] == [ckpt]  # each rank restored the merged state, not its own share
    final = torch.load(tmp_path / "b" / "final.pt", weights_only=False)["strategy_extra"]["seen"]
    assert set(ckpt) < set(final) and {r for v in final.values() for r in v} == {0, 1}
    child = _torchrun(tmp_path / "c", tmp_path / "child", f"train.init_from={tmp_path / 'b'}", "train.steps=2")
    assert child.returncode == 0, child.stderr[-2000:]
    loaded = _loaded(tmp_path / "child")
    assert loaded[0] == loaded[1] == [final]
