"""One training run end to end: config -> data -> pipeline -> trainer -> evaluation -> result.json.

A run directory holds config.yaml, metrics.jsonl, checkpoints/, final.pt, predictions*.jsonl and
result.json (strategy, status ok/failed/diverged with a reason, dev/test scores, cost). A run
whose result.json exists is finished and is not redone; an interrupted run resumes from its
last checkpoint. A diverged run keeps its last good checkpoint and gets no score.
"""
from __future__ import annotations

import json
import random
import traceback
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np
import torch

from ragtune.checkpoint import load_weights, trained_weights
from ragtune.config import ConfigError, save_config, strategy_options
from ragtune.cost import Ledger, device_name
from ragtune.data import RAGData, load_passages, load_questions, load_hf, load_synth
from ragtune.data.synth import SynthConfig
from ragtune.evaluate import evaluate
from ragtune.generator import build_generator
from ragtune.index import DenseIndex
from ragtune.pipeline import RAGPipeline
from ragtune.retriever import build_retriever
from ragtune.strategies import get_strategy
from ragtune.trainer import Diverged, Trainer

STATUS_EXIT = {"ok": 0, "failed": 1, "diverged": 3}


def load_data(dc) -> RAGData:
    """Corpus and splits from the synthetic benchmark, local files or HF datasets."""
    fmap = dict(dc.field_map)
    if dc.source == "synth":
        try:
            scfg = SynthConfig(seed=dc.synth.seed, **dict(dc.synth.options))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config key 'data.synth.options': {e}") from e
        data = load_synth(scfg, Path(dc.cache_dir).expanduser() / "synth")
    elif dc.source == "files":
        folder = Path(dc.dir).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"config key 'data.dir': folder not found: {dc.dir}")
        corpus = load_passages(folder / dc.corpus, field_map=fmap)
        splits = {s: load_questions(folder / dc[s], corpus=corpus, field_map=fmap) for s in ("train", "dev", "test")}
        data = RAGData(corpus=corpus, **splits)
    else:
        if not dc.hf_name or not dc.hf_corpus:
            raise ConfigError("config key 'data.hf_name'/'data.hf_corpus': both are needed when data.source=hf")
        corpus = load_hf(dc.hf_corpus, "train", "passages", fmap)
        splits = {s: load_hf(dc.hf_name, s, "questions", fmap, corpus=corpus) for s in ("train", "dev", "test")}
        data = RAGData(corpus=corpus, **splits)
    cut = lambda qs, n: qs[:n] if n else qs
    return RAGData(corpus=data.corpus, train=cut(data.train, dc.max_train), dev=cut(data.dev, dc.max_eval),
                   test=cut(data.test, dc.max_eval))


def read_final(run_dir, key: str = "") -> dict:
    """final.pt of a finished run: weights, index and data position (error names `key` if given)."""
    src = Path(run_dir) / "final.pt"
    if not src.exists():
        where = f"config key '{key}': " if key else ""
        raise ConfigError(f"{where}no final.pt in {run_dir} (the run did not finish successfully)")
    return torch.load(src, map_location="cpu", weights_only=False)


def build_pipeline(cfg, data: RAGData, ledger: Ledger, final: Optional[dict] = None) -> RAGPipeline:
    """The pipeline of `cfg`; with `final` (or `train.init_from`) its trained weights and index are
    loaded instead of embedding the corpus again."""
    cls = get_strategy(cfg.strategy.name)
    opts = strategy_options(cfg, cls.Options)
    if cfg.train.k > len(data.corpus):
        raise ConfigError(f"config key 'train.k': {cfg.train.k} is larger than the corpus ({len(data.corpus)} passages)")
    unlabeled = [q.id for q in data.train if not q.gold_passage_ids]
    if cls.needs_labels and unlabeled:
        raise ConfigError(f"config key 'strategy.name': '{cls.name}' needs gold_passage_ids on every training "
                          f"question; {len(unlabeled)} have none (e.g. {unlabeled[0]!r})")
    texts = [data.corpus.passage_text(p) for p in data.corpus] + [q.question for q in data.train]
    seed = cfg.train.seed
    retriever = build_retriever(cfg.retriever, texts, ledger, seed)
    generator = build_generator(cfg.generator, [data.corpus.passage_text(p) for p in data.corpus], ledger,
                                seed + 1, cfg.data.cache_dir)
    torch.manual_seed(seed + 2)
    strategy = cls(opts, cfg)
    m = RAGPipeline(retriever, generator, DenseIndex(cfg.index), data.corpus, ledger, strategy)
    if final is None and cfg.train.init_from:
        final = read_final(cfg.train.init_from, "train.init_from")
    if final is not None:
        load_weights(m, final["weights"])
    if final is not None and final.get("index") is not None:
        m.index.load_state_dict(final["index"])
    else:
        with ledger.wall("index"):
            m.refresh_index(cfg.index.batch_size)
    return m


def seed_everything(seed: int, threads: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(threads)


def _accelerator(precision: str):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    # phases freeze different components, so some parameters get no gradient in a given step
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    return Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available(), kwargs_handlers=[ddp])


def train(cfg) -> Dict[str, object]:
    """Run (or resume, or skip if finished) the run described by cfg; returns result.json's content."""
    run_dir = Path(cfg.run_dir)
    if (run_dir / "result.json").exists():
        done = json.loads((run_dir / "result.json").read_text())
        if done.get("status") != "failed":
            return done  # finished (ok, or diverged: deterministic, re-running would diverge again)
        (run_dir / "result.json").unlink()  # a crash may be transient: retry, resuming from the checkpoint
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    seed_everything(cfg.train.seed, cfg.train.threads)
    acc = _accelerator(cfg.train.precision)
    ledger = Ledger(device_name(acc.device))
    data = load_data(cfg.data)
    parent = read_final(cfg.train.init_from, "train.init_from") if cfg.train.init_from else None
    m = build_pipeline(cfg, data, ledger, parent).to(acc.device)
    result: Dict[str, object] = {"strategy": cfg.strategy.name, "status": "ok", "reason": "",
                                 "lr": dict(cfg.train.lr), "seed": cfg.train.seed, "run_dir": str(run_dir)}
    trainer = Trainer(cfg, m, data.train, data.dev, run_dir, acc)
    if parent is not None and parent.get("sampler"):  # continue the data order where the parent stopped
        trainer.sampler.load_state_dict(parent["sampler"])
    try:
        trainer.fit()
    except Diverged as e:
        result.update(status="diverged", reason=str(e), dev=None, test=None)
    if not acc.is_main_process:  # the main process evaluates and writes the results
        acc.wait_for_everyone()
        return {**result, "secondary_process": True}
    if result["status"] == "ok":
        # the index travels with the weights, so a run continuing from this one (train.init_from)
        # does not re-embed (and re-pay for) a corpus this run already embedded
        final = {"weights": trained_weights(m, trainer.components), "index": m.index.state_dict(),
                 "sampler": trainer.sampler.state_dict()}
        torch.save(final, run_dir / "final.pt")
        result.update(evaluate_splits(cfg, m, data, run_dir))
    result["steps"] = trainer.step
    result["cost"] = ledger.totals()
    write_result(run_dir, result)
    acc.wait_for_everyone()
    return result


def evaluate_splits(cfg, m: RAGPipeline, data: RAGData, run_dir: Path) -> Dict[str, object]:
    """Score each configured split; per-question predictions go to predictions[_split].jsonl."""
    ec, out = cfg.eval, {}
    for split in ec.splits:
        with m.ledger.wall("eval"):
            res = evaluate(m, getattr(data, split), ec.k or cfg.train.k, list(ec.recall_k), ec.batch_size, ec.oracle)
        preds = res.pop("predictions")
        name = "predictions.jsonl" if split == "test" else f"predictions_{split}.jsonl"
        with open(run_dir / name, "w") as f:
            for row in preds:
                f.write(json.dumps(row) + "\n")
        out[split] = res
    return out


def write_result(run_dir: Path, result: Dict[str, object]) -> None:
    tmp = run_dir / "result.json.tmp"
    tmp.write_text(json.dumps(result, indent=2, default=float))
    tmp.replace(run_dir / "result.json")


def failed_result(cfg, err: BaseException) -> Dict[str, object]:
    """Record a crashed run as failed with its reason (never as a score)."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    result = {"strategy": cfg.strategy.name, "status": "failed", "reason": f"{type(err).__name__}: {err}",
              "traceback": traceback.format_exc(), "dev": None, "test": None, "lr": dict(cfg.train.lr),
              "seed": cfg.train.seed, "run_dir": str(run_dir)}
    write_result(run_dir, result)
    return result


def eval_run(run_dir: Path, overrides: Sequence[str] = ()) -> Dict[str, object]:
    """Re-evaluate a finished run from its config.yaml and final.pt (`ragtune eval RUN_DIR [k=v...]`,
    e.g. `eval.splits=[test]` or `eval.oracle=true`)."""
    from ragtune.config import load_config

    run_dir = Path(run_dir)
    cfg = load_config([str(run_dir / "config.yaml")], [f"run_dir={run_dir}", "train.init_from=''", *overrides])
    seed_everything(cfg.train.seed, cfg.train.threads)
    ledger = Ledger(device_name("cuda" if torch.cuda.is_available() else "cpu"))
    final = read_final(run_dir)
    data = load_data(cfg.data)
    m = build_pipeline(cfg, data, ledger, final)
    scores = evaluate_splits(cfg, m, data, run_dir)
    (run_dir / "scores.json").write_text(json.dumps(scores, indent=2))
    return scores
