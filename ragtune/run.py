"""One training run end to end: config -> data -> pipeline -> trainer -> evaluation -> result.

The run directory's files (config, step log, checkpoints, final weights, predictions, result,
scores) are named and read by `ragtune.rundir`. A run whose result says ok or diverged is finished
and is not redone; an interrupted run resumes from its last checkpoint. A diverged run keeps its
last good checkpoint and gets no score.
"""

from __future__ import annotations

import dataclasses
import os
import random
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np
import torch
from omegaconf import OmegaConf

from ragtune import precision, rundir
from ragtune.checkpoint import load_weights, merged_extra_state, trained_weights
from ragtune.config import ConfigError, save_config, strategy_options
from ragtune.data import RAGData, load_hf, load_passages, load_questions, load_synth
from ragtune.data.schema import ConcatTexts, DataError
from ragtune.data.synth import SynthConfig
from ragtune.data.validate import split_overlap
from ragtune.distributed import rank_world, wait_for_main
from ragtune.evaluate import evaluate
from ragtune.generator import build_generator
from ragtune.index import DenseIndex
from ragtune.index_cache import build_initial_index, store_of
from ragtune.ledger import Ledger, device_name
from ragtune.pipeline import RAGPipeline
from ragtune.retriever import build_retriever
from ragtune.rundir import read_final, write_result
from ragtune.strategies import get_strategy
from ragtune.trainer import Diverged, Trainer, phase_settings


def load_data(dc) -> RAGData:
    """Corpus and splits from the synthetic benchmark, local files or HF datasets."""
    fmap = dict(dc.field_map)
    if dc.preset:  # a real dataset's adapter (ragtune.data.presets); it records its provenance
        from ragtune.data.presets import load_preset

        data = load_preset(dc)
    elif dc.source == "synth":
        try:
            scfg = SynthConfig(seed=dc.synth.seed, **dict(dc.synth.options))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config key 'data.synth.options': {e}") from e
        data = load_synth(scfg, Path(dc.cache_dir).expanduser() / "synth")
    elif dc.source == "files":
        folder = Path(dc.dir).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"config key 'data.dir': folder not found: {dc.dir}")
        problems: list = []  # every bad file is reported, not only the first
        corpus = _collect(problems, load_passages, folder / dc.corpus, field_map=fmap)
        splits = {
            s: _collect(problems, load_questions, folder / dc[s], corpus=corpus, field_map=fmap)
            for s in ("train", "dev", "test")
        }
        if problems:
            raise DataError(problems)
        data = RAGData(corpus=corpus, **splits)
    else:
        if not dc.hf_name or not dc.hf_corpus:
            raise ConfigError("config key 'data.hf_name'/'data.hf_corpus': both are needed when data.source=hf")
        corpus = load_hf(dc.hf_corpus, "train", "passages", fmap)
        splits = {s: load_hf(dc.hf_name, s, "questions", fmap, corpus=corpus) for s in ("train", "dev", "test")}
        data = RAGData(corpus=corpus, **splits)
    if not dc.allow_split_overlap:
        names = {s: str(Path(dc.dir) / dc[s]) for s in ("dev", "test")} if dc.source == "files" else {}
        problems = split_overlap({"train": data.train, "dev": data.dev, "test": data.test}, names)
        if problems:
            raise DataError(problems)
    cut = lambda qs, n: qs[:n] if n else qs
    return dataclasses.replace(  # keeps a preset's provenance
        data, train=cut(data.train, dc.max_train), dev=cut(data.dev, dc.max_eval), test=cut(data.test, dc.max_eval)
    )


def _collect(problems: list, load, *args, **kw):
    """`load(*args, **kw)`, its DataError's problems appended to `problems` (then None)."""
    try:
        return load(*args, **kw)
    except DataError as e:
        problems.extend(e.problems)
        return None


def build_pipeline(
    cfg, data: RAGData, ledger: Ledger, final: Optional[dict] = None, device: Optional[torch.device] = None
) -> RAGPipeline:
    """The pipeline of `cfg` on `device` (default CPU); with `final` (or `train.init_from`) its
    trained weights and index are loaded instead of embedding the corpus again. The models are on
    `device` before the corpus is embedded, so the initial index is computed there (a GPU run
    embeds on the GPU, in the passage tower's dtype)."""
    cls = get_strategy(cfg.strategy.name)
    opts = strategy_options(cfg, cls.Options)
    for key in ("train.k", "eval.k", *(f"eval.recall_k[{i}]" for i in range(len(cfg.eval.recall_k)))):
        k = OmegaConf.select(cfg, key)
        if k > len(data.corpus):
            raise ConfigError(f"config key '{key}': {k} is larger than the corpus ({len(data.corpus)} passages)")
    unlabeled = [q.id for q in data.train if not q.gold_passage_ids]
    if cls.needs_labels and unlabeled:
        raise ConfigError(
            f"config key 'strategy.name': '{cls.name}' needs gold_passage_ids on every training "
            f"question; {len(unlabeled)} have none (e.g. {unlabeled[0]!r})"
        )
    passages = data.corpus.model_texts  # read from the corpus's passages, never copied (schema.PassageTexts)
    seed = cfg.train.seed
    texts = ConcatTexts(passages, [q.question for q in data.train])  # the tiny encoder's tokenizer reads both
    retriever = build_retriever(cfg.retriever, texts, ledger, seed, cfg.data.cache_dir)
    generator = build_generator(cfg.generator, passages, ledger, seed + 1, cfg.data.cache_dir, master_weights=False)
    rag = RAGPipeline(retriever, generator, DenseIndex(cfg.index, store_of(cfg)), data.corpus, ledger, cls(opts))
    torch.manual_seed(seed + 2)
    rag.setup_strategy()  # owned parts exist before any weights are loaded into them; float32 master weights
    if device is not None:
        rag.to(device)
    if final is None and cfg.train.init_from:
        final = read_final(cfg.train.init_from, "train.init_from")
    if final is not None:
        load_weights(rag, final["weights"], rundir.FINAL)
        rag.strategy.load_extra_state(final.get("strategy_extra") or {})
    if final is not None and final.get("index") is not None:
        rag.index.load_state_dict(final["index"])
    else:
        with ledger.wall("index"):
            build_initial_index(rag, cfg.data.cache_dir, cfg.index.batch_size, cfg.index.cache_initial)
    return rag


def seed_everything(seed: int, threads: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(threads)


def _accelerator(precision: str, tc=None):
    """The run's Accelerator for `train.distributed` (`ragtune.distributed.build_accelerator`:
    the backend that started is checked against the one requested). The trainer wraps each phase's
    trained components itself (`ragtune.distributed`), never the whole pipeline."""
    from ragtune.distributed import build_accelerator

    return build_accelerator(precision, tc)


def train_and_evaluate(cfg) -> Dict[str, object]:
    """Train (or resume, or skip if finished) the run described by cfg, evaluate it on
    `eval.splits` and write its final weights, predictions and result; returns the result."""
    run_dir = Path(cfg.run_dir)
    done = rundir.finished_result(run_dir)  # ok or diverged; a failed result is removed: retry, resuming
    if done is not None:
        return done
    run_dir.mkdir(parents=True, exist_ok=True)
    if int(os.environ.get("RANK", "0")) != 0:  # rank 0 holds the run directory's lock for all ranks
        return _train(cfg, run_dir)
    lock = rundir.lock(run_dir).acquire()  # fileio.Busy if another process trains it (freed at its death)
    try:
        done = rundir.finished_result(run_dir)  # it may have finished before we got the lock
        return done if done is not None else _train(cfg, run_dir)
    finally:
        lock.release()


def _train(cfg, run_dir: Path) -> Dict[str, object]:
    save_config(cfg, rundir.config_path(run_dir))
    seed_everything(cfg.train.seed, cfg.train.threads)
    acc = _accelerator(cfg.train.precision, cfg.train)
    ledger = Ledger(device_name(acc.device))
    data = load_data(cfg.data)
    parent = read_final(cfg.train.init_from, "train.init_from") if cfg.train.init_from else None
    rag = build_pipeline(cfg, data, ledger, parent, acc.device)
    result: Dict[str, object] = {
        "strategy": cfg.strategy.name,
        "status": "ok",
        "reason": "",
        "lr": OmegaConf.to_container(cfg.train.lr),
        "seed": cfg.train.seed,
        "run_dir": str(run_dir),
    }
    if getattr(data, "provenance", None):  # a preset's dataset, corpus encoding and split carving
        result["data"] = data.provenance
    trainer = Trainer(cfg, rag, data.train, data.dev, run_dir, acc)
    result["phase_lr"] = {p.name: phase_settings(cfg.train, rag.strategy, p)["lr"] for _, p, _ in trainer.plan}
    if parent is not None and parent.get("sampler"):  # continue the data order where the parent stopped
        trainer.sampler.load_state_dict(parent["sampler"])
    try:
        trainer.fit()
    except Diverged as e:
        result.update(status="diverged", reason=str(e), dev=None, test=None)
    extra = merged_extra_state(rag.strategy)  # every rank's strategy state: all ranks gather, then rank 0 writes
    if result["status"] == "ok":
        if acc.is_main_process:
            # the index travels with the weights, so a run continuing from this one (train.init_from)
            # does not re-embed (and re-pay for) a corpus this run already embedded
            # (a reference to the index store's one copy, `ragtune.index_store`, unless index.store=inline)
            final_file = rundir.final_path(run_dir)
            final = {
                "weights": trained_weights(rag, trainer.components),
                "index": rag.index.state_dict(referrer=final_file),
                "sampler": trainer.sampler.state_dict(),
                "strategy_extra": extra,
            }
            rundir.write_final(run_dir, final)
            rag.index.release(final_file)  # entries an earlier final.pt of this run directory referenced
            result["index"] = {**rag.index.info, "passages": len(rag.index), "key": final["index"].get("ref")}
        # every rank: sharded over the ranks, the main process writes the predictions; then the
        # ranks' evaluation charges are folded into the main ledger (counted once)
        result.update(evaluate_splits(cfg, rag, data, run_dir, trainer.step, sharded=True))
        trainer.sync_ledger()
    if not acc.is_main_process:  # the main process writes the results
        wait_for_main(acc)
        return {**result, "secondary_process": True}
    result["steps"] = trainer.step
    result["cost"] = ledger.totals()
    write_result(run_dir, result)
    wait_for_main(acc)
    return result


def evaluate_splits(
    cfg, rag: RAGPipeline, data: RAGData, run_dir: Path, step: int = 0, sharded: bool = False
) -> Dict[str, object]:
    """Score each configured split; per-question predictions go to the run directory (rundir).
    `sharded`: every rank of the process group calls this and predicts its share of the batches
    (`evaluate`), all get the scores, rank 0 writes the predictions."""
    ec, out = cfg.eval, {}
    device = rag.generator.device
    for split in ec.splits:
        # on the pipeline's device, under the training precision (what the trainer's dev evaluation uses)
        with rag.ledger.wall("eval"), precision.compute(cfg.train.precision, device):
            res = evaluate(
                rag,
                getattr(data, split),
                ec.k or cfg.train.k,
                list(ec.recall_k),
                ec.batch_size,
                ec.oracle,
                step=step,
                decoder=ec.decoder,
                beams=ec.beams,
                sharded=sharded,
            )
        predictions = res.pop("predictions")
        if rank_world()[0] == 0:
            rundir.write_predictions(run_dir, split, predictions)
        out[split] = res
    return out


def eval_run(run_dir: Path, overrides: Sequence[str] = ()) -> Dict[str, object]:
    """Re-evaluate a finished run from its saved config and final weights (`ragtune eval RUN_DIR...
    [k=v...]`, e.g. `eval.splits=[test]` or `eval.oracle=true`); the scores go to the run directory."""
    from ragtune.config import load_config

    run_dir = Path(run_dir)
    cfg = load_config([str(rundir.config_path(run_dir))], [f"run_dir={run_dir}", "train.init_from=''", *overrides])
    seed_everything(cfg.train.seed, cfg.train.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the accelerator, as training
    ledger = Ledger(device_name(device))
    final = read_final(run_dir)
    data = load_data(cfg.data)
    rag = build_pipeline(cfg, data, ledger, final, device)
    scores = evaluate_splits(cfg, rag, data, run_dir)
    rundir.write_scores(run_dir, scores)
    return scores
