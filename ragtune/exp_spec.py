"""Experiment definition (`experiments/*.yaml`): typed schema, loading and validation.

What: an experiment names base run configs, the strategies to compare, seeds, per-component
learning-rate grids, how to select on dev and which splits to report. Why a dataclass merged in
OmegaConf struct mode: a misspelt key is an error naming the key (exit 2) instead of a silently
ignored setting that would make the comparison quietly wrong.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ragtune.config import COMPONENTS, ConfigError


@dataclass
class Select:
    metric: str = "em"               # any key of the dev scores (em, f1, recall@5...); direction from ragtune.metrics
    split: str = "dev"               # selection is on dev only (test is read for the selected point)


@dataclass
class Bootstrap:
    samples: int = 1000              # resamples over questions for the 95% confidence interval
    seed: int = 0


@dataclass
class RayOptions:
    address: str = ""                # "" = start a local Ray instance; else an existing cluster ("auto", ip:port)
    num_cpus: int = 0                # local instance size (0 = Ray's default: every core)
    cpus_per_run: float = 1.0
    gpus_per_run: float = -1.0       # -1 = 1 when the driver sees a GPU, else 0


@dataclass
class ExperimentSpec:
    name: str = MISSING
    base: List[str] = field(default_factory=lambda: ["configs/default.yaml"])
    overrides: List[str] = field(default_factory=list)        # applied to every run
    strategies: Any = "all"                                     # list of registered names, or "all"
    seeds: List[int] = field(default_factory=lambda: [0])
    select: Select = field(default_factory=Select)
    report: List[str] = field(default_factory=lambda: ["dev", "test"])
    launcher: str = "local"                                     # local | ray
    parallel: int = 0                                           # local: concurrent runs (0 = one per visible GPU, 1 on CPU)
    search: str = "phasewise"                                   # phasewise | product (full product even for phased strategies)
    grids: Dict[str, Dict[str, List[float]]] = field(default_factory=dict)  # strategy or "default" -> component -> lrs
    strategy_overrides: Dict[str, List[str]] = field(default_factory=dict)  # strategy -> extra key=value
    bootstrap: Bootstrap = field(default_factory=Bootstrap)
    ray: RayOptions = field(default_factory=RayOptions)
    out: str = ""                                               # "" = results/<name>


def _wrap(err: OmegaConfBaseException, where: str) -> ConfigError:
    key = getattr(err, "full_key", "") or ""
    msg = str(err).splitlines()[0]
    return ConfigError(f"{where}: experiment key '{key}': {msg}" if key else f"{where}: {msg}")


def load_experiment(path: str, overrides: List[str] = ()) -> Any:
    """Schema <- YAML file <- `key=value` overrides; returns a validated struct-mode DictConfig."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"experiment file not found: {path}")
    spec = OmegaConf.structured(ExperimentSpec)
    try:
        spec = OmegaConf.merge(spec, OmegaConf.load(p))
    except OmegaConfBaseException as e:
        raise _wrap(e, str(path)) from e
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"override '{bad[0]}' is not of the form key=value")
    try:
        spec = OmegaConf.merge(spec, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as e:
        raise _wrap(e, "overrides") from e
    OmegaConf.set_struct(spec, True)
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
    """The strategies to run: the registry's names for `all`, else the list as given (validated)."""
    from ragtune.strategies import REGISTRY

    raw = spec.strategies
    names = list(REGISTRY) if isinstance(raw, str) and raw == "all" else (
        [raw] if isinstance(raw, str) else [str(s) for s in raw])
    for n in names:
        if n not in REGISTRY:
            raise ConfigError(f"experiment key 'strategies': unknown strategy '{n}' "
                              f"(registered: {', '.join(sorted(REGISTRY))})")
    if not names or len(set(names)) != len(names):
        raise ConfigError("experiment key 'strategies': must be 'all' or a non-empty list without repeats")
    return names


def validate(spec) -> None:
    """Value checks the types cannot express; each error names its key."""
    from ragtune.metrics import get_metric

    if not spec.name or "/" in spec.name:
        raise ConfigError(f"experiment key 'name': must be a non-empty folder name, got {spec.name!r}")
    if spec.launcher not in ("local", "ray"):
        raise ConfigError(f"experiment key 'launcher': {spec.launcher!r} is not one of local, ray")
    if spec.search not in ("phasewise", "product"):
        raise ConfigError(f"experiment key 'search': {spec.search!r} is not one of phasewise, product")
    if spec.select.split != "dev":
        raise ConfigError("experiment key 'select.split': selection must use dev (test is only read for the selected point)")
    try:
        meta = get_metric(spec.select.metric)
    except KeyError as e:
        raise ConfigError(f"experiment key 'select.metric': {e.args[0]}") from e
    if meta.fn is None:
        raise ConfigError(f"experiment key 'select.metric': '{spec.select.metric}' is not a score runs report")
    for s in spec.report:
        if s not in ("dev", "test"):
            raise ConfigError(f"experiment key 'report': {s!r} is not one of dev, test")
    if not spec.seeds or len(set(spec.seeds)) != len(spec.seeds):
        raise ConfigError("experiment key 'seeds': must be a non-empty list without repeats")
    if spec.bootstrap.samples < 1:
        raise ConfigError("experiment key 'bootstrap.samples': must be >= 1")
    strategy_names(spec)
    from ragtune.strategies import REGISTRY

    for key, grid in spec.grids.items():
        if key != "default" and key not in REGISTRY:
            raise ConfigError(f"experiment key 'grids.{key}': not a registered strategy nor 'default'")
        for comp, lrs in grid.items():
            if comp not in COMPONENTS:
                raise ConfigError(f"experiment key 'grids.{key}.{comp}': not a component ({', '.join(COMPONENTS)})")
            if not lrs or any(not v > 0 for v in lrs) or len(set(lrs)) != len(lrs):
                raise ConfigError(f"experiment key 'grids.{key}.{comp}': need distinct learning rates > 0")
    for key in spec.strategy_overrides:
        if key not in REGISTRY:
            raise ConfigError(f"experiment key 'strategy_overrides.{key}': not a registered strategy")
    for key, ovs in [("overrides", spec.overrides)] + [(f"strategy_overrides.{k}", v) for k, v in spec.strategy_overrides.items()]:
        for o in ovs:
            if "=" not in o:
                raise ConfigError(f"experiment key '{key}': '{o}' is not of the form key=value")
