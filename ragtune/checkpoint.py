"""Checkpoints for exact resume: weights, optimizer, scheduler, RNG, data position, index, ledger.

Only components that can change are saved (everything trained in some phase, plus the
strategy's non-derivable parts, frozen ones included: a hook may update them); the passage
embeddings are saved once the index has been rebuilt by training, as a reference to the index
store's one copy per passage-encoder state (`ragtune.index_store`; `index.store=inline` keeps
them in the file). Files are written to a
temporary name and renamed, so a kill during a save never leaves a torn checkpoint. Restoring is
strict: a key missing from the checkpoint, or one the pipeline does not have, is an error.

Strategy state (`extra_state()`) is per process: with several ranks every save gathers each
rank's and saves `strategy.merge_extra_states(states)` (`merged_extra_state`, a collective every
rank calls before the main-process-only write); every rank loads that merged state at restore.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ragtune import fileio, rundir


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


PREFIX = {
    "query_encoder": "retriever.query_encoder.",
    "doc_encoder": "retriever.doc_encoder.",
    "generator": "generator.",
}


def prefix(component: str) -> str:
    """State-dict prefix of a component; a strategy part `p` lives at `strategy.p.`."""
    return PREFIX.get(component, f"strategy.{component}.")


def saved_components(strategy) -> list:
    """Components whose weights can change in a run: trained ones and non-derivable parts."""
    parts = [p.name for p in strategy.parts() if not p.derivable]
    return sorted(set(strategy.trained_components()) | set(parts))


def trained_weights(rag, components) -> dict:
    """State of the given components (all built-in ones and parts when `components` is None)."""
    if components is None:
        components = list(PREFIX) + [p.name for p in rag.strategy.parts()]
    prefixes = tuple(prefix(c) for c in components)
    if rag.retriever.shared and PREFIX["query_encoder"] in prefixes:
        prefixes += (PREFIX["doc_encoder"],)
    base = _frozen_base_keys(rag)
    # copied straight to CPU: no device clone (a GPU copy of every weight) before the save
    return {
        k: v.detach().to("cpu", copy=True)
        for k, v in rag.state_dict().items()
        if k.startswith(prefixes) and k not in base
    }


def _frozen_base_keys(rag) -> set:
    """Under LoRA, the generator's state-dict keys that no training updates (the base model's
    weights and buffers): never saved, since every run rebuilds them from `generator.model`, so a
    LoRA run's final.pt and checkpoints hold its adapters only. Empty without LoRA."""
    gen = rag.generator
    if not hasattr(gen.model, "peft_config"):
        return set()
    trained = {id(p) for p in gen.trainable_parameters()}
    names = {n for n, p in rag.named_parameters() if id(p) in trained}
    return {k for k in rag.state_dict() if k.startswith(PREFIX["generator"]) and k not in names}


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_gather(obj) -> list:
    """Every rank's `obj`, in rank order (gloo or NCCL)."""
    out = [None] * _world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def merged_extra_state(strategy) -> dict:
    """The strategy state to save: `extra_state()` in one process; with several ranks every rank's,
    gathered and merged by `strategy.merge_extra_states` (all ranks must call it; all get it)."""
    state = strategy.extra_state()
    if _world_size() == 1:
        return state
    return strategy.merge_extra_states(_all_gather(state))


class Checkpointer:
    def __init__(self, folder: Path, components):
        self.folder = Path(folder)
        self.components = components

    @property
    def latest(self) -> Path:
        return self.folder / rundir.LAST_CHECKPOINT

    def save(
        self,
        rag,
        sampler,
        opt,
        sched,
        *,
        step: int,
        phase_idx: int,
        phase_step: int,
        trainer: Optional[dict] = None,
        strategy_extra: Optional[dict] = None,
    ) -> None:
        """Write last.pt; `strategy_extra`: the merged state of every rank (`merged_extra_state`,
        gathered by the caller on all ranks), default this process's `extra_state()`."""
        self.folder.mkdir(parents=True, exist_ok=True)
        state = {
            "step": step,
            "phase_idx": phase_idx,
            "phase_step": phase_step,
            "weights": trained_weights(rag, self.components),
            "opt": opt.state_dict() if opt is not None else None,
            "sched": sched.state_dict() if sched is not None else None,
            "rng": rng_state(),
            "sampler": sampler.state_dict(),
            # a reference to the index store's copy (ragtune.index_store), unless index.store=inline
            "index": rag.index.state_dict(referrer=self.latest) if rag.index.version > 1 else None,
            "ledger": rag.ledger.state_dict(),
            "strategy_extra": rag.strategy.extra_state() if strategy_extra is None else strategy_extra,
            "trainer": trainer or {},  # the trainer's own running state (e.g. a log window)
        }
        fileio.save_torch(state, self.latest)
        rag.index.release(self.latest)  # store entries only the previous last.pt referenced are freed

    def load_latest(self) -> Optional[dict]:
        if not self.latest.exists():
            return None
        return fileio.load_torch(self.latest)

    def restore(self, state: dict, rag, sampler) -> None:
        expected = trained_weights(rag, self.components).keys()
        missing = sorted(set(expected) - set(state["weights"]))
        if missing:
            raise ValueError(f"{self.latest}: checkpoint lacks {len(missing)} weights, e.g. {missing[:3]}")
        load_weights(rag, state["weights"], str(self.latest))
        if state["index"] is not None:
            rag.index.load_state_dict(state["index"])
        rag.ledger.load_state_dict(state["ledger"])
        rag.strategy.load_extra_state(state["strategy_extra"])
        sampler.load_state_dict(state["sampler"])
        set_rng_state(state["rng"])


def load_weights(rag, state: dict, where: str = "weights") -> None:
    """Load a subset of the pipeline's weights (the trained components of a run); any key it does not
    have is an error (a renamed or missing module never loads silently). A saved tensor of a higher
    precision than the parameter it goes to (a parent run's float32 fine-tuned weights, with
    `train.init_from`, into a component this run loads in bf16 and does not train) upcasts that
    parameter first: casting down would round most of the fine-tuning away."""
    params = dict(rag.named_parameters(remove_duplicate=False))
    for key, value in state.items():
        p = params.get(key)
        if p is not None and value.is_floating_point() and value.element_size() > p.element_size():
            p.data = p.data.to(value.dtype)
    _, unexpected = rag.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"{where}: unexpected keys in weights, e.g. {unexpected[:3]}")
