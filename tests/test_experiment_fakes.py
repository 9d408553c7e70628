"""Test helpers (no tests here): a launcher that fakes runs, and experiment files for tmp dirs.

`FakeLauncher` writes what `ragtune train` / `python -m ragtune.exp_eval` would write (result.json
with dev scores and a cost ledger, predictions files, scores.json) from a formula of the run's
learning rates, so grid expansion, selection, phase-wise search, resume and cost accounting can
be tested in milliseconds without training anything.
"""
from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
N_QUESTIONS = 100
RUN_FLOPS = {"train": 100, "score": 0, "generate": 0, "index": 10, "eval": 5, "total_train": 110, "total": 115}


def default_score(lrs: dict, seed: int) -> float:
    """Higher generator and query-encoder lrs are better, so the best point is never the first."""
    return 0.1 + 100 * lrs.get("generator", 0) + 1000 * lrs.get("query_encoder", 0) + 0.001 * seed


def write_experiment(tmp_path: Path, **fields) -> Path:
    spec = {"name": "t", "base": [str(ROOT / "configs" / "tiny.yaml")], "overrides": ["train.steps=2"],
            "strategies": "all", "seeds": [0],
            "grids": {"default": {"query_encoder": [1e-5, 3e-5], "generator": [1e-3, 3e-3]}},
            "out": str(tmp_path / "out")}
    spec.update(fields)
    path = tmp_path / "exp.yaml"
    OmegaConf.save(OmegaConf.create(spec), path)
    return path


def _overrides(cmd):
    return dict(a.split("=", 1) for a in cmd[3:] if "=" in a)


class FakeLauncher:
    def __init__(self, score=default_score, crash=lambda ov: None):
        """crash(overrides) -> None, "kill" (no result.json, like SIGKILL) or "error" (status failed)."""
        self.score, self.crash = score, crash
        self.launched = []          # job keys in launch order

    def close(self):
        pass

    def run(self, jobs, on_done):
        for job in jobs:
            self.launched.append(job.key)
            on_done(job, self._eval(job) if "ragtune.exp_eval" in job.cmd else self._train(job), 0.01)

    width = 1

    def _train(self, job) -> int:
        ov = _overrides(job.cmd)
        d = Path(ov["run_dir"])
        d.mkdir(parents=True, exist_ok=True)
        lrs = {k.split(".")[-1]: float(v) for k, v in ov.items() if k.startswith("train.lr.")}
        seed = int(ov.get("train.seed", 0))
        crash = self.crash(ov)
        if crash == "kill" or crash is True:       # died without result.json
            Path(job.log).write_text("loading\nTraceback (most recent call last):\nRuntimeError: boom\n")
            return 1
        cost = {"flops": dict(RUN_FLOPS), "wall_seconds": {"total": 2.0}, "device_hours": 0.001,
                "peak_memory_bytes": {"cpu": 2**20, "gpu": 0}, "device": "fake device"}
        res = {"strategy": ov["strategy.name"], "status": "ok", "reason": "", "lr": lrs, "seed": seed,
               "run_dir": str(d), "test": None, "cost": cost, "overrides": ov}
        if crash == "error":                        # the core caught an exception: result.json says failed
            res.update(status="failed", reason="RuntimeError: boom", dev=None)
            (d / "result.json").write_text(json.dumps(res))
            return 1
        if any(v >= 1e5 for v in lrs.values()):
            res.update(status="diverged", reason="non-finite loss (nan) at step 1", dev=None)
            (d / "result.json").write_text(json.dumps(res))
            return 3
        em = self.score(lrs, seed)
        res["dev"] = _scores(em)
        _predictions(d / "predictions_dev.jsonl", em, "dev")
        (d / "result.json").write_text(json.dumps(res))
        return 0

    def _eval(self, job) -> int:
        for d in map(Path, job.cmd[4:]):
            res = json.loads((d / "result.json").read_text())
            em = res["dev"]["em"] - 0.05
            _predictions(d / "predictions.jsonl", em, "test")
            (d / "scores.json").write_text(json.dumps({"test": _scores(em)}))
        return 0


def _scores(em: float) -> dict:
    k = round(em * N_QUESTIONS)
    return {"em": k / N_QUESTIONS, "f1": k / N_QUESTIONS, "n": N_QUESTIONS, "normalization": "squad_v1.1",
            "recall@1": 0.5}


def _predictions(path: Path, em: float, split: str) -> None:
    k = round(em * N_QUESTIONS)
    with open(path, "w") as f:
        for i in range(N_QUESTIONS):
            v = float(i < k)
            f.write(json.dumps({"id": f"{split}-{i}", "prediction": "x", "em": v, "f1": v}) + "\n")
