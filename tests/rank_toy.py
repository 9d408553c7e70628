"""A strategy whose state is per rank (`strategy.name=rank_toy:RankToy`), for the data-parallel
strategy-state tests: `extra_state` maps each question id its `loss` saw to the ranks that saw it,
`merge_extra_states` unions the ranks' maps, and every `load_extra_state` appends the loaded state
to `$RANK_TOY_LOADED/loaded.rank<RANK>.jsonl` so a test can see what each rank restored."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ragtune.strategy import LossSum, Phase, Strategy


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _union(a: dict, b: dict) -> dict:
    return {k: sorted(set(a.get(k, [])) | set(b.get(k, []))) for k in sorted(set(a) | set(b))}


class RankToy(Strategy):
    name = "rank_toy"
    summary = "test strategy: per-rank state merged across ranks"

    def phases(self):
        return [Phase("main", frozenset({"generator"}))]

    def setup(self, rag):
        self.seen = {}  # question id -> sorted ranks whose loss saw it

    def loss(self, batch, rag, ctx):
        self.seen = _union(self.seen, {q.id: [_rank()] for q in batch})
        _, tok_lp, mask = rag.retrieve_and_read(batch, ctx.k)  # tok_lp (B, K, T), mask (B, T)
        return LossSum(-(tok_lp[:, 0] * mask).sum(), float(mask.sum())), {}

    def extra_state(self):
        return {"seen": {k: list(v) for k, v in self.seen.items()}}

    def load_extra_state(self, state):
        self.seen = {k: list(v) for k, v in state.get("seen", {}).items()}
        out = os.environ.get("RANK_TOY_LOADED")
        if out:
            with open(Path(out) / f"loaded.rank{_rank()}.jsonl", "a") as f:
                f.write(json.dumps(self.seen) + "\n")

    def merge_extra_states(self, states):
        seen: dict = {}
        for s in states:
            seen = _union(seen, s.get("seen", {}))
        return {"seen": seen}
