"""The strategy contract: a strategy is only the math that turns a batch into a loss.

A strategy declares its phases (each: which components it trains, and its share of the step
budget), owns any extra learned parts as submodules, and implements `loss`. It may override
`predict` (its own decoding, multi-step retrieval, a search agent); by default every strategy is
evaluated by the core's decoder so that scores are comparable. The trainer derives everything
else from the declaration: requires_grad, optimizer groups with one learning rate per component,
index refreshes when the passage tower trains, and what the ledger charges.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Dict, FrozenSet, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ragtune.data import Question


@dataclass
class NoOptions:
    def validate(self) -> None:
        pass


@dataclass(frozen=True)
class Phase:
    name: str
    trains: FrozenSet[str]   # subset of {query_encoder, doc_encoder, generator, strategy}
    fraction: float = 1.0    # share of train.steps


class Strategy(nn.Module):
    name: ClassVar[str] = ""
    needs_labels: ClassVar[bool] = False
    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions

    def __init__(self, options, cfg):
        super().__init__()
        self.opts = options
        self.cfg = cfg

    def phases(self) -> List[Phase]:
        """Default: one phase; subclasses override. An empty list means nothing is trained."""
        raise NotImplementedError

    def loss(self, batch: Sequence[Question], m, step: int) -> Tuple[torch.Tensor, Dict[str, float]]:
        raise NotImplementedError

    def predict(self, batch: Sequence[Question], m, k: int) -> Optional[List[dict]]:
        """Return per-question dicts {prediction, retrieved_ids}, or None for the core decoder."""
        return None

    def on_phase_start(self, phase: Phase, m) -> None:
        """Hook for phase-dependent state (e.g. freezing a target network)."""

    def extra_state(self) -> dict:
        """Non-parameter state that must survive a checkpoint (e.g. sample caches)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    @classmethod
    def trains_description(cls) -> str:
        comps = sorted({c for p in cls(cls.Options(), None).phases() for c in p.trains})
        return ", ".join(comps) if comps else "nothing"
