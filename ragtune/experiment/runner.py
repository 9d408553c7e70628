"""The experiment runner: grid search in stages, selection on dev, test of the selected runs.

What: `run_experiment(spec)` expands each strategy's learning-rate grid (experiment.grid), runs
every point as a `ragtune train` subprocess through a launcher (local or Ray), selects the best
point per strategy on dev, evaluates only the selected runs on test (`ragtune eval DIR...
eval.splits=[test]`, one process per launcher slot), and writes OUT/experiment.yaml, runs.csv,
leaderboard.csv, leaderboard.md and selected.json. Runs go in stages so phase-wise searches can
start phase 2 from the best phase-1 run; within a stage all strategies' runs go to the launcher
together. Re-running skips finished runs (a result that is ok or diverged) and re-launches
the others (killed, or failed), which resume from their checkpoints. A crashed or diverged run
is recorded with its reason and the grid goes on. Progress: experiment.progress.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

from omegaconf import OmegaConf

from ragtune import fileio, rundir
from ragtune.config import load_config
from ragtune.experiment.grid import RunSpec, StrategyPlan, make_plan, select, stage_runs
from ragtune.experiment.launchers import Job, make_launcher, ragtune_cmd
from ragtune.experiment.leaderboard import summarize, write_csv, write_leaderboard
from ragtune.experiment.progress import Progress, fmt_duration
from ragtune.experiment.records import RunRecord, chained_cost, read_record
from ragtune.experiment.spec import metric_direction, strategy_names


def output_dir(spec) -> Path:
    return Path(spec.out or Path("results") / spec.name).resolve()


def run_experiment(spec, launcher=None, echo: Optional[Callable[[str], None]] = None) -> int:
    """Run (or resume) the experiment. Returns 0, 1 if some strategy has no result, 130 if stopped.
    `echo`: where lines go (default: the terminal, with a live status line when it is a TTY)."""
    out = output_dir(spec)
    names = strategy_names(spec)
    plans = {n: make_plan(spec, n) for n in names}
    out.mkdir(parents=True, exist_ok=True)
    fileio.write_text(out / "experiment.yaml", OmegaConf.to_yaml(spec))
    own = launcher is None
    launcher = launcher or make_launcher(spec)
    progress = Progress(sum(p.n_runs(len(spec.seeds)) for p in plans.values()), getattr(launcher, "width", 1), echo)
    ex = Runner(spec, plans, out, launcher, progress)
    try:
        ex.search()
        ex.evaluate_selected()
    except KeyboardInterrupt:
        ex.write_runs()
        progress.line("stopped; re-run the same command to resume: finished runs are kept")
        return rundir.EXIT["interrupted"]
    finally:
        if own:
            launcher.close()
    rows = ex.write_outputs()
    progress.line((out / "leaderboard.md").read_text())
    progress.line(f"results in {out}")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


class Runner:
    def __init__(self, spec, plans: Dict[str, StrategyPlan], out: Path, launcher, progress: Progress):
        self.spec, self.plans, self.out, self.launcher, self.progress = spec, plans, out, launcher, progress
        self.records: Dict[str, RunRecord] = {}
        self.selected: Dict[str, Optional[List[RunRecord]]] = {}
        self.test_errors: Dict[str, str] = {}
        self.metric = spec.select.metric
        self.higher = metric_direction(self.metric, spec.select.higher_is_better)

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
                        self.progress.skip(plan.n_runs(len(seeds), stage))
                        self.progress.line(
                            f"{name}: no successful {plan.stages[stage - 1].phase} run on every "
                            "seed; later phases are skipped"
                        )
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

    poll_seconds = 1.0  # how often a run that is running elsewhere is checked

    def run_wave(self, specs: List[RunSpec]) -> None:
        jobs, by_key = [], {}
        for s in specs:
            cfg = load_config(list(self.spec.base), list(s.overrides))  # bad override: exit 2 before any compute
            rec = read_record(s)
            self.records[s.run_dir] = rec
            self._warn_stale(s, cfg)
            if rec.finished:
                self._progress(rec, None)
                continue
            job = Job(s.run_dir, ragtune_cmd("train", *self.spec.base, *s.overrides), str(rundir.log_path(s.run_dir)))
            jobs.append(job)
            by_key[job.key] = s

        def on_done(job: Job, rc: int, secs: float) -> None:
            rec = read_record(by_key[job.key], rc)
            self.records[job.key] = rec
            self._progress(rec, secs)

        try:
            with self.progress.watching({k: _label(s) for k, s in by_key.items()}):
                self.launcher.run(jobs, on_done)
        except KeyboardInterrupt:
            for key, s in by_key.items():
                rec = read_record(s)
                if rec.result is None and rundir.log_path(key).exists():
                    rec = RunRecord(s, "interrupted", f"stopped before {rundir.RESULT}; a re-run resumes it", None)
                self.records[key] = rec
            raise
        busy = [s for s in by_key.values() if self.records[s.run_dir].status == "busy"]
        if busy:  # another process (a second runner, an orphaned trainer) trains them: wait, then pick up
            self.progress.line(
                f"{len(busy)} run(s) running elsewhere; waiting for them: " + ", ".join(_label(s) for s in busy)
            )
            while any(rundir.lock(s.run_dir).held_elsewhere() for s in busy):
                time.sleep(self.poll_seconds)
            self.progress.unfinish(len(busy))
            self.run_wave(busy)  # finished there: read back; else resumed here from its checkpoint

    def _warn_stale(self, s: RunSpec, cfg) -> None:
        saved = rundir.read_config(s.run_dir)
        if saved is None:
            return
        old = _flat(OmegaConf.to_container(saved, resolve=True))
        new = _flat(OmegaConf.to_container(cfg, resolve=True))
        diff = sorted(k for k in set(old) & set(new) if old[k] != new[k])  # keys new to the schema are not a change
        if diff:
            self.progress.line(
                f"warning: {s.run_dir} was started with a different config ({', '.join(diff[:5])}); "
                "its existing state is used: delete it or use another out= to redo it"
            )

    def _progress(self, rec: RunRecord, secs: Optional[float]) -> None:
        p = self.progress
        p.finished(secs, rec.spec.run_dir)
        dev = rec.score("dev", self.metric)
        status = rec.status + (" (done before)" if secs is None else "")
        line = (
            f"[{p.counter()}] {_label(rec.spec, pad=True)}  {status}  dev {self.metric} "
            f"{'–' if dev is None else f'{dev:.3f}'}  {'' if secs is None else f'{secs:.1f}s'}  "
            f"(total {fmt_duration(p.elapsed())}, ETA {fmt_duration(p.eta())})"
        )
        if rec.status != "ok" and rec.reason:
            line += f"\n      reason: {rec.reason}"
        p.line(line)

    # ---- test evaluation of the selected runs only -----------------------------------------
    def evaluate_selected(self) -> None:
        """One job per launcher slot, each evaluating a share of the selected runs in one process."""
        if "test" not in self.spec.report:
            return
        todo = [
            (name, rec.spec.run_dir)
            for name, sel in self.selected.items()
            for rec in sel or []
            if not rundir.scores_fresh(rec.spec.run_dir, "test")
        ]
        width = max(1, min(len(todo), getattr(self.launcher, "width", 1)))
        groups = [todo[i::width] for i in range(width)] if todo else []
        logs = self.out / "logs"
        jobs = [
            Job(
                f"test-eval-{i}",
                ragtune_cmd("eval", *(d for _, d in g), "eval.splits=[test]"),
                str(logs / f"test-eval-{i}.txt"),
            )
            for i, g in enumerate(groups)
        ]
        by_key = {j.key: g for j, g in zip(jobs, groups)}

        def on_done(job: Job, rc: int, secs: float) -> None:
            for name, d in by_key[job.key]:
                ok = rundir.scores_fresh(d, "test")
                if not ok:
                    self.test_errors[name] = f"test evaluation of {d} failed (exit {rc}): {rundir.text_tail(job.log)}"
                self.progress.line(
                    f"[test] {name:<12} {Path(d).name}: {'ok' if ok else 'failed'}  "
                    f"({secs:.1f}s for {len(by_key[job.key])})"
                )

        self.launcher.run(jobs, on_done)

    # ---- outputs -------------------------------------------------------------------------------
    def write_runs(self) -> None:
        chosen = {
            str(d) for sel in self.selected.values() for r in sel or [] for d in rundir.init_chain(r.spec.run_dir)
        }
        rows = []
        for rec in self.records.values():
            s, cost = rec.spec, rec.cost() or {}
            row = {
                "strategy": s.strategy,
                "stage": s.stage,
                "phase": s.phase,
                "point": s.point,
                "seed": s.seed,
                "status": rec.status,
                "reason": rec.reason,
                "selected": s.run_dir in chosen,
            }
            row.update({f"lr_{c}": v for c, v in s.lrs})
            for k, v in ((rec.result or {}).get("dev") or {}).items():
                if isinstance(v, (int, float)) and k != "n" and "/" not in k:
                    row[f"dev_{k}"] = v
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
                d = rec.spec.run_dir
                scores = {"dev": (rec.result or {}).get("dev")}
                if "test" in sp.report and rundir.scores_fresh(d, "test"):
                    scores["test"] = rundir.read_scores(d).get("test")
                runs.append({"dir": d, "scores": scores, "cost": chained_cost(d)})
            status, reason = "ok", ""
            if not sel:
                status, reason = (
                    "failed",
                    f"no grid point finished on every seed ({len(failed)}/{len(recs)} runs failed)",
                )
            elif name in self.test_errors:
                status, reason = "failed", self.test_errors[name]
            lrs = dict(sel[0].spec.lrs) if sel else {}
            rows.append(
                summarize(
                    name,
                    lrs,
                    runs,
                    [r.cost() for r in recs],
                    len(recs),
                    len(failed),
                    list(sp.report),
                    sp.bootstrap.samples,
                    sp.bootstrap.seed,
                    status,
                    reason,
                )
            )
            rows[-1]["search"] = plan.describe()
            selected[name] = {
                "status": status,
                "lrs": lrs,
                "runs": [r["dir"] for r in runs],
                "chain": [[str(x) for x in rundir.init_chain(r.spec.run_dir)] for r in sel or []],
                f"dev_{self.metric}": rows[-1].get(f"dev_{self.metric}_mean"),
            }
        write_leaderboard(
            self.out,
            rows,
            sp.name,
            list(sp.report),
            self.metric,
            list(sp.seeds),
            {"samples": sp.bootstrap.samples, "seed": sp.bootstrap.seed},
            sp.launcher,
            self.higher,
        )
        fileio.write_json(
            self.out / "selected.json", {"experiment": sp.name, "metric": self.metric, "strategies": selected}
        )
        return rows


def _label(s: RunSpec, pad: bool = False) -> str:
    """'joint all generator=0.001 query_encoder=3e-05 seed=0' (columns aligned with pad=True)."""
    if pad:
        return f"{s.strategy:<12} {s.phase:<10} {s.point} seed={s.seed}"
    return f"{s.strategy} {s.phase} {s.point} seed={s.seed}"


def _flat(d, prefix: str = "") -> Dict[str, object]:
    out: Dict[str, object] = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
