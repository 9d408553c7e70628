"""Grid expansion for one strategy of an experiment: which runs, in which stages, with which lrs.

What: a strategy is searched over the learning rates of the components it trains (the union of
its declared phases' `trains`; "strategy" only if it has parameters). One phase, or
`search: product` -> one stage, the cartesian product over its components (2-D for two). Several
phases training disjoint components -> one stage per phase: phase i runs alone
(`train.only_phase`) from the best phase i-1 run on dev (`train.init_from`), so a two-phase
strategy costs |grid_1| + |grid_2| runs instead of |grid_1| x |grid_2|. Nothing trained -> one run.
Why here and not in a strategy: phases come from the strategy's own `phases()` declaration, so
a new strategy gets the right search without touching the runner.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean
from typing import Dict, List, Optional, Sequence, Tuple

from ragtune.config import load_config, strategy_options

Lrs = Tuple[Tuple[str, float], ...]   # sorted (component, lr) pairs


@dataclass(frozen=True)
class RunSpec:
    """One `ragtune train` run of the grid."""
    strategy: str
    stage: int
    phase: str                        # the phase run alone, or "all"
    lrs: Lrs                          # searched lrs of this run and its ancestors
    seed: int
    run_dir: str
    overrides: Tuple[str, ...]        # everything after the base configs
    parent: str = ""                  # run dir of the phase this run starts from ("" = none)

    @property
    def point(self) -> str:
        return " ".join(f"{c}={v:g}" for c, v in self.lrs) or "-"


@dataclass
class StrategyPlan:
    name: str
    stages: List[Tuple[str, List[str]]]   # (phase name or "all", components searched there)
    grid: Dict[str, List[float]]          # component -> lrs searched
    phasewise: bool
    base_overrides: List[str] = field(default_factory=list)

    def describe(self) -> str:
        """How this strategy is searched, e.g. 'phase-wise: generator(generator: 2) -> retriever(query_encoder: 2)'."""
        if not self.grid:
            return "one run (nothing trained)"
        part = lambda cs: " x ".join(f"{c}: {len(self.grid[c])}" for c in cs) or "-"
        if self.phasewise:
            return "phase-wise: " + " -> ".join(f"{p}({part(cs)})" for p, cs in self.stages)
        return f"product({part(self.stages[0][1])})"

    def n_runs(self, n_seeds: int) -> int:
        return n_seeds * sum(len(points(self.grid, comps)) for _, comps in self.stages)


def points(grid: Dict[str, List[float]], comps: Sequence[str]) -> List[Lrs]:
    """Cartesian product of the lrs of `comps` (one empty point when there is nothing to search)."""
    return [tuple(zip(comps, vals)) for vals in itertools.product(*(grid[c] for c in comps))]


def trained_components(strategy) -> List[List[str]]:
    """Per declared phase, the components it really trains (no "strategy" without parameters)."""
    has_params = any(True for _ in strategy.parameters())
    return [sorted(c for c in p.trains if c != "strategy" or has_params) for p in strategy.phases()]


def make_plan(spec, name: str) -> StrategyPlan:
    """Build the strategy with the experiment's settings and derive its search from phases()."""
    from ragtune.strategies import get_strategy

    base_overrides = list(spec.overrides) + [f"strategy.name={name}"] + list(spec.strategy_overrides.get(name, []))
    cfg = load_config(list(spec.base), base_overrides + ["run_dir=."])
    cls = get_strategy(name)
    strategy = cls(strategy_options(cfg, cls.Options), cfg)
    phases = strategy.phases()
    per_phase = trained_components(strategy)
    comps = sorted({c for cs in per_phase for c in cs})
    grids = spec.grids
    grid = {c: list(grids.get(name, {}).get(c) or grids.get("default", {}).get(c) or [float(cfg.train.lr[c])])
            for c in comps}
    flat = [c for cs in per_phase for c in cs]
    phasewise = spec.search == "phasewise" and len(phases) > 1 and len(flat) == len(set(flat))
    stages = [(p.name, cs) for p, cs in zip(phases, per_phase)] if phasewise else [("all", comps)]
    return StrategyPlan(name, stages, grid, phasewise, base_overrides)


def run_dir(out: Path, name: str, phase: str, lrs: Lrs, seed: int) -> str:
    """OUT/runs/<strategy>/<phase|all>/lr-<comp>=<v>_..._seed-<s>: stable, so a re-run finds it."""
    parts = [f"lr-{c}={v:g}" for c, v in lrs] + [f"seed-{seed}"]
    return str(Path(out) / "runs" / name / phase / "_".join(parts))


def stage_runs(plan: StrategyPlan, stage: int, seeds: Sequence[int], out: Path,
               parents: Optional[Dict[int, "RunSpec"]] = None) -> List[RunSpec]:
    """The runs of one stage; for stage > 0, `parents` maps seed -> the selected previous-stage run."""
    phase, comps = plan.stages[stage]
    runs = []
    for pt in points(plan.grid, comps):
        for seed in seeds:
            parent = parents[seed] if parents else None
            lrs = tuple(sorted((parent.lrs if parent else ()) + pt))
            d = run_dir(out, plan.name, phase, lrs, seed)
            ov = list(plan.base_overrides) + [f"train.lr.{c}={v!r}" for c, v in lrs] + [f"train.seed={seed}"]
            if plan.phasewise:
                ov.append(f"train.only_phase={phase}")
            if parent:
                ov.append(f"train.init_from={parent.run_dir}")
            ov += ["eval.splits=[dev]", f"run_dir={d}"]
            runs.append(RunSpec(plan.name, stage, phase, lrs, seed, d, tuple(ov), parent.run_dir if parent else ""))
    return runs


def select(runs: Sequence[RunSpec], score: Dict[str, Optional[float]], higher_is_better: bool
           ) -> Optional[List[RunSpec]]:
    """Best grid point: mean of `score[run_dir]` over its seeds; a point with a failed seed is out.
    Ties go to the earlier point (grid order), so selection is deterministic. None if no point is ok."""
    by_point: Dict[Lrs, List[RunSpec]] = {}
    for r in runs:
        by_point.setdefault(r.lrs, []).append(r)
    best, best_val = None, None
    for group in by_point.values():
        vals = [score.get(r.run_dir) for r in group]
        if any(v is None for v in vals):
            continue
        m = mean(vals)
        if best_val is None or (m > best_val if higher_is_better else m < best_val):
            best, best_val = group, m
    return best
