"""Grid expansion for one strategy of an experiment: which runs, in which stages, with which lrs.

What: a strategy is searched over the learning-rate axes its phases declare
(`Strategy.grid_axes(phase)`: built-in components, a strategy's own parts counted in their
family). One phase, or `search: product` -> one stage ("all"): the cartesian product over the
components, each value set for every phase that trains the component. Several phases (phase-wise
search, the default) -> one stage per phase: phase i runs alone (`train.only_phase`) from the best
phase i-1 run on dev (`train.init_from`), so a two-phase strategy costs |grid_1| + |grid_2| runs
instead of |grid_1| x |grid_2| - also when two phases train the same component, because every
value is set per phase (`train.phase.<phase>.lr.<component>`). An axis is named after its
component, or `<phase>.<component>` when another phase of the stage plan trains that component
too; the names key RunSpec.lrs, the run directories and the lr columns of runs.csv and the
leaderboard. Nothing trained -> one run.
Values of an axis, the first found: grids.<strategy>.<phase>.<component> (phase-wise axes and
single-phase strategies only), grids.<strategy>.<component>, grids.default.<phase>.<component>,
grids.default.<component>, else the learning rate the run would use anyway (one value; none if
the phases disagree, and then the axis is not set at all).
Why here and not in a strategy: phases come from the strategy's declaration, built from its
options alone (no model, no parameter), so a new strategy gets the right search for free.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean
from typing import Dict, List, Optional, Sequence, Tuple

from omegaconf import OmegaConf

from ragtune.config import ConfigError, load_config, strategy_options
from ragtune.experiment.spec import base_strategy, check_metric_computed, dir_name, variant_overrides

Lrs = Tuple[Tuple[str, float], ...]  # sorted (axis name, lr) pairs


@dataclass(frozen=True)
class Axis:
    """One learning rate searched: `component`'s rate in `phases`, over `values`."""

    name: str
    component: str
    phases: Tuple[str, ...]
    values: Tuple[float, ...]

    def overrides(self, lr: float) -> List[str]:
        return [f"train.phase.{p}.lr.{self.component}={lr!r}" for p in self.phases]


@dataclass(frozen=True)
class Stage:
    phase: str  # the phase run alone, or "all"
    axes: Tuple[Axis, ...]

    def points(self) -> List[Lrs]:
        """Cartesian product of the axes (one empty point when there is nothing to search)."""
        return [
            tuple(zip((a.name for a in self.axes), vals)) for vals in itertools.product(*(a.values for a in self.axes))
        ]


@dataclass(frozen=True)
class RunSpec:
    """One `ragtune train` run of the grid."""

    strategy: str
    stage: int
    phase: str  # the phase run alone, or "all"
    lrs: Lrs  # searched lrs of this run and its ancestors
    seed: int
    run_dir: str
    overrides: Tuple[str, ...]  # everything after the base configs
    parent: str = ""  # run dir of the phase this run starts from ("" = none)

    @property
    def point(self) -> str:
        return " ".join(f"{c}={v:g}" for c, v in self.lrs) or "-"


@dataclass
class StrategyPlan:
    name: str
    stages: List[Stage]
    phasewise: bool
    base_overrides: List[str] = field(default_factory=list)

    @property
    def axes(self) -> Dict[str, Axis]:
        return {a.name: a for st in self.stages for a in st.axes}

    def describe(self) -> str:
        """How this strategy is searched, e.g. 'phase-wise: generator(generator: 2) -> retriever(query_encoder: 2)'."""
        if not self.axes:
            return "one run (nothing searched)"
        part = lambda st: " x ".join(f"{a.name}: {len(a.values)}" for a in st.axes) or "-"
        if self.phasewise:
            return "phase-wise: " + " -> ".join(f"{st.phase}({part(st)})" for st in self.stages)
        return f"product({part(self.stages[0])})"

    def n_runs(self, n_seeds: int, first_stage: int = 0) -> int:
        return n_seeds * sum(len(st.points()) for st in self.stages[first_stage:])


def make_plan(spec, name: str) -> StrategyPlan:
    """Build the strategy from the experiment's options and derive its search from its phases."""
    from ragtune.strategies import get_strategy

    base = base_strategy(spec, name)
    base_overrides = (
        list(spec.overrides)
        + [f"strategy.name={base}"]
        + variant_overrides(spec, name)
        + list(spec.strategy_overrides.get(name, []))
    )
    cfg = load_config(list(spec.base), base_overrides + ["run_dir=."])
    check_metric_computed(spec.select.metric, cfg.eval.recall_k)
    cls = get_strategy(base)
    strategy = cls(strategy_options(cfg, cls.Options))
    phases = strategy.phases()
    _check_phase_keys(spec, name, [p.name for p in phases])
    per_phase = {p.name: strategy.grid_axes(p) for p in phases}
    phasewise = spec.search == "phasewise" and len(phases) > 1
    if phasewise:
        counts: Dict[str, int] = {}
        for comps in per_phase.values():
            for c in comps:
                counts[c] = counts.get(c, 0) + 1
        stages = []
        for p in phases:
            axes = [_axis(spec, name, cfg, [p], c, c if counts[c] == 1 else f"{p.name}.{c}") for c in per_phase[p.name]]
            stages.append(Stage(p.name, tuple(a for a in axes if a)))
    else:
        comps = sorted({c for cs in per_phase.values() for c in cs})
        axes = [_axis(spec, name, cfg, [p for p in phases if c in per_phase[p.name]], c, c) for c in comps]
        stages = [Stage("all", tuple(a for a in axes if a))]
    return StrategyPlan(name, stages, phasewise, base_overrides)


def _check_phase_keys(spec, name: str, phase_names: List[str]) -> None:
    for key, val in (spec.grids.get(name) or {}).items():
        if isinstance(val, dict) and key not in phase_names:
            raise ConfigError(
                f"experiment key 'grids.{name}.{key}': not a phase of '{name}' ({', '.join(phase_names) or 'none'})"
            )


def _axis(spec, name: str, cfg, phases, comp: str, axis_name: str) -> Optional[Axis]:
    """The axis of `comp` in `phases`, its values from the grids or, failing that, the config."""
    one = phases[0].name if len(phases) == 1 else None
    values = None
    for key in dict.fromkeys((name, base_strategy(spec, name), "default")):
        grid = spec.grids.get(key) or {}
        phase_grid = grid.get(one) if one else None
        values = (phase_grid.get(comp) if isinstance(phase_grid, dict) else None) or (
            grid.get(comp) if not isinstance(grid.get(comp), dict) else None
        )
        if values:
            break
    if not values:
        lrs = {_current_lr(cfg, p, comp) for p in phases}
        if len(lrs) != 1 or None in lrs:
            return None
        values = list(lrs)
    return Axis(axis_name, comp, tuple(p.name for p in phases), tuple(float(v) for v in values))


def _current_lr(cfg, phase, comp: str) -> Optional[float]:
    """The rate a run would use for `comp` in `phase`: train.phase.<p>.lr, the strategy's phase
    default, else train.lr."""
    v = OmegaConf.select(cfg, f"train.phase.{phase.name}.lr.{comp}", default=None)
    if v is None:
        v = (dict(phase.optim or {}).get("lr") or {}).get(comp)
    if v is None:
        v = OmegaConf.select(cfg, f"train.lr.{comp}", default=None)
    return None if v is None else float(v)


def run_dir(out: Path, name: str, phase: str, lrs: Lrs, seed: int) -> str:
    """OUT/runs/<strategy>/<phase|all>/lr-<axis>=<v>_..._seed-<s>: stable, so a re-run finds it."""
    parts = [f"lr-{c}={v:g}" for c, v in lrs] + [f"seed-{seed}"]
    return str(Path(out) / "runs" / dir_name(name) / phase / "_".join(parts))


def stage_runs(
    plan: StrategyPlan, stage: int, seeds: Sequence[int], out: Path, parents: Optional[Dict[int, RunSpec]] = None
) -> List[RunSpec]:
    """The runs of one stage; for stage > 0, `parents` maps seed -> the selected previous-stage run."""
    st, axes = plan.stages[stage], plan.axes
    runs = []
    for pt in st.points():
        for seed in seeds:
            parent = parents[seed] if parents else None
            lrs = tuple(sorted((parent.lrs if parent else ()) + pt))
            d = run_dir(out, plan.name, st.phase, lrs, seed)
            ov = list(plan.base_overrides) + [o for a, v in lrs for o in axes[a].overrides(v)] + [f"train.seed={seed}"]
            if plan.phasewise:
                ov.append(f"train.only_phase={st.phase}")
            if parent:
                ov.append(f"train.init_from={parent.run_dir}")
            ov += ["eval.splits=[dev]", f"run_dir={d}"]
            runs.append(RunSpec(plan.name, stage, st.phase, lrs, seed, d, tuple(ov), parent.run_dir if parent else ""))
    return runs


def select(
    runs: Sequence[RunSpec], score: Dict[str, Optional[float]], higher_is_better: bool
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
