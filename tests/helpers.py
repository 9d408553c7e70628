"""Shared helpers for the core tests: tiny configs, built pipelines, trainers, snapshots.

Everything runs on the tiny models of configs/tiny.yaml with a synthetic-data cache in a private
temporary folder (never ~/.cache), so the tests need no network and leave nothing behind.
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path
from typing import Dict, List, Tuple

import torch

from ragtune import run
from ragtune.config import load_config
from ragtune.ledger import Ledger
from ragtune.strategy import StepContext
from ragtune.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
TIME_KEYS = ("seconds", "seconds_by_component", "wall_seconds", "peak_memory_bytes", "device_hours")

_CACHE: List[str] = []


def cache_dir() -> str:
    """One synthetic-data cache per test process (removed at exit)."""
    if not _CACHE:
        d = tempfile.mkdtemp(prefix="ragtune-test-cache-")
        atexit.register(shutil.rmtree, d, True)
        _CACHE.append(d)
    return _CACHE[0]


def tiny_cfg(run_dir, *overrides: str):
    """configs/tiny.yaml + overrides, with the private data cache and the given run_dir."""
    return load_config([TINY], [f"data.cache_dir={cache_dir()}", *overrides, f"run_dir={run_dir}"])


def build(cfg) -> Tuple[object, object, Ledger]:
    """(data, pipeline, ledger) exactly as `ragtune train` builds them (seeded the same way)."""
    run.seed_everything(cfg.train.seed, cfg.train.threads)
    ledger = Ledger("test-cpu")
    data = run.load_data(cfg.data)
    m = run.build_pipeline(cfg, data, ledger)
    return data, m, ledger


def make_trainer(cfg, data, m) -> Trainer:
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    return Trainer(cfg, m, data.train, data.dev, Path(cfg.run_dir), run._accelerator("no"))


def component_modules(m) -> Dict[str, torch.nn.Module]:
    """The built-in components and the strategy's parts, by component name."""
    return m.component_modules()


def step_ctx(m, phase: str = "", step: int = 0, k: int = 0) -> StepContext:
    """A StepContext for calling a strategy directly: the named phase (default: the first one)."""
    phases = m.strategy.phases()
    ph = next(p for p in phases if p.name == phase) if phase else (phases[0] if phases else None)
    return StepContext(ph, step, step, 0, {}, k or 2)


def snapshot(m) -> Dict[str, Dict[str, torch.Tensor]]:
    """{component: {param name: detached clone}}."""
    return {c: {n: p.detach().clone() for n, p in mod.named_parameters()} for c, mod in component_modules(m).items()}


def changed_components(before, after) -> Dict[str, List[str]]:
    """{component: names of parameters that are not bit-identical}."""
    out = {}
    for c in before:
        assert before[c].keys() == after[c].keys()
        out[c] = [n for n in before[c] if not torch.equal(before[c][n], after[c][n])]
    return out


def step_lines(metrics_path) -> List[dict]:
    """metrics.jsonl rows without wall-clock fields ('time', evaluation '...seconds...')."""
    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if k != "time" and "seconds" not in k} for r in rows]


def deterministic_cost(cost: dict) -> dict:
    """result.json's cost minus everything that measures time or memory."""
    return {k: v for k, v in cost.items() if k not in TIME_KEYS and "seconds" not in k}


def timeless(scores: dict) -> dict:
    """Evaluation scores without the wall-clock ones (seconds per question)."""
    return {k: v for k, v in scores.items() if "seconds" not in k}


def load_json(path) -> dict:
    return json.loads(Path(path).read_text())


def final_weights(run_dir) -> Dict[str, torch.Tensor]:
    return torch.load(Path(run_dir) / "final.pt", map_location="cpu", weights_only=False)["weights"]


def assert_same_tensors(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, f"tensors differ: {bad[:5]}"
