"""`ragtune experiment EXPERIMENT.yaml [out=DIR] [key=value...]`: grid search, selection, leaderboards.

What: expands each strategy's learning-rate grid (ragtune.exp_grid), runs every point as a
`ragtune train` subprocess through a launcher (local or Ray), selects the best point per
strategy on dev, evaluates only the selected runs on test, and writes OUT/experiment.yaml,
runs.csv, leaderboard.csv, leaderboard.md and selected.json. Runs go in stages so phase-wise
searches can start phase 2 from the best phase-1 run; within a stage all strategies' runs go
to the launcher together. Re-running skips finished runs (a result.json that is ok or diverged)
and re-launches the others (killed, or failed), which resume from their checkpoints. A crashed
or diverged run is recorded with its reason and the grid goes on.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

from omegaconf import OmegaConf

from ragtune.config import load_config
from ragtune.exp_grid import RunSpec, StrategyPlan, make_plan, points, select, stage_runs
from ragtune.exp_runs import RunRecord, chained_cost, log_tail, read_record
from ragtune.exp_spec import load_experiment, strategy_names
from ragtune.launchers import Job, make_launcher, ragtune_cmd
from ragtune.leaderboard import summarize, write_csv, write_leaderboard
from ragtune.metrics import get_metric

USAGE = "usage: ragtune experiment EXPERIMENT.yaml [out=DIR] [key=value...]"


class _Stop(Exception):
    """The launch limit (a testing hook) was reached."""


def main_experiment(args: List[str]) -> int:
    files = [a for a in args if "=" not in a]
    if len(files) != 1:
        print(USAGE, file=sys.stderr)
        return 2
    spec = load_experiment(files[0], [a for a in args if "=" in a])
    return run_experiment(spec)


def output_dir(spec) -> Path:
    return Path(spec.out or Path("results") / spec.name).resolve()


def run_experiment(spec, launcher=None, limit: Optional[int] = None,
                   echo: Callable[[str], None] = lambda s: print(s, flush=True)) -> int:
    """Run (or resume) the experiment. Returns 0, 1 if some strategy has no result, 130 if stopped."""
    out = output_dir(spec)
    names = strategy_names(spec)
    plans = {n: make_plan(spec, n) for n in names}
    out.mkdir(parents=True, exist_ok=True)
    (out / "experiment.yaml").write_text(OmegaConf.to_yaml(spec))
    own = launcher is None
    launcher = launcher or make_launcher(spec)
    ex = Runner(spec, plans, out, launcher, limit, echo)
    try:
        ex.search()
        ex.evaluate_selected()
    except (KeyboardInterrupt, _Stop) as e:
        ex.write_runs()
        echo(f"stopped ({type(e).__name__}); re-run the same command to resume: finished runs are kept")
        return 130
    finally:
        if own:
            launcher.close()
    rows = ex.write_outputs()
    echo((out / "leaderboard.md").read_text())
    echo(f"results in {out}")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


class Runner:
    def __init__(self, spec, plans: Dict[str, StrategyPlan], out: Path, launcher, limit, echo):
        self.spec, self.plans, self.out, self.launcher = spec, plans, out, launcher
        self.limit, self.echo, self.launched = limit, echo, 0
        self.records: Dict[str, RunRecord] = {}
        self.selected: Dict[str, Optional[List[RunRecord]]] = {}
        self.test_errors: Dict[str, str] = {}
        self.metric = spec.select.metric
        self.higher = get_metric(self.metric).higher_is_better
        self.total = sum(p.n_runs(len(spec.seeds)) for p in plans.values())
        self.done, self.t0 = 0, time.time()

    # ---- grid search in stages -------------------------------------------------------------
    def search(self) -> None:
        seeds = list(self.spec.seeds)
        alive, stage = list(self.plans), 0
        while alive:
            wave: List[RunSpec] = []
            for name in list(alive):
                plan = self.plans[name]
                if stage >= len(plan.stages):
                    alive.remove(name)
                    self.selected[name] = self._best(name, stage - 1)
                    continue
                parents = None
                if stage > 0:
                    best = self._best(name, stage - 1)
                    if best is None:
                        alive.remove(name)
                        self.selected[name] = None
                        self.total -= len(seeds) * sum(len(points(plan.grid, c)) for _, c in plan.stages[stage:])
                        self.echo(f"{name}: no successful {plan.stages[stage - 1][0]} run on every seed; "
                                  "later phases are skipped")
                        continue
                    parents = {r.spec.seed: r.spec for r in best}
                wave += stage_runs(plan, stage, seeds, self.out, parents)
            if wave:
                self.run_wave(wave)
            stage += 1

    def _best(self, name: str, stage: int) -> Optional[List[RunRecord]]:
        recs = [r for r in self.records.values() if r.spec.strategy == name and r.spec.stage == stage]
        best = select([r.spec for r in recs], {r.spec.run_dir: r.score("dev", self.metric) for r in recs}, self.higher)
        return [self.records[s.run_dir] for s in best] if best else None

    def run_wave(self, specs: List[RunSpec]) -> None:
        jobs, by_key = [], {}
        for s in specs:
            cfg = load_config(list(self.spec.base), list(s.overrides))   # bad override: exit 2 before any compute
            rec = read_record(s)
            self.records[s.run_dir] = rec
            self._warn_stale(s, cfg)
            if rec.finished:
                self._progress(rec, None)
                continue
            job = Job(s.run_dir, ragtune_cmd("train", *self.spec.base, *s.overrides), str(Path(s.run_dir) / "log.txt"))
            jobs.append(job)
            by_key[job.key] = s
        stop = self.limit is not None and len(jobs) > self.limit - self.launched
        if stop:
            jobs = jobs[: max(0, self.limit - self.launched)]
        self.launched += len(jobs)

        def on_done(job: Job, rc: int, secs: float) -> None:
            rec = read_record(by_key[job.key], rc)
            self.records[job.key] = rec
            self._progress(rec, secs)

        try:
            self.launcher.run(jobs, on_done)
        except KeyboardInterrupt:
            for key, s in by_key.items():
                rec = read_record(s)
                if rec.result is None and (Path(key) / "log.txt").exists():
                    rec = RunRecord(s, "interrupted", "stopped before result.json; a re-run resumes it", None)
                self.records[key] = rec
            raise
        if stop:
            raise _Stop()

    def _warn_stale(self, s: RunSpec, cfg) -> None:
        path = Path(s.run_dir) / "config.yaml"
        if not path.exists():
            return
        old = _flat(OmegaConf.to_container(OmegaConf.load(path), resolve=True))
        new = _flat(OmegaConf.to_container(cfg, resolve=True))
        diff = sorted(k for k in set(old) & set(new) if old[k] != new[k])   # keys new to the schema are not a change
        if diff:
            self.echo(f"warning: {s.run_dir} was started with a different config ({', '.join(diff[:5])}); "
                      "its existing state is used: delete it or use another out= to redo it")

    def _progress(self, rec: RunRecord, secs: Optional[float]) -> None:
        self.done += 1
        s = rec.spec
        dev = rec.score("dev", self.metric)
        status = rec.status + (" (done before)" if secs is None else "")
        line = (f"[{self.done:>{len(str(self.total))}}/{self.total}] {s.strategy:<12} {s.phase:<10} {s.point} "
                f"seed={s.seed}  {status}  dev {self.metric} {'–' if dev is None else f'{dev:.3f}'}"
                f"  {'' if secs is None else f'{secs:.1f}s'}  (total {time.time() - self.t0:.0f}s)")
        if rec.status != "ok" and rec.reason:
            line += f"\n      reason: {rec.reason}"
        self.echo(line)

    # ---- test evaluation of the selected runs only -----------------------------------------
    def evaluate_selected(self) -> None:
        """One job per launcher slot, each evaluating a share of the selected runs in one process."""
        if "test" not in self.spec.report:
            return
        todo = [(name, Path(rec.spec.run_dir)) for name, sel in self.selected.items() for rec in sel or []
                if not _fresh_scores(Path(rec.spec.run_dir), "test")]
        width = max(1, min(len(todo), getattr(self.launcher, "width", 1)))
        groups = [todo[i::width] for i in range(width)] if todo else []
        logs = self.out / "logs"
        jobs = [Job(f"test-eval-{i}", [sys.executable, "-m", "ragtune.exp_eval", "test", *(str(d) for _, d in g)],
                    str(logs / f"test-eval-{i}.txt")) for i, g in enumerate(groups)]
        by_key = {j.key: g for j, g in zip(jobs, groups)}

        def on_done(job: Job, rc: int, secs: float) -> None:
            for name, d in by_key[job.key]:
                ok = _fresh_scores(d, "test")
                if not ok:
                    self.test_errors[name] = f"test evaluation of {d} failed (exit {rc}): {log_tail(Path(job.log))}"
                self.echo(f"[test] {name:<12} {d.name}: {'ok' if ok else 'failed'}  ({secs:.1f}s for {len(by_key[job.key])})")

        self.launcher.run(jobs, on_done)

    # ---- outputs -------------------------------------------------------------------------------
    def write_runs(self) -> None:
        chosen = {d for sel in self.selected.values() for r in sel or [] for d in _chain(r, self.records)}
        rows = []
        for rec in self.records.values():
            s, cost = rec.spec, rec.cost() or {}
            row = {"strategy": s.strategy, "stage": s.stage, "phase": s.phase, "point": s.point, "seed": s.seed,
                   "status": rec.status, "reason": rec.reason, "selected": s.run_dir in chosen}
            row.update({f"lr_{c}": v for c, v in s.lrs})
            for split in ("dev",):
                for k, v in ((rec.result or {}).get(split) or {}).items():
                    if isinstance(v, (int, float)) and k != "n" and "/" not in k:
                        row[f"{split}_{k}"] = v
            row.update({k: v for k, v in cost.items() if k != "device"})
            row.update(device=cost.get("device", ""), run_dir=s.run_dir, parent=s.parent)
            rows.append(row)
        if rows:
            write_csv(self.out / "runs.csv", rows)

    def write_outputs(self) -> List[dict]:
        self.write_runs()
        sp = self.spec
        rows, selected = [], {}
        for name, plan in self.plans.items():
            recs = [r for r in self.records.values() if r.spec.strategy == name]
            failed = [r for r in recs if r.status != "ok"]
            sel = self.selected.get(name)
            runs = []
            for rec in sel or []:
                scores = {"dev": (rec.result or {}).get("dev")}
                tpath = Path(rec.spec.run_dir) / "scores.json"
                if "test" in sp.report and tpath.exists():
                    scores["test"] = json.loads(tpath.read_text()).get("test")
                runs.append({"dir": rec.spec.run_dir, "scores": scores, "cost": chained_cost(rec, self.records)})
            status, reason = "ok", ""
            if not sel:
                status, reason = "failed", f"no grid point finished on every seed ({len(failed)}/{len(recs)} runs failed)"
            elif name in self.test_errors:
                status, reason = "failed", self.test_errors[name]
            lrs = dict(sel[0].spec.lrs) if sel else {}
            rows.append(summarize(name, lrs, runs, [r.cost() for r in recs], len(recs), len(failed), list(sp.report),
                                  sp.bootstrap.samples, sp.bootstrap.seed, status, reason))
            rows[-1]["search"] = plan.describe()
            selected[name] = {"status": status, "lrs": lrs, "runs": [r["dir"] for r in runs],
                              "chain": [_chain(r, self.records) for r in sel or []],
                              f"dev_{self.metric}": rows[-1].get(f"dev_{self.metric}_mean")}
        write_leaderboard(self.out, rows, sp.name, list(sp.report), self.metric, list(sp.seeds),
                          {"samples": sp.bootstrap.samples, "seed": sp.bootstrap.seed}, sp.launcher)
        (self.out / "selected.json").write_text(json.dumps({"experiment": sp.name, "metric": self.metric,
                                                            "strategies": selected}, indent=2, default=float))
        return rows


def _chain(rec: RunRecord, records: Dict[str, RunRecord]) -> List[str]:
    """The run and the runs it started from, first phase first."""
    out, d = [], rec.spec.run_dir
    while d and d not in out:
        out.append(d)
        d = records[d].spec.parent if d in records else ""
    return out[::-1]


def _fresh_scores(d: Path, split: str) -> bool:
    """scores.json holds `split` and is newer than result.json (a re-trained run is re-evaluated)."""
    s, r = d / "scores.json", d / "result.json"
    if not s.exists() or not r.exists() or s.stat().st_mtime < r.stat().st_mtime:
        return False
    try:
        return bool(json.loads(s.read_text()).get(split))
    except ValueError:
        return False


def _flat(d, prefix: str = "") -> Dict[str, object]:
    out: Dict[str, object] = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
