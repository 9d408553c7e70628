"""Experiment definition (`experiments/*.yaml`): typed schema, loading and validation.

What: an experiment names base run configs, the strategies to compare (registered names or
import paths `module:Class`), seeds, learning-rate grids, how to select on dev and which splits
to report. Grids: `grids.<strategy or default>.<component>: [lrs]` searches that component
(a built-in one: query_encoder, doc_encoder, generator; a strategy's own parts share their
family's axis); `grids.<strategy or default>.<phase>: {<component>: [lrs]}` applies to that
phase only (phase-wise search of a strategy whose phases train the same component). The most
specific entry wins (see ragtune.experiment.grid). `variants.<name>: {strategy, overrides}` runs a
strategy with extra options under a name of its own (listed in `strategies`), e.g. a mode option
compared against the default mode: its own row, run directories and `grids.<name>` (else the
strategy's grid), so `ragtune compare --pair` can test the two. Why a dataclass through the one structured
loader (`ragtune.config.load_structured`): a misspelt key is an error naming the key (exit 2)
instead of a silently ignored setting that would make the comparison quietly wrong.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ragtune.components import BUILTIN_COMPONENTS
from ragtune.config import ConfigError, load_structured, parse_overrides, read_yaml


@dataclass
class Select:
    metric: str = "em"  # a score the evaluator emits (ragtune.metrics.METRICS) or a strategy reports
    split: str = "dev"  # selection is on dev only (test is read for the selected point)
    higher_is_better: Optional[bool] = None  # required for a strategy-reported metric; else from ragtune.metrics


@dataclass
class Variant:
    """A named variant of a strategy (`variants.<name>`): its own leaderboard row, grid
    (`grids.<name>`, falling back to `grids.<strategy>`) and run directories, e.g. a mode option."""

    strategy: str = MISSING  # a registered name or import path
    overrides: List[str] = field(default_factory=list)  # key=value applied to its runs


@dataclass
class Bootstrap:
    samples: int = 1000  # resamples over questions for the 95% confidence interval
    seed: int = 0


@dataclass
class RayOptions:
    address: str = ""  # "" = start a local Ray instance; else an existing cluster ("auto", ip:port)
    num_cpus: int = 0  # local instance size (0 = Ray's default: every core)
    cpus_per_run: float = 1.0
    gpus_per_run: float = -1.0  # -1 = 1 when the driver sees a GPU, else 0


@dataclass
class ExperimentSpec:
    name: str = MISSING
    base: List[str] = field(default_factory=lambda: ["configs/default.yaml"])
    overrides: List[str] = field(default_factory=list)  # applied to every run
    strategies: Any = "all"  # list of names / import paths, or "all"
    seeds: List[int] = field(default_factory=lambda: [0])
    select: Select = field(default_factory=Select)
    report: List[str] = field(default_factory=lambda: ["dev", "test"])
    launcher: str = "local"  # local | ray
    parallel: int = 0  # local: concurrent runs (0 = one per visible GPU, 1 on CPU)
    search: str = "phasewise"  # phasewise | product (full product even for phased strategies)
    grids: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # see the module docstring
    strategy_overrides: Dict[str, List[str]] = field(default_factory=dict)  # strategy -> extra key=value
    variants: Dict[str, Variant] = field(default_factory=dict)  # name -> a strategy with its own overrides
    bootstrap: Bootstrap = field(default_factory=Bootstrap)
    ray: RayOptions = field(default_factory=RayOptions)
    out: str = ""  # "" = results/<name>


def load_experiment(path: str, overrides: List[str] = ()) -> ExperimentSpec:
    """Schema <- YAML file <- `key=value` overrides; returns a validated ExperimentSpec."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"experiment file not found: {path}")
    loaded, over = read_yaml(p), parse_overrides(list(overrides))  # malformed, non-UTF-8, a list: exit 2
    try:
        raw = OmegaConf.merge(loaded, over)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{path}: {str(e).splitlines()[0]}") from e
    try:
        spec = load_structured(ExperimentSpec, raw, "")
    except ConfigError as e:
        raise ConfigError(f"{path}: {str(e).replace('config key', 'experiment key', 1)}") from e
    spec.base = [str(resolve_path(b, p)) for b in spec.base]
    validate(spec)
    return spec


def resolve_path(name: str, experiment_file: Path) -> Path:
    """A base config path: as given (relative to the cwd), else relative to the repository root
    (the experiment file's parent folder's parent, e.g. experiments/../configs/x.yaml)."""
    cand = Path(name).expanduser()
    if cand.is_absolute() or cand.exists():
        return cand.resolve() if cand.exists() else cand
    for root in (experiment_file.resolve().parent.parent, experiment_file.resolve().parent):
        if (root / cand).exists():
            return (root / cand).resolve()
    raise ConfigError(f"experiment key 'base': config file not found: {name}")


def strategy_names(spec) -> List[str]:
    """The strategies to run: the registry's names for `all`, else the list as given (validated;
    an import path `module:Class` is imported)."""
    from ragtune.strategies import REGISTRY, get_strategy

    raw = spec.strategies
    names = (
        list(REGISTRY)
        if isinstance(raw, str) and raw == "all"
        else ([raw] if isinstance(raw, str) else [str(s) for s in raw])
    )
    for n in names:
        try:
            get_strategy(base_strategy(spec, n))
        except ConfigError as e:
            where = f"variants.{n}.strategy" if n in spec.variants else "strategies"
            raise ConfigError(f"experiment key '{where}': {str(e).split(': ', 1)[-1]}") from e
    if not names or len(set(names)) != len(names):
        raise ConfigError("experiment key 'strategies': must be 'all' or a non-empty list without repeats")
    return names


def base_strategy(spec, name: str) -> str:
    """The strategy a name of the experiment runs: a variant's strategy, else the name itself."""
    return spec.variants[name].strategy if name in spec.variants else name


def variant_overrides(spec, name: str) -> List[str]:
    return list(spec.variants[name].overrides) if name in spec.variants else []


def dir_name(strategy: str) -> str:
    """A strategy name as a folder name (an import path's ':' and the like become '_')."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", strategy)


def reported_metrics() -> Dict[str, str]:
    """{metric name: strategy} for the per-question metrics registered strategies declare."""
    from ragtune.strategies import REGISTRY

    return {m: name for name, cls in REGISTRY.items() for m in getattr(cls, "reports", {}) or {}}


def metric_direction(metric: str, higher: Optional[bool] = None, key: str = "select.metric") -> bool:
    """True if higher is better for `metric`, which must be a score the evaluator emits (an entry of
    `ragtune.metrics.METRICS`, `recall@5` resolving to `recall@k`) or one a registered strategy
    reports (then `higher` must be given). Anything else is a ConfigError naming `key`: a
    selection metric no run reports would make every grid point "fail"."""
    from ragtune.metrics import METRICS, get_metric

    try:
        meta = get_metric(metric)
    except KeyError:
        meta = None
    if meta is not None and getattr(meta, "fn", True) is not None:
        if higher is not None and bool(higher) != meta.higher_is_better:
            raise ConfigError(
                f"experiment key 'select.higher_is_better': {metric} is "
                f"{'higher' if meta.higher_is_better else 'lower'}-is-better (ragtune.metrics)"
            )
        return meta.higher_is_better
    reported = reported_metrics()
    if metric in reported:
        if higher is None:
            raise ConfigError(
                f"experiment key 'select.higher_is_better': '{metric}' is reported by strategy "
                f"'{reported[metric]}'; say whether higher is better (true/false)"
            )
        return bool(higher)
    known = sorted(m for m, v in METRICS.items() if getattr(v, "fn", True) is not None)
    raise ConfigError(
        f"experiment key '{key}': '{metric}' is not a score runs report "
        f"(evaluator: {', '.join(known)}; strategies: {', '.join(sorted(reported)) or 'none'})"
    )


_AT_K = re.compile(r"^(?P<base>[a-z_]+)@(?P<k>\d+)$")


def check_metric_computed(metric: str, recall_k) -> None:
    """An `@k` selection metric must use a k the runs compute (`eval.recall_k` of the run config)."""
    m = _AT_K.match(metric)
    if m and int(m["k"]) not in list(recall_k):
        raise ConfigError(
            f"experiment key 'select.metric': {metric} is not computed: the runs' eval.recall_k is {list(recall_k)}"
        )


def validate(spec) -> None:
    """Value checks the types cannot express; each error names its key."""
    if not spec.name or "/" in spec.name:
        raise ConfigError(f"experiment key 'name': must be a non-empty folder name, got {spec.name!r}")
    if spec.launcher not in ("local", "ray"):
        raise ConfigError(f"experiment key 'launcher': {spec.launcher!r} is not one of local, ray")
    if spec.search not in ("phasewise", "product"):
        raise ConfigError(f"experiment key 'search': {spec.search!r} is not one of phasewise, product")
    if spec.select.split != "dev":
        raise ConfigError(
            "experiment key 'select.split': selection must use dev (test is only read for the selected point)"
        )
    metric_direction(spec.select.metric, spec.select.higher_is_better)
    for s in spec.report:
        if s not in ("dev", "test"):
            raise ConfigError(f"experiment key 'report': {s!r} is not one of dev, test")
    if not spec.seeds or len(set(spec.seeds)) != len(spec.seeds):
        raise ConfigError("experiment key 'seeds': must be a non-empty list without repeats")
    if spec.bootstrap.samples < 1:
        raise ConfigError("experiment key 'bootstrap.samples': must be >= 1")
    names = strategy_names(spec)
    from ragtune.strategies import REGISTRY

    for v, var in spec.variants.items():
        if v in REGISTRY:
            raise ConfigError(f"experiment key 'variants.{v}': the name of a registered strategy")
        # a variant runs only when 'strategies' lists it (a command line may select a subset)
        for o in var.overrides:
            if "=" not in o or o.split("=", 1)[0].strip() == "strategy.name":
                raise ConfigError(f"experiment key 'variants.{v}.overrides': '{o}' (key=value, not strategy.name)")
    known = set(REGISTRY) | set(names) | set(spec.variants)
    for key, grid in spec.grids.items():
        if key != "default" and key not in known:
            raise ConfigError(f"experiment key 'grids.{key}': not a strategy of this experiment nor 'default'")
        for name, val in grid.items():
            if isinstance(val, dict):  # a phase: {component: lrs}; the phase name is checked by the planner
                for comp, lrs in val.items():
                    _check_lrs(f"grids.{key}.{name}.{comp}", comp, lrs)
            else:
                _check_lrs(f"grids.{key}.{name}", name, val)
    for key in spec.strategy_overrides:
        if key not in known:
            raise ConfigError(f"experiment key 'strategy_overrides.{key}': not a strategy of this experiment")
    for key, ovs in [("overrides", spec.overrides)] + [
        (f"strategy_overrides.{k}", v) for k, v in spec.strategy_overrides.items()
    ]:
        for o in ovs:
            if "=" not in o:
                raise ConfigError(f"experiment key '{key}': '{o}' is not of the form key=value")


def _check_lrs(key: str, comp: str, lrs) -> None:
    if comp not in BUILTIN_COMPONENTS:
        raise ConfigError(f"experiment key '{key}': '{comp}' is not a component ({', '.join(BUILTIN_COMPONENTS)})")
    if (
        not isinstance(lrs, list)
        or not lrs
        or any(not isinstance(v, (int, float)) or not v > 0 for v in lrs)
        or len(set(lrs)) != len(lrs)
    ):
        raise ConfigError(f"experiment key '{key}': need a list of distinct learning rates > 0")
