"""Checkpoints for exact resume: weights, optimizer, scheduler, RNG, data position, index, ledger.

Only components that can change are saved (everything with a trainable parameter in some
phase, plus the strategy's own parts); the passage embeddings are saved once the index has been
rebuilt by training. Files are written to a temporary name and renamed, so a kill during a save
never leaves a torn checkpoint.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Optional

import numpy as np
import torch


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


PREFIX = {"query_encoder": "retriever.query_encoder.", "doc_encoder": "retriever.doc_encoder.",
          "generator": "generator.", "strategy": "strategy."}


def trained_weights(m, components) -> dict:
    """State of the components that can change (all of them when `components` is None)."""
    prefixes = tuple(PREFIX[c] for c in (components if components is not None else PREFIX))
    if m.retriever.shared and PREFIX["query_encoder"] in prefixes:
        prefixes += (PREFIX["doc_encoder"],)
    return {k: v.detach().clone() for k, v in m.state_dict().items() if k.startswith(prefixes)}


class Checkpointer:
    def __init__(self, folder: Path, components):
        self.folder = Path(folder)
        self.components = components

    @property
    def latest(self) -> Path:
        return self.folder / "last.pt"

    def save(self, m, sampler, opt, sched, *, step: int, phase_idx: int, phase_step: int) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        state = {
            "step": step, "phase_idx": phase_idx, "phase_step": phase_step,
            "weights": trained_weights(m, self.components),
            "opt": opt.state_dict() if opt is not None else None,
            "sched": sched.state_dict() if sched is not None else None,
            "rng": rng_state(), "sampler": sampler.state_dict(),
            "index": m.index.state_dict() if m.index.version > 1 else None,
            "ledger": m.ledger.state_dict(), "strategy_extra": m.strategy.extra_state(),
        }
        tmp = self.latest.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.latest)

    def load_latest(self) -> Optional[dict]:
        if not self.latest.exists():
            return None
        return torch.load(self.latest, map_location="cpu", weights_only=False)

    def restore(self, state: dict, m, sampler) -> None:
        m.load_state_dict(state["weights"], strict=False)
        if state["index"] is not None:
            m.index.load_state_dict(state["index"])
        m.ledger.load_state_dict(state["ledger"])
        m.strategy.load_extra_state(state["strategy_extra"])
        sampler.load_state_dict(state["sampler"])
        set_rng_state(state["rng"])


def save_final_weights(m, path: Path, components) -> None:
    """Weights of the trained components, used by `train.init_from` and `ragtune eval`."""
    torch.save(trained_weights(m, components), path)


def load_weights(m, src) -> None:
    """Load trained weights into `m` from a state dict or from a file written by save_final_weights."""
    state = src if isinstance(src, dict) else torch.load(src, map_location="cpu")
    missing, unexpected = m.load_state_dict(state, strict=False)
    if unexpected:
        where = "weights" if isinstance(src, dict) else str(src)
        raise ValueError(f"{where}: unexpected keys in weights, e.g. {unexpected[:3]}")
