"""Test helpers (no tests here): a launcher that fakes runs, and experiment files for tmp dirs.

`FakeLauncher` writes what `ragtune train` / `ragtune eval` would write (config, result with dev
scores and a cost ledger, predictions, scores; through ragtune.rundir) from a formula of the
run's learning rates, so grid expansion, selection, phase-wise search, resume and cost
accounting can be tested in milliseconds without training anything. `limit=N` stops (as a
Ctrl-C would) when the N+1-th run is about to be launched.
"""

from __future__ import annotations

import re
from pathlib import Path

from omegaconf import OmegaConf

from ragtune import rundir

ROOT = Path(__file__).resolve().parents[2]
N_QUESTIONS = 100
RUN_FLOPS = {"train": 100, "score": 0, "generate": 0, "index": 10, "eval": 5, "total_train": 110, "total": 115}


def default_score(lrs: dict, seed: int) -> float:
    """Higher generator and query-encoder lrs are better, so the best point is never the first.
    `lrs`: {component: lr} (the last phase's value when several phases set one)."""
    return 0.1 + 100 * lrs.get("generator", 0) + 1000 * lrs.get("query_encoder", 0) + 0.001 * seed


def write_experiment(tmp_path: Path, **fields) -> Path:
    spec = {
        "name": "t",
        "base": [str(ROOT / "configs" / "tiny.yaml")],
        "overrides": ["train.steps=2"],
        "strategies": "all",
        "seeds": [0],
        "grids": {"default": {"query_encoder": [1e-5, 3e-5], "generator": [1e-3, 3e-3]}},
        "out": str(tmp_path / "out"),
    }
    spec.update(fields)
    path = tmp_path / "exp.yaml"
    OmegaConf.save(OmegaConf.create(spec), path)
    return path


def _is_override(a: str) -> bool:
    return bool(re.match(r"^[A-Za-z_][\w.]*=", a))  # paths may contain '=' too (grid run dirs do)


def overrides_of(cmd) -> dict:
    return dict(a.split("=", 1) for a in cmd[3:] if _is_override(a))


def phase_lrs(ov: dict) -> dict:
    """{(phase, component): lr} from `train.phase.<phase>.lr.<component>=v` overrides."""
    out = {}
    for k, v in ov.items():
        parts = k.split(".")
        if len(parts) == 5 and parts[:2] == ["train", "phase"] and parts[3] == "lr":
            out[(parts[2], parts[4])] = float(v)
    return out


class FakeLauncher:
    width = 1

    def __init__(self, score=default_score, crash=lambda ov: None, limit=None, phase_score=None):
        """crash(overrides) -> None, "kill" (no result, like SIGKILL) or "error" (status failed).
        phase_score(phase_lrs, seed), if given, replaces score({component: lr}, seed)."""
        self.score, self.crash, self.limit, self.phase_score = score, crash, limit, phase_score
        self.launched = []  # job keys in launch order

    def close(self):
        pass

    def run(self, jobs, on_done):
        for job in jobs:
            if self.limit is not None and len(self.launched) >= self.limit:
                raise KeyboardInterrupt("launch limit of the fake launcher")
            self.launched.append(job.key)
            on_done(job, self._eval(job) if job.cmd[3] == "eval" else self._train(job), 0.01)

    def _train(self, job) -> int:
        ov = overrides_of(job.cmd)
        d = Path(ov["run_dir"])
        d.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(
            OmegaConf.create(
                {"strategy": {"name": ov["strategy.name"]}, "train": {"init_from": ov.get("train.init_from", "")}}
            ),
            rundir.config_path(d),
        )
        by_phase = phase_lrs(ov)
        lrs = {c: v for (_, c), v in by_phase.items()}
        seed = int(ov.get("train.seed", 0))
        crash = self.crash(ov)
        if crash == "kill" or crash is True:  # died without a result
            Path(job.log).write_text("loading\nTraceback (most recent call last):\nRuntimeError: boom\n")
            return 1
        cost = {
            "flops": dict(RUN_FLOPS),
            "wall_seconds": {"total": 2.0},
            "device_hours": 0.001,
            "peak_memory_bytes": {"cpu": 2**20, "gpu": 0},
            "device": "fake device",
        }
        res = {
            "strategy": ov["strategy.name"],
            "status": "ok",
            "reason": "",
            "lr": lrs,
            "seed": seed,
            "run_dir": str(d),
            "test": None,
            "cost": cost,
            "overrides": ov,
        }
        if crash == "error":  # the core caught an exception: status failed
            res.update(status="failed", reason="RuntimeError: boom", dev=None)
            rundir.write_result(d, res)
            return 1
        if any(v >= 1e5 for v in lrs.values()):
            res.update(status="diverged", reason="non-finite loss (nan) at step 1", dev=None)
            rundir.write_result(d, res)
            return 3
        em = self.phase_score(by_phase, seed) if self.phase_score else self.score(lrs, seed)
        res["dev"] = _scores(em)
        rundir.write_predictions(d, "dev", _predictions(em, "dev"))
        rundir.write_result(d, res)
        return 0

    def _eval(self, job) -> int:
        dirs = [a for a in job.cmd[4:] if not _is_override(a)]
        assert "eval.splits=[test]" in job.cmd
        for d in dirs:
            em = rundir.read_result(d)["dev"]["em"] - 0.05
            rundir.write_predictions(d, "test", _predictions(em, "test"))
            rundir.write_scores(d, {"test": _scores(em)})
        return 0


def _scores(em: float) -> dict:
    k = round(em * N_QUESTIONS)
    return {
        "em": k / N_QUESTIONS,
        "f1": k / N_QUESTIONS,
        "n": N_QUESTIONS,
        "normalization": "squad_v1.1",
        "recall@1": 0.5,
    }


def _predictions(em: float, split: str):
    k = round(em * N_QUESTIONS)
    return [
        {"id": f"{split}-{i}", "prediction": "x", "em": float(i < k), "f1": float(i < k)} for i in range(N_QUESTIONS)
    ]
