"""A bf16 training step on the GPU: the trainer's own loop (`Trainer.fit`) on the tiny pipeline moved
to CUDA, `train.precision=bf16` (accelerate's autocast), the generator loaded in bf16.

What must hold: the matmuls of both trained components run in bf16 under the step's autocast, yet
every trained parameter stays a float32 master weight on the GPU and is updated, the frozen passage
tower is not touched, every logged loss is finite, and the ledger records GPU memory."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from ragtune import run
from ragtune.trainer import Trainer

from helpers import build, changed_components, component_modules, snapshot, tiny_cfg

pytestmark = pytest.mark.gpu


@pytest.fixture
def fresh_accelerator_state():
    """accelerate keeps one process-wide AcceleratorState and refuses a second mixed precision in
    the same process: cleared before this bf16 test and after it, so the tests around it (which use
    precision "no") and this one each get their own."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


def _first_linear(module: nn.Module) -> nn.Linear:
    return next(m for m in module.modules() if isinstance(m, nn.Linear))


def test_bf16_step_autocasts_keeps_float32_master_weights_and_a_finite_loss(tmp_path, device, fresh_accelerator_state):
    cfg = tiny_cfg(
        tmp_path / "r",
        "strategy.name=joint",
        "generator.dtype=bfloat16",
        "train.precision=bf16",
        "train.steps=2",
        "train.log_every=1",
        "eval.splits=[]",
    )
    data, m, ledger = build(cfg)
    acc = run._accelerator("bf16", cfg.train)
    assert acc.device.type == device.type, acc.device
    m = m.to(acc.device)
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, m, data.train, data.dev, Path(cfg.run_dir), acc)

    seen = set()  # (component, output dtype, device type) of one matmul per trained tower, under grad

    def recorder(name):
        def hook(module, inputs, output):
            if torch.is_grad_enabled():
                seen.add((name, output.dtype, output.device.type))

        return hook

    hooks = [
        _first_linear(m.generator.model).register_forward_hook(recorder("generator")),
        _first_linear(m.retriever.query_encoder).register_forward_hook(recorder("query_encoder")),
    ]
    before = snapshot(m)
    try:
        trainer.fit()
    finally:
        for h in hooks:
            h.remove()

    rows = [json.loads(ln) for ln in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses), losses
    assert ("generator", torch.bfloat16, device.type) in seen, seen  # autocast lowered the matmuls
    assert ("query_encoder", torch.bfloat16, device.type) in seen, seen
    mods = component_modules(m)
    for comp in ("generator", "query_encoder"):
        params = list(mods[comp].parameters())
        assert all(p.dtype == torch.float32 for p in params), {p.dtype for p in params}  # master weights
        assert all(p.device.type == device.type for p in params)
    changed = changed_components(before, snapshot(m))
    assert changed["generator"] and changed["query_encoder"], changed  # both were updated
    assert not changed["doc_encoder"], changed["doc_encoder"]  # frozen
    if device.type == "cuda":
        assert ledger.totals()["peak_memory_bytes"]["gpu"] > 0
