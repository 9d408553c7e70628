"""Typed configuration: dataclass schema <- YAML files <- `key=value` overrides.

Merged with OmegaConf in struct mode, so a typo is an error instead of a silently ignored key.
Strategy options are strategy-specific: the `strategy` node is validated a second time against
the chosen strategy's own `Options` dataclass (see `ragtune.strategy.Strategy`).

Every problem raises `ConfigError` naming the dotted key; the CLI turns it into exit code 2.
The resolved config is saved in the run directory, and `ragtune train RUN_DIR/config.yaml`
reproduces the run.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

COMPONENTS = ("query_encoder", "doc_encoder", "generator", "strategy")


class ConfigError(ValueError):
    """A bad configuration value; the message names the dotted key."""


@dataclass
class SynthData:
    """Options of the embedded synthetic benchmark (see ragtune.data.synth.SynthConfig)."""
    seed: int = 0
    options: Dict[str, Any] = field(default_factory=dict)  # extra SynthConfig fields


@dataclass
class DataConfig:
    source: str = "synth"            # synth | files | hf
    dir: str = ""                    # files: folder with corpus/train/dev/test files
    corpus: str = "corpus.jsonl"
    train: str = "train.jsonl"
    dev: str = "dev.jsonl"
    test: str = "test.jsonl"
    hf_name: str = ""                # hf: dataset name or a save_to_disk folder
    hf_corpus: str = ""              # hf: dataset name/folder of the passages
    field_map: Dict[str, str] = field(default_factory=dict)
    synth: SynthData = field(default_factory=SynthData)
    cache_dir: str = "~/.cache/ragtune"
    max_train: int = 0               # 0 = all
    max_eval: int = 0                # 0 = all (dev and test)


@dataclass
class TinyModel:
    """Size of a tiny random-init transformer built from config (tests, CPU default)."""
    hidden: int = 64
    layers: int = 2
    heads: int = 2
    intermediate: int = 128
    vocab_size: int = 2000
    max_position: int = 256


@dataclass
class RetrieverConfig:
    model: str = "tiny"              # tiny | minilm | auto (minilm if installed, else tiny) | <path or hub name>
    shared_towers: bool = False      # one encoder for queries and passages
    pooling: str = "mean"            # mean | cls
    normalize: bool = True
    temperature: float = 0.05
    max_query_length: int = 32
    max_passage_length: int = 64
    tiny: TinyModel = field(default_factory=TinyModel)


@dataclass
class IndexConfig:
    backend: str = "exact"           # exact (torch) | faiss_flat | faiss_hnsw | faiss_ivf
    refresh_every: int = 0           # steps between re-embeddings when the passage encoder trains (0: only at phase ends)
    hnsw_m: int = 32
    ivf_nlist: int = 64
    ivf_nprobe: int = 8
    use_gpu: bool = True             # only used when faiss sees a GPU
    batch_size: int = 256


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: List[str] = field(default_factory=lambda: ["q_proj", "v_proj"])


@dataclass
class PretrainConfig:
    """LM pre-training of a tiny generator on the corpus text (a stand-in for a pretrained LLM)."""
    steps: int = 0                   # 0 = no pre-training
    lr: float = 3e-3
    batch_size: int = 32
    seed: int = 0
    grouped: bool = False            # pack passages sorted by text (so by title: an entity's facts share a block)


@dataclass
class GeneratorConfig:
    model: str = "tiny"              # tiny | <local path or hub name>
    prompt_template: str = "Passage: {passage}\nQuestion: {question}\nAnswer:"
    answer_prefix: str = " "
    max_prompt_length: int = 128
    max_answer_length: int = 16
    max_new_tokens: int = 12
    lora: LoraConfig = field(default_factory=LoraConfig)
    tiny: TinyModel = field(default_factory=TinyModel)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)


@dataclass
class LearningRates:
    query_encoder: float = 1e-4
    doc_encoder: float = 1e-4
    generator: float = 1e-3
    strategy: float = 1e-4


@dataclass
class TrainConfig:
    steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    k: int = 4                       # passages per question
    lr: LearningRates = field(default_factory=LearningRates)
    schedule: str = "linear"         # constant | linear | cosine
    warmup_steps: int = 0
    weight_decay: float = 0.0
    clip_norm: float = 1.0           # 0 disables clipping
    eval_every: int = 0              # 0 = only at the end
    save_every: int = 0              # 0 = only at the end
    log_every: int = 10
    seed: int = 0
    threads: int = 0                 # torch threads on CPU (0 = leave as is)
    precision: str = "no"            # no | bf16 (accelerate mixed precision; fp16 is refused)
    tensorboard: bool = False
    progress: bool = True
    only_phase: str = ""             # run only this phase of a phased strategy
    init_from: str = ""              # start from the final weights of another run directory
    stop_after: int = 0              # testing aid: stop (as if killed) after this many steps


@dataclass
class EvalConfig:
    k: int = 0                       # passages read at evaluation (0 = train.k)
    recall_k: List[int] = field(default_factory=lambda: [1, 5])
    batch_size: int = 32
    splits: List[str] = field(default_factory=lambda: ["dev", "test"])
    oracle: bool = False             # read the gold passages (padded with retrieved ones) instead of the top-K


@dataclass
class Config:
    run_dir: str = MISSING
    strategy: Dict[str, Any] = field(default_factory=lambda: {"name": "none"})
    data: DataConfig = field(default_factory=DataConfig)
    retriever: RetrieverConfig = field(default_factory=RetrieverConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


_CHOICES = {
    "data.source": ("synth", "files", "hf"),
    "retriever.pooling": ("mean", "cls"),
    "index.backend": ("exact", "faiss_flat", "faiss_hnsw", "faiss_ivf"),
    "train.schedule": ("constant", "linear", "cosine"),
    "train.precision": ("no", "bf16"),  # fp16 needs loss scaling, which the loop does not do
}
_POSITIVE = ("train.steps", "train.batch_size", "train.grad_accum", "train.k",
             "retriever.temperature", "eval.batch_size", "generator.max_prompt_length",
             "generator.max_answer_length", "generator.max_new_tokens", "retriever.max_query_length",
             "retriever.max_passage_length")


def _wrap(err: Exception, where: str = "") -> ConfigError:
    """Turn an OmegaConf error into a ConfigError whose message starts with the dotted key."""
    key = getattr(err, "full_key", None) or ""
    msg = str(err).splitlines()[0]
    loc = f"{where}: " if where else ""
    return ConfigError(f"{loc}config key '{key}': {msg}" if key else f"{loc}{msg}")


def _parse_overrides(overrides: List[str]) -> DictConfig:
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"override '{o}' is not of the form key=value")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as e:
        raise _wrap(e, "overrides") from e


def load_config(files: List[str] = (), overrides: List[str] = ()) -> DictConfig:
    """Merge schema <- each YAML file <- overrides, validate, and return a struct-mode DictConfig."""
    schema = OmegaConf.structured(Config)
    merged = schema
    for f in files:
        path = Path(f)
        if not path.is_file():
            raise ConfigError(f"config file not found: {f}")
        try:
            loaded = OmegaConf.load(path)
            loaded.pop("defaults", None)  # header-only key for humans, no semantics
            merged = OmegaConf.merge(merged, loaded)
        except OmegaConfBaseException as e:
            raise _wrap(e, str(f)) from e
    try:
        merged = OmegaConf.merge(merged, _parse_overrides(list(overrides)))
    except OmegaConfBaseException as e:
        raise _wrap(e, "overrides") from e
    OmegaConf.set_struct(merged, True)
    validate(merged)
    return merged


def strategy_options(cfg: DictConfig, options_cls: type) -> Any:
    """Validate `cfg.strategy` against a strategy's Options dataclass; return the typed object."""
    node = OmegaConf.to_container(cfg.strategy, resolve=True)
    node.pop("name", None)
    try:
        typed = OmegaConf.merge(OmegaConf.structured(options_cls), node)
        obj = OmegaConf.to_object(typed)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", "") or ""
        raise ConfigError(f"config key 'strategy.{key}': {str(e).splitlines()[0]}") from e
    check = getattr(obj, "validate", None)
    if check is not None:
        try:
            check()
        except ValueError as e:
            raise ConfigError(str(e)) from e
    return obj


def validate(cfg: DictConfig) -> None:
    """Value checks OmegaConf's types cannot express; each error names its dotted key."""
    missing = sorted(k for k in _all_keys(cfg) if OmegaConf.is_missing(cfg, k) if "." not in k)
    if missing:
        raise ConfigError(f"config key '{missing[0]}': missing required value")
    for key, choices in _CHOICES.items():
        val = OmegaConf.select(cfg, key)
        if val not in choices:
            raise ConfigError(f"config key '{key}': {val!r} is not one of {', '.join(choices)}")
    for key in _POSITIVE:
        val = OmegaConf.select(cfg, key)
        if not val > 0:
            raise ConfigError(f"config key '{key}': must be > 0, got {val}")
    for comp in COMPONENTS:
        val = cfg.train.lr[comp]
        if not val > 0:
            raise ConfigError(f"config key 'train.lr.{comp}': learning rate must be > 0, got {val}")
    for key in ("train.warmup_steps", "train.weight_decay", "train.clip_norm", "train.eval_every",
                "train.save_every", "index.refresh_every", "data.max_train", "data.max_eval"):
        if OmegaConf.select(cfg, key) < 0:
            raise ConfigError(f"config key '{key}': must be >= 0, got {OmegaConf.select(cfg, key)}")
    if not isinstance(cfg.strategy.get("name"), str):
        raise ConfigError("config key 'strategy.name': missing strategy name")


def _all_keys(cfg: DictConfig) -> List[str]:
    return [str(k) for k in cfg.keys()]


def save_config(cfg: DictConfig, path: Path) -> None:
    Path(path).write_text(OmegaConf.to_yaml(cfg, resolve=True))


def to_dict(cfg: DictConfig) -> Dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)


def replace(cfg: DictConfig, **updates: Any) -> DictConfig:
    """Copy of cfg with dotted-key updates (e.g. replace(cfg, **{"train.steps": 5}))."""
    out = OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{k}={v}" for k, v in updates.items()]))
    OmegaConf.set_struct(out, True)
    return out


__all__ = ["Config", "ConfigError", "load_config", "save_config", "strategy_options", "to_dict",
           "replace", "COMPONENTS", "dataclasses"]
