"""Deterministic, resumable batch order over the training questions.

Each epoch is a fresh permutation drawn from (seed, epoch), so the position (epoch, pos) is the
whole state: a resumed run sees exactly the batches an uninterrupted one would. With several
processes, each takes its own slice of every global batch.
"""

from __future__ import annotations

from typing import List

import torch


class BatchSampler:
    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        if n == 0:
            raise ValueError("no training questions")
        self.n, self.bs, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.epoch, self.pos = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> List[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def next(self) -> List[int]:
        """Indices of this process's share of the next global batch (wraps across epochs)."""
        out: List[int] = []
        need = self.bs * self.world
        while len(out) < need:
            if self.pos >= self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._perm = self._permutation(self.epoch)
            take = min(need - len(out), self.n - self.pos)
            out += self._perm[self.pos : self.pos + take]
            self.pos += take
        return out[self.rank * self.bs : (self.rank + 1) * self.bs]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._perm = self._permutation(self.epoch)
