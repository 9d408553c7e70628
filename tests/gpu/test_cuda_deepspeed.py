"""DeepSpeed ZeRO-2 and ZeRO-3 on one GPU: `ragtune train configs/tiny.yaml train.distributed=deepspeed
train.deepspeed_config=configs/deepspeed/zero{2,3}.json train.precision=bf16` launched by torchrun
with one process, `two_phase` (two phases, each with a frozen component, so each builds and destroys
an engine), then the dev evaluation (ZeRO-3: parameters gathered).

ragtune refuses to train when the backend that started is not the one requested (exit 2), so exit 0
already says DeepSpeed ran; the engine's own checkpoint says which ZeRO stage and that bf16 was on,
the ledger that the run was on the GPU."""

from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from helpers import ROOT, TINY, cache_dir

pytestmark = pytest.mark.gpu

STEPS = 4


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_on_one_gpu_trains_in_bf16_and_checkpoints_its_stage(tmp_path, device, stage):
    import deepspeed  # noqa: F401 - installed by the check (extra `deepspeed`); missing is a failure

    run_dir = tmp_path / "r"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1" if device.type == "cpu" else "4"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    cmd += ["-m", "ragtune.cli", "train", TINY, "strategy.name=two_phase", "train.distributed=deepspeed"]
    cmd += [f"train.deepspeed_config=configs/deepspeed/zero{stage}.json", "train.precision=bf16"]
    cmd += [f"train.steps={STEPS}", "train.log_every=1", "eval.splits=[dev]"]
    cmd += [f"data.cache_dir={cache_dir()}", f"run_dir={run_dir}"]
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, f"exit {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"

    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "ok" and result["steps"] == STEPS
    assert isinstance(result["dev"]["em"], float)
    cost = result["cost"]
    if device.type == "cuda":
        assert cost["device"] == torch.cuda.get_device_name(0)
        assert cost["peak_memory_bytes"]["gpu"] > 0
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses), losses

    last = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    assert last["opt"] is None  # the optimizer state is the engine's, in its own checkpoint
    tag = last["trainer"]["engine"]
    shards = glob.glob(str(run_dir / "checkpoints" / "engine" / tag / "*optim_states.pt"))
    assert len(shards) == 1, shards  # one rank, one optimizer partition
    optim = torch.load(shards[0], map_location="cpu", weights_only=False)
    assert int(optim["optimizer_state_dict"]["zero_stage"]) == stage
    assert optim["ds_config"]["zero_optimization"]["stage"] == stage
    assert optim["ds_config"]["bf16"]["enabled"] is True  # train.precision=bf16 reached the engine
    assert optim["ds_config"]["train_micro_batch_size_per_gpu"] == 4  # filled from train.batch_size
