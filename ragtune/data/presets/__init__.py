"""Dataset presets: real QA datasets and the wiki-18 corpus, mapped onto ragtune's schema.

`data.preset=<name>` selects an adapter (one module per dataset family, registered in REGISTRY):

  nq_open          NQ-open                  test = validation; dev carved from train
  triviaqa         TriviaQA (open-domain)   test = unfiltered validation; dev carved from train
  hotpotqa         HotpotQA                 data.hf_config distractor | fullwiki; test = validation
  popqa            PopQA                    test only: train and dev carved from it
  musique          MuSiQue                  hop order from question_decomposition; test = dev
  2wikimultihopqa  2WikiMultihopQA          test = dev; dev carved from train
  bamboogle        Bamboogle                test only: train and dev carved from it
  babilong         BabiLong                 haystacks split into passages; carved from the tasks
  flashrag         FlashRAG unified format  test = test, else dev

`data.hf_name` (default: the preset's hub id) is a hub id, a `save_to_disk` folder, or the
dataset's own json / jsonl / parquet / tsv files (ragtune.data.presets.source);
`data.corpus_path` is a corpus file in one of the wiki-18 encodings (ragtune.data.presets.corpus),
required by the open-domain presets; the datasets that bring their own paragraphs (HotpotQA
distractor, MuSiQue, 2Wiki, BabiLong) build the corpus from them without it.  Splits a dataset
lacks are carved deterministically (ragtune.data.presets.splits, `data.carve`).  `load_preset`
returns the data with its provenance, which the run records in result.json under `data`.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ..schema import DataError, Problem, Question
from . import splits as carving
from .babilong import BabiLong
from .bamboogle import Bamboogle
from .base import Paragraphs, Preset, PresetData, RowContext
from .corpus import ENCODINGS, detect_encoding, read_corpus
from .flashrag import FlashRAG
from .hotpotqa import HotpotQA
from .musique import MuSiQue
from .nq_open import NQOpen
from .popqa import PopQA
from .source import SourceSplit, open_source
from .triviaqa import TriviaQA
from .wikimultihop import TwoWikiMultihopQA

REGISTRY: Dict[str, type] = {
    cls.name: cls
    for cls in (NQOpen, TriviaQA, HotpotQA, PopQA, MuSiQue, TwoWikiMultihopQA, Bamboogle, BabiLong, FlashRAG)
}

__all__ = [
    "REGISTRY",
    "ENCODINGS",
    "Preset",
    "PresetData",
    "check_config",
    "detect_encoding",
    "get_preset",
    "load_preset",
    "make_preset",
    "read_corpus",
]


def _config_error(msg: str):
    from ragtune.config import ConfigError

    return ConfigError(msg)


def get_preset(name: str) -> type:
    if name not in REGISTRY:
        raise _config_error(
            f"config key 'data.preset': {name!r} is not a preset; expected one of {', '.join(REGISTRY)}"
        )
    return REGISTRY[name]


def make_preset(dc) -> Preset:
    """The adapter of `dc.preset` with its validated `data.preset_options` and `data.hf_config`."""
    from omegaconf import OmegaConf

    from ragtune.config import load_structured

    cls = get_preset(dc.preset)
    node = dc.preset_options
    node = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node or {})
    opts = load_structured(cls.Options, node, "data.preset_options")
    return cls(opts, dc.hf_config)


def check_config(dc) -> None:
    """Every preset setting that can be checked before any data is read; a ConfigError names the key."""
    from ragtune.config import looks_local_path

    if not dc.preset:
        raise _config_error(
            f"config key 'data.preset': data.source=preset needs a preset; expected one of {', '.join(REGISTRY)}"
        )
    if dc.source in ("files", "hf"):
        raise _config_error(
            f"config key 'data.source': data.preset={dc.preset} reads its own data; it cannot be combined "
            f"with data.source={dc.source} (set data.source=preset, or leave it at synth)"
        )
    preset = make_preset(dc)
    bad = preset.check_config(dc)
    if bad:
        raise _config_error(f"config key '{bad[0]}': {bad[1]}")
    if dc.corpus_path and not preset.accepts_corpus():
        raise _config_error(
            f"config key 'data.corpus_path': preset '{preset.name}' builds its passages from its own rows; "
            "a corpus file does not apply"
        )
    if not dc.corpus_path and preset.needs_corpus():
        raise _config_error(
            f"config key 'data.corpus_path': preset '{preset.name}'"
            + (f" ({preset.config})" if preset.config and preset.name == "hotpotqa" else "")
            + " is open-domain and needs a retrieval corpus file (wiki-18 in one of: "
            + "; ".join(ENCODINGS.values())
            + ")"
        )
    if dc.corpus_path and not Path(os.path.expanduser(dc.corpus_path)).is_file():
        raise _config_error(f"config key 'data.corpus_path': corpus file not found: {dc.corpus_path}")
    if dc.hf_name and looks_local_path(dc.hf_name) and not os.path.exists(os.path.expanduser(dc.hf_name)):
        raise _config_error(f"config key 'data.hf_name': path not found: {dc.hf_name}")
    c = dc.carve
    for key in ("dev_fraction", "train_fraction"):
        if not 0 < c[key] < 1:
            raise _config_error(f"config key 'data.carve.{key}': must be in (0, 1), got {c[key]}")
    if c.dev_fraction + c.train_fraction >= 1:
        raise _config_error(
            "config key 'data.carve.train_fraction': train_fraction + dev_fraction must be < 1 "
            f"(the rest is test), got {c.train_fraction} + {c.dev_fraction}"
        )


def _questions(preset: Preset, split: SourceSplit, ctx: RowContext) -> List[Question]:
    """Every row of one source split through the adapter; repeated ids are problems."""
    out, seen = [], {}
    for line, rec in split.read(ctx.problems):
        where = (split.file, line)
        n = len(ctx.problems)
        q = preset.question(rec, where, ctx)
        if q is None or len(ctx.problems) > n:
            continue
        if q.id in seen:
            ctx.problems.append(Problem(*where, "id", f"duplicate id {q.id!r} (first at line {seen[q.id]})"))
            continue
        seen[q.id] = line
        out.append(q)
    if not out and not ctx.problems:
        ctx.problems.append(Problem(split.file, 0, "<file>", "no questions"))
    return out


def _plan(preset: Preset, available: List[str], where: str) -> Tuple[List[str], Optional[str], Optional[str]]:
    """(test source splits, dev source split or None, train source split or None)."""
    test = preset.test_pool(available)
    if not test:
        raise DataError(
            [
                Problem(
                    where,
                    0,
                    "<split>",
                    f"no {' / '.join(preset.test_splits)} split (the one {preset.name} is reported on); "
                    f"it has {sorted(available)}",
                )
            ]
        )
    dev = next((s for s in preset.dev_splits if s in available and s not in test), None)
    train = next((s for s in preset.train_splits if s in available and s not in test and s != dev), None)
    return test, dev, train


def load_preset(dc) -> PresetData:
    """Corpus and train/dev/test of `data.preset`, with the provenance result.json records."""
    preset = make_preset(dc)
    name = dc.hf_name or preset.hub_id
    src = open_source(preset, name, preset.config)
    test_src, dev_src, train_src = _plan(preset, list(src.splits), src.where)
    corpus, corpus_info = None, None
    if dc.corpus_path:
        corpus, corpus_info = read_corpus(dc.corpus_path)
    paragraphs = Paragraphs(corpus)
    problems: list = []
    stats: Counter = Counter()
    read: Dict[str, List[Question]] = {}
    for s in [*test_src, dev_src, train_src]:
        if s is not None:
            read[s] = _questions(preset, src.splits[s], RowContext(src.splits[s].name, problems, paragraphs, stats))
    if problems:
        raise DataError(problems)
    if corpus is None:
        corpus = paragraphs.built_corpus()
        corpus_info = {
            "encoding": "dataset_paragraphs",
            "description": f"built from the {preset.name} rows' own paragraphs (ids: title#hash of the text)"
            if preset.name != "babilong"
            else "built from the babilong haystacks (ids: question id/sentence group)",
            "passages": len(corpus),
        }
    test = [q for s in test_src for q in read[s]]
    warnings: List[str] = []
    cfg = dc.carve
    seed = int(cfg.seed)
    carved = None
    origin = {"test": "+".join(src.splits[s].name for s in test_src)}
    if train_src is not None:
        train = read[train_src]
        origin["train"] = src.splits[train_src].name
        if dev_src is not None:
            dev = read[dev_src]
            origin["dev"] = src.splits[dev_src].name
        else:
            parts = [("dev", float(cfg.dev_fraction))]
            got = carving.carve(train, parts, "train", seed)
            train, dev = got["train"], got["dev"]
            origin["dev"] = f"carved from {origin['train']}"
            carved = carving.describe(origin["train"], parts, "train", seed, {k: len(v) for k, v in got.items()})
    else:
        n_pub = len(test)
        parts = [("dev", float(cfg.dev_fraction)), ("train", float(cfg.train_fraction))]
        got = carving.carve(test, parts, "test", seed)
        train, dev, test = got["train"], got["dev"], got["test"]
        origin.update(train=f"carved from {origin['test']}", dev=f"carved from {origin['test']}")
        carved = carving.describe(origin["test"], parts, "test", seed, {k: len(v) for k, v in got.items()})
        warnings.append(
            f"{preset.name} has only the split {origin['test']!r}: train ({len(train)}), dev ({len(dev)}) and "
            f"test ({len(test)}) are all carved from its {n_pub} questions, so they come from one distribution "
            f"and the test set is not the published one"
        )
    for w in warnings:
        print(f"warning: data.preset={preset.name}: {w}", file=sys.stderr)
    split_info = {}
    for s, qs in (("train", train), ("dev", dev), ("test", test)):
        split_info[s] = {
            "from": origin[s],
            "questions": len(qs),
            "with_gold": sum(bool(q.gold_passage_ids) for q in qs),
            "with_sub_queries": sum(bool(q.sub_queries) for q in qs),
        }
    source = src.describe()
    if src.kind != "hub":
        source["where"] = str(Path(src.where).resolve())
    provenance = {
        "preset": preset.name,
        "paper": preset.paper,
        "source": source,
        "options": _plain(preset.opts),
        "splits": split_info,
        "carving": carved,
        "corpus": corpus_info,
        "counts": dict(sorted(stats.items())),
        "warnings": warnings,
    }
    return PresetData(corpus=corpus, train=train, dev=dev, test=test, provenance=provenance)


def _plain(opts) -> dict:
    import dataclasses

    return dataclasses.asdict(opts) if dataclasses.is_dataclass(opts) else {}
