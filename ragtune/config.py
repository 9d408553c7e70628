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
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ragtune.components import BUILTIN_COMPONENTS


class ConfigError(ValueError):
    """A bad configuration value; the message names the dotted key."""


# ---- allowed values, declared next to their fields ---------------------------------------------
def choice(default: Any, *choices: Any) -> Any:
    """A field whose value must be one of `choices` (None is allowed when it is the default)."""
    return field(default=default, metadata={"choices": tuple(choices)})


def positive(default: Any) -> Any:
    """A finite number > 0."""
    return field(default=default, metadata={"min": 0, "strict": True})


def nonneg(default: Any) -> Any:
    """A finite number >= 0."""
    return field(default=default, metadata={"min": 0, "strict": False})


def check_fields(obj: Any, prefix: str) -> None:
    """Check the metadata constraints of a (nested) dataclass instance; errors name `prefix.field`.

    One checker for run configs, strategy options and experiment specs: numbers must be finite
    (a NaN or inf setting is never silently accepted), `choices` / `min` from the field metadata.
    """
    for f in dataclasses.fields(obj):
        val = getattr(obj, f.name)
        key = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(val):
            check_fields(val, key)
            continue
        if isinstance(val, dict):
            for k, v in val.items():
                if dataclasses.is_dataclass(v):
                    check_fields(v, f"{key}.{k}")
                else:
                    _check_number(v, f"{key}.{k}")
            continue
        if isinstance(val, (list, tuple)):
            for i, v in enumerate(val):
                _check_number(v, f"{key}[{i}]")
        else:
            _check_number(val, key)
        if val is None:
            continue
        meta = f.metadata
        if "choices" in meta and val not in meta["choices"]:
            raise ConfigError(f"config key '{key}': {val!r} is not one of {', '.join(map(str, meta['choices']))}")
        if "min" in meta:
            ok = val > meta["min"] if meta["strict"] else val >= meta["min"]
            if not ok:
                raise ConfigError(
                    f"config key '{key}': must be {'>' if meta['strict'] else '>='} {meta['min']}, got {val}"
                )
        if "max" in meta and val > meta["max"]:
            raise ConfigError(f"config key '{key}': must be <= {meta['max']}, got {val}")


def looks_local_path(name: str) -> bool:
    """A model name meant as a local path, not a hub id: it starts like a path, has more than one
    '/', or is "a/b" where the folder `a` exists here (so a mistyped `models/minilm` is "path not
    found", not a download attempt of a hub repository of that name)."""
    if name.startswith((".", "/", "~")):
        return True
    parts = name.split("/")
    if len(parts) < 2:
        return False
    return len(parts) > 2 or not all(parts) or Path(parts[0]).expanduser().is_dir()


def _check_number(val: Any, key: str) -> None:
    if isinstance(val, float) and not math.isfinite(val):
        raise ConfigError(f"config key '{key}': must be a finite number, got {val}")


@dataclass
class SynthData:
    """Options of the embedded synthetic benchmark (see ragtune.data.synth.SynthConfig)."""

    seed: int = 0
    options: Dict[str, Any] = field(default_factory=dict)  # extra SynthConfig fields


@dataclass
class CarveConfig:
    """How the splits a preset's dataset lacks are carved (ragtune.data.presets.splits)."""

    dev_fraction: float = positive(0.1)  # of train, as dev (of the test split when it is the only one)
    train_fraction: float = positive(0.5)  # test-only datasets: of the test split, as train
    seed: int = 0


@dataclass
class DataConfig:
    """Where the corpus and the questions come from.

    source: synth (the embedded benchmark), files (`dir` with corpus/train/dev/test files), hf
    (`hf_name` + `hf_corpus` in ragtune's own field names), or preset.  A non-empty `preset`
    selects a real dataset's adapter (ragtune.data.presets) and is the source whatever `source`
    says, unless that is files or hf (an error: two sources); `source=preset` without a preset is
    an error too.  With a preset, `hf_name` is the dataset (default: the preset's hub id; or a
    save_to_disk folder, or the dataset's own json/jsonl/parquet/tsv files), `hf_config` its hub
    config (HotpotQA: the setting, distractor or fullwiki, also for local files), `corpus_path` a
    wiki-18 corpus file (tsv id/text/title, or jsonl `contents`, title plain or in quotes), needed
    by the open-domain presets, and `carve` says how missing splits are carved.
    """

    source: str = choice("synth", "synth", "files", "hf", "preset")
    preset: str = ""  # nq_open, triviaqa, hotpotqa, popqa, musique, 2wikimultihopqa, bamboogle, babilong, flashrag
    hf_config: str = ""  # preset: the hub config ("" = the preset's default)
    corpus_path: str = ""  # preset: a corpus file in a wiki-18 encoding (recorded in result.json)
    preset_options: Dict[str, Any] = field(default_factory=dict)  # the preset's own options
    carve: CarveConfig = field(default_factory=CarveConfig)
    dir: str = ""  # files: folder with corpus/train/dev/test files
    corpus: str = "corpus.jsonl"
    train: str = "train.jsonl"
    dev: str = "dev.jsonl"
    test: str = "test.jsonl"
    hf_name: str = ""  # hf: dataset name or a save_to_disk folder
    hf_corpus: str = ""  # hf: dataset name/folder of the passages
    field_map: Dict[str, str] = field(default_factory=dict)
    synth: SynthData = field(default_factory=SynthData)
    cache_dir: str = "~/.cache/ragtune"
    max_train: int = nonneg(0)  # 0 = all
    max_eval: int = nonneg(0)  # 0 = all (dev and test)
    allow_split_overlap: bool = False  # a dev/test question also in train (id or text) is an error unless set


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
    model: str = "tiny"  # tiny | minilm | auto (minilm if installed, else tiny) | <path or hub name>
    shared_towers: bool = False  # one encoder for queries and passages
    pooling: str = choice("mean", "mean", "cls")
    normalize: bool = True
    temperature: float = positive(0.05)
    max_query_length: int = positive(32)
    max_passage_length: int = positive(64)
    query_prefix: str = ""  # prepended to every query text (e5: "query: ", bge: an instruction)
    passage_prefix: str = ""  # prepended to every passage text (e5: "passage: ")
    # both towers are loaded in this dtype; a tower a phase trains is kept in float32 (master
    # weights); embeddings are pooled, normalised and scored in float32 whatever the compute dtype
    dtype: str = choice("float32", "float32", "bfloat16", "float16")
    tiny: TinyModel = field(default_factory=TinyModel)


@dataclass
class IndexConfig:
    # exact = torch matmul + topk; auto = exact below auto_min_passages passages and on a GPU, an
    # approximate faiss index (auto_backend) above it on CPU (ragtune/index.py)
    backend: str = choice("auto", "auto", "exact", "faiss_flat", "faiss_hnsw", "faiss_ivf")
    refresh_every: int = nonneg(
        0
    )  # steps between re-embeddings when the passage encoder trains (0: only at phase ends)
    hnsw_m: int = 32
    ivf_nlist: int = 64
    ivf_nprobe: int = 8
    ivf_train_per_list: int = positive(64)  # k-means sample per IVF list (faiss's default is 256)
    auto_min_passages: int = positive(200_000)  # from this corpus size `auto` is approximate on CPU
    auto_backend: str = choice("faiss_ivf", "faiss_ivf", "faiss_hnsw")
    auto_nprobe: int = positive(32)  # lists probed by `auto`'s IVF index (of ~sqrt(N) lists)
    recall_queries: int = nonneg(256)  # an approximate index is checked against exact on this many passages
    recall_k: int = positive(10)
    use_gpu: bool = True  # faiss-gpu only when usable (ragtune.index.faiss_gpu_status); else torch on the GPU
    # the index's search copy on the GPU: its dtype, and the most of the GPU's free memory it may
    # take (more: searched on CPU, with a warning); ragtune/index.py
    device_dtype: str = choice("float32", "float32", "float16", "bfloat16")
    gpu_memory_fraction: float = positive(0.5)
    batch_size: int = 256
    sort_by_length: bool = True  # embed the corpus in length-sorted batches (less padding; equal up to rounding)
    cache_initial: bool = True  # embed the corpus once per passage tower (ragtune.index_cache); charged every run
    # where final.pt and checkpoints keep the index: "" = <data.cache_dir>/index (one copy per
    # passage-encoder state, referenced by key; ragtune.index_store), "inline" = inside each file,
    # else a folder
    store: str = ""


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

    steps: int = 0  # 0 = no pre-training
    lr: float = 3e-3
    batch_size: int = 32
    seed: int = 0
    grouped: bool = False  # pack passages sorted by text (so by title: an entity's facts share a block)


@dataclass
class GeneratorConfig:
    model: str = "tiny"  # tiny | <local path or hub name>
    # weights are loaded in this dtype; every parameter training may update is kept in float32
    # (master weights: LoRA adapters, or the whole model without LoRA), compute follows train.precision
    dtype: str = choice("float32", "float32", "bfloat16", "float16")
    # end-of-sequence tokens besides the tokenizer's eos (instruct models have several, e.g.
    # Qwen2.5: <|im_end|> and <|endoftext|>); each must be one token of the vocabulary
    eos_tokens: List[str] = field(default_factory=list)
    prompt_template: str = "Passage: {passage}\nQuestion: {question}\nAnswer:"
    answer_prefix: str = " "
    max_prompt_length: int = positive(128)
    max_answer_length: int = positive(16)
    max_new_tokens: int = positive(12)
    # several passages in one prompt (readers of multi-step retrieval): {passages} is the passages,
    # each rendered by `passage_format` ({i} 1-based, {passage}) and cut to `max_passage_tokens`
    multi_prompt_template: str = "Passages:\n{passages}Question: {question}\nAnswer:"
    passage_format: str = "({i}) {passage}\n"
    max_passage_tokens: int = positive(48)
    max_context_length: int = positive(512)  # prompt + generated + observed tokens of a rollout
    chat_template: bool = False  # wrap prompts in the tokenizer's chat template (instruct models)
    system_prompt: str = ""  # with chat_template: the system message ("" = none)
    # sampling: built from these fields only (never the model's generation_config defaults)
    temperature: float = positive(1.0)
    top_p: float = field(default=1.0, metadata={"min": 0, "strict": True, "max": 1.0})  # nucleus mass in (0, 1]
    top_k: int = nonneg(0)  # 0 = off
    stop: List[str] = field(default_factory=list)  # extra stop strings of every sample call
    logprob_chunk: int = positive(1024)  # target positions per LM-head chunk in token_logprobs
    lora: LoraConfig = field(default_factory=LoraConfig)
    tiny: TinyModel = field(default_factory=TinyModel)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)


SCHEDULES = ("constant", "linear", "cosine")
DEFAULT_LR = {"query_encoder": 1e-4, "doc_encoder": 1e-4, "generator": 1e-3}


@dataclass
class PhaseOptim:
    """Per-phase optimisation (`train.phase.<phase name>.*`); None = the strategy's default for
    the phase, else the global `train.*` value. `lr` overrides `train.lr` per component."""

    lr: Dict[str, float] = field(default_factory=dict)
    schedule: Optional[str] = choice(None, *SCHEDULES)
    warmup_steps: Optional[int] = nonneg(None)
    weight_decay: Optional[float] = nonneg(None)
    betas: Optional[List[float]] = None
    eps: Optional[float] = positive(None)
    clip_norm: Optional[float] = nonneg(None)


@dataclass
class TrainConfig:
    steps: int = positive(100)
    batch_size: int = positive(8)
    grad_accum: int = positive(1)
    k: int = positive(4)  # passages per question
    # {component: lr}; a strategy-owned part falls back to its family's rate (see ragtune.strategy.Part)
    lr: Dict[str, float] = field(default_factory=lambda: dict(DEFAULT_LR))
    phase: Dict[str, PhaseOptim] = field(default_factory=dict)  # per-phase overrides, keyed by phase name
    schedule: str = choice("linear", *SCHEDULES)
    warmup_steps: int = nonneg(0)
    weight_decay: float = nonneg(0.0)
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW
    eps: float = positive(1e-8)
    clip_norm: float = nonneg(1.0)  # 0 disables clipping
    # AdamW implementation: auto = fused where the device supports it, else foreach
    adamw_impl: str = choice("auto", "auto", "fused", "foreach", "for_loop")
    eval_every: int = nonneg(0)  # 0 = only at the end
    save_every: int = nonneg(0)  # 0 = only at the end
    log_every: int = positive(10)
    seed: int = 0
    threads: int = nonneg(0)  # torch threads on CPU (0 = leave as is)
    precision: str = choice("no", "no", "bf16")  # accelerate mixed precision; fp16 needs loss scaling: refused
    # data parallelism under a launcher (ragtune.distributed): ddp, or deepspeed (ZeRO-2/3 through
    # accelerate, configured by `deepspeed_config`, a JSON file; "" = configs/deepspeed/zero2.json)
    distributed: str = choice("ddp", "ddp", "deepspeed")
    deepspeed_config: str = ""
    dist_timeout_s: int = positive(1800)  # a training collective waiting longer fails the run
    dist_wait_s: int = positive(86400)  # how long other ranks wait while the main process writes
    tensorboard: bool = False
    progress: bool = True
    only_phase: str = ""  # run only this phase of a phased strategy
    init_from: str = ""  # start from the final weights of another run directory


@dataclass
class DiagnosticsConfig:
    """On-request diagnostics (ragtune.diagnostics); their compute is never charged as training."""

    grad_variance_every: int = nonneg(0)  # every N optimizer steps (0 = never)
    grad_variance_draws: int = positive(8)  # repeated loss/backward draws per fixed batch
    grad_variance_batches: int = positive(2)  # fixed training batches (the first ones of the run)


@dataclass
class DebugConfig:
    """Testing aids, kept out of the training settings."""

    stop_after: int = nonneg(0)  # stop (as if killed: exit 130) after this many optimizer steps
    step_sleep: float = nonneg(0.0)  # seconds to sleep after each step (lets a test kill -9 mid-run)


@dataclass
class EvalConfig:
    k: int = nonneg(0)  # passages read at evaluation (0 = train.k)
    recall_k: List[int] = field(default_factory=lambda: [1, 5])
    batch_size: int = positive(32)
    splits: List[str] = field(default_factory=lambda: ["dev", "test"])
    oracle: bool = False  # read the gold passages (padded with retrieved ones) instead of the top-K
    # the core decoder (ragtune.decoding): auto = the strategy's own (Strategy.default_decoder)
    decoder: str = choice("auto", "auto", "greedy_rescore", "thorough", "fast", "token_mixture")
    beams: int = positive(2)  # beam width of thorough / fast (per passage) and token_mixture (1 = greedy)


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
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)


def _wrap(err: Exception, where: str = "") -> ConfigError:
    """Turn an OmegaConf error into a ConfigError whose message starts with the dotted key."""
    key = getattr(err, "full_key", None) or ""
    msg = str(err).splitlines()[0]
    loc = f"{where}: " if where else ""
    return ConfigError(f"{loc}config key '{key}': {msg}" if key else f"{loc}{msg}")


def parse_overrides(overrides: List[str]) -> DictConfig:
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"override '{o}' is not of the form key=value")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as e:
        raise _wrap(e, "overrides") from e
    except Exception as e:  # a value YAML cannot parse (e.g. an unclosed bracket)
        raise ConfigError(f"overrides: cannot parse {overrides}: {str(e).splitlines()[0]}") from e


def read_yaml(path: Path) -> DictConfig:
    """A YAML file whose top level is a mapping; any problem is a ConfigError naming the file."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        loaded = OmegaConf.load(path)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    except Exception as e:  # malformed YAML
        raise ConfigError(f"{path}: malformed YAML: {' '.join(str(e).split())[:300]}") from e
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, not a {type(loaded).__name__}")
    return loaded


def load_config(files: List[str] = (), overrides: List[str] = ()) -> DictConfig:
    """Merge schema <- each YAML file <- overrides, validate, and return a struct-mode DictConfig."""
    schema = OmegaConf.structured(Config)
    merged = schema
    for f in files:
        loaded = read_yaml(Path(f))
        try:
            loaded.pop("defaults", None)  # header-only key for humans, no semantics
            merged = OmegaConf.merge(merged, loaded)
        except OmegaConfBaseException as e:
            raise _wrap(e, str(f)) from e
    try:
        merged = OmegaConf.merge(merged, parse_overrides(list(overrides)))
    except OmegaConfBaseException as e:
        raise _wrap(e, "overrides") from e
    OmegaConf.set_struct(merged, True)
    validate(merged)
    return merged


def load_structured(schema: type, node: Any, prefix: str) -> Any:
    """Validate a plain dict/DictConfig against a dataclass schema; return the typed object.

    The one structured loader: run configs, strategy options (prefix `strategy`) and experiment
    specs go through it, so every unknown key, wrong type, disallowed choice or non-finite
    number is a ConfigError naming `prefix.key`.
    """
    try:
        typed = OmegaConf.merge(OmegaConf.structured(schema), node)
        obj = OmegaConf.to_object(typed)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", "") or ""
        where = f"{prefix}.{key}" if prefix and key else (key or prefix)
        raise ConfigError(f"config key '{where}': {str(e).splitlines()[0]}") from e
    if dataclasses.is_dataclass(obj):
        check_fields(obj, prefix)
    check = getattr(obj, "validate", None)
    if check is not None:
        try:
            check()
        except ValueError as e:
            msg = str(e)
            raise ConfigError(msg if msg.startswith("config key") else f"config key '{prefix}': {msg}") from e
    return obj


def strategy_options(cfg: DictConfig, options_cls: type) -> Any:
    """Validate `cfg.strategy` against a strategy's Options dataclass; return the typed object."""
    node = OmegaConf.to_container(cfg.strategy, resolve=True)
    node.pop("name", None)
    return load_structured(options_cls, node, "strategy")


def validate(cfg: DictConfig) -> None:
    """Value checks OmegaConf's types cannot express; each error names its dotted key."""
    missing = sorted(str(k) for k in cfg.keys() if OmegaConf.is_missing(cfg, k))
    if missing:
        raise ConfigError(f"config key '{missing[0]}': missing required value")
    check_fields(OmegaConf.to_object(cfg), "")
    for key in ("train.lr", *(f"train.phase.{p}.lr" for p in cfg.train.phase)):
        for comp, val in OmegaConf.select(cfg, key).items():
            if not (isinstance(val, (int, float)) and math.isfinite(val) and val > 0):
                raise ConfigError(f"config key '{key}.{comp}': learning rate must be a finite number > 0, got {val}")
    for key in ("train.betas", *(f"train.phase.{p}.betas" for p in cfg.train.phase)):
        betas = OmegaConf.select(cfg, key)
        if betas is not None and (len(betas) != 2 or not all(0 <= b < 1 for b in betas)):
            raise ConfigError(f"config key '{key}': two numbers in [0, 1) expected, got {list(betas)}")
    _validate_values(cfg)
    if not isinstance(cfg.strategy.get("name"), str):
        raise ConfigError("config key 'strategy.name': missing strategy name")
    validate_strategy(cfg)


def _validate_values(cfg: DictConfig) -> None:
    """Cross-field and list checks: model shapes, prompt fields, eval settings, paths, field maps."""
    import string

    from ragtune.data.validate import PASSAGE_FIELDS, QUESTION_FIELDS

    for side in ("retriever", "generator"):
        t = cfg[side].tiny
        for f in ("hidden", "layers", "heads", "intermediate", "vocab_size", "max_position"):
            if not t[f] > 0:
                raise ConfigError(f"config key '{side}.tiny.{f}': must be > 0, got {t[f]}")
        if t.hidden % t.heads:
            raise ConfigError(f"config key '{side}.tiny.heads': {t.heads} heads do not divide hidden={t.hidden}")
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(cfg.generator.prompt_template) if name is not None}
    except ValueError as e:
        raise ConfigError(f"config key 'generator.prompt_template': {e}") from e
    unknown = sorted(fields - {"question", "passage"})
    if unknown or "question" not in fields:
        raise ConfigError(
            f"config key 'generator.prompt_template': fields {{question}} (and {{passage}}) expected, "
            f"unknown: {unknown}"
        )
    for i, k in enumerate(cfg.eval.recall_k):
        if not k > 0:
            raise ConfigError(f"config key 'eval.recall_k[{i}]': must be > 0, got {k}")
    for i, split in enumerate(cfg.eval.splits):
        if split not in ("train", "dev", "test"):
            raise ConfigError(f"config key 'eval.splits[{i}]': {split!r} is not one of train, dev, test")
    for key in ("index.batch_size", "index.hnsw_m", "index.ivf_nlist", "index.ivf_nprobe"):
        if not OmegaConf.select(cfg, key) > 0:
            raise ConfigError(f"config key '{key}': must be > 0, got {OmegaConf.select(cfg, key)}")
    if cfg.data.preset or cfg.data.source == "preset":
        from ragtune.data.presets import check_config

        check_config(cfg.data)
    allowed = set(PASSAGE_FIELDS + QUESTION_FIELDS)
    for key in cfg.data.field_map:
        if key not in allowed:
            raise ConfigError(f"config key 'data.field_map.{key}': not a field ({', '.join(sorted(allowed))})")
    for key, builtin in (("retriever.model", ("tiny", "minilm", "auto")), ("generator.model", ("tiny",))):
        name = OmegaConf.select(cfg, key)
        if name not in builtin and looks_local_path(name) and not Path(name).expanduser().exists():
            raise ConfigError(f"config key '{key}': model path not found: {name}")
    if not OmegaConf.is_missing(cfg, "run_dir") and Path(cfg.run_dir).expanduser().is_file():
        raise ConfigError(f"config key 'run_dir': {cfg.run_dir} is an existing file, not a folder")


def validate_strategy(cfg: DictConfig) -> None:
    """The strategy's options and declaration against the config, before any data or model:
    options, phase names under `train.phase`, `train.only_phase`, and learning-rate keys."""
    from ragtune.strategies import get_strategy

    cls = get_strategy(cfg.strategy.name)
    strategy = cls(strategy_options(cfg, cls.Options))
    try:
        strategy.check_declaration()
    except ValueError as e:
        raise ConfigError(f"config key 'strategy.name': {e}") from e
    names = [p.name for p in strategy.phases()]
    for p in cfg.train.phase:
        if p not in names:
            raise ConfigError(
                f"config key 'train.phase.{p}': not a phase of '{cls.name}' ({', '.join(names) or 'none'})"
            )
    if cfg.train.only_phase and cfg.train.only_phase not in names:
        raise ConfigError(
            f"config key 'train.only_phase': '{cfg.train.only_phase}' is not a phase of this "
            f"strategy ({', '.join(names) or 'none'})"
        )
    vocab = strategy.vocabulary()
    for key in ("train.lr", *(f"train.phase.{p}.lr" for p in cfg.train.phase)):
        for comp in OmegaConf.select(cfg, key):
            if comp not in vocab:
                raise ConfigError(f"config key '{key}.{comp}': not a component of '{cls.name}' ({', '.join(vocab)})")
    for comp in BUILTIN_COMPONENTS:
        if comp not in cfg.train.lr:
            raise ConfigError(f"config key 'train.lr.{comp}': missing learning rate")


def save_config(cfg: DictConfig, path: Path) -> None:
    from ragtune.fileio import write_text

    write_text(path, OmegaConf.to_yaml(cfg, resolve=True))


def to_dict(cfg: DictConfig) -> Dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)


def replace(cfg: DictConfig, **updates: Any) -> DictConfig:
    """Copy of cfg with dotted-key updates (e.g. replace(cfg, **{"train.steps": 5}))."""
    out = OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{k}={v}" for k, v in updates.items()]))
    OmegaConf.set_struct(out, True)
    return out


__all__ = [
    "Config",
    "ConfigError",
    "load_config",
    "load_structured",
    "save_config",
    "strategy_options",
    "to_dict",
    "replace",
    "choice",
    "positive",
    "nonneg",
    "check_fields",
]
