"""Ragged candidate sets: per question, a variable number of corpus rows to score and read.

Latent-passage objectives (a variational bound, MCMC over passages) work over the union of
several proposal sets per question: the prior's top-k, a posterior's top-k, a cached sample, a
candidate pool. Those sets differ in size per question and overlap, so they are kept as a
padded (B, C) tensor of rows plus a mask, with where each candidate came from as bit flags.
Padding holds row 0 (a valid row, so lookups never fail) and is masked out: scores there are
`-inf` (see `RAGPipeline.score_candidates`), so a softmax over a row gives it zero mass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence

import torch

SOURCES: Dict[str, int] = {"prior": 1, "posterior": 2, "cache": 4, "pool": 8}  # bit flags


def _flag(source: str) -> int:
    if source not in SOURCES:
        raise ValueError(f"unknown candidate source {source!r}; expected one of {', '.join(SOURCES)}")
    return SOURCES[source]


@dataclass
class Candidates:
    rows: torch.Tensor  # (B, C) long corpus rows; 0 at padding
    mask: torch.Tensor  # (B, C) bool: True for real candidates
    source: torch.Tensor  # (B, C) long bit flags of SOURCES; 0 at padding

    @staticmethod
    def of(rows: torch.Tensor, source: str) -> Candidates:
        """A dense (B, k) set of rows, all real, all from `source`."""
        rows = rows.long()
        return Candidates(rows, torch.ones_like(rows, dtype=torch.bool), torch.full_like(rows, _flag(source)))

    @staticmethod
    def from_lists(rows: Sequence[Sequence[int]], sources: Sequence[Sequence[int]], device=None) -> Candidates:
        """Ragged per-question lists of rows and their flags -> padded (B, C)."""
        C = max([len(r) for r in rows] + [1])
        out_rows = torch.zeros((len(rows), C), dtype=torch.long)
        out_src = torch.zeros((len(rows), C), dtype=torch.long)
        mask = torch.zeros((len(rows), C), dtype=torch.bool)
        for b, (r, s) in enumerate(zip(rows, sources)):
            out_rows[b, : len(r)] = torch.tensor(list(r), dtype=torch.long)
            out_src[b, : len(s)] = torch.tensor(list(s), dtype=torch.long)
            mask[b, : len(r)] = True
        return Candidates(out_rows.to(device), mask.to(device), out_src.to(device))

    def union(self, *others: Candidates) -> Candidates:
        """Per question, every distinct row of self then of each other set, in first-seen order; a
        row proposed by several sets keeps one slot with the OR of their flags."""
        sets = (self, *others)
        B = self.rows.shape[0]
        if any(c.rows.shape[0] != B for c in sets):
            raise ValueError("union of candidate sets with different numbers of questions")
        rows_out: List[List[int]] = []
        src_out: List[List[int]] = []
        for b in range(B):
            slot: Dict[int, int] = {}
            rows_b: List[int] = []
            src_b: List[int] = []
            for c in sets:
                for r, m, s in zip(c.rows[b].tolist(), c.mask[b].tolist(), c.source[b].tolist()):
                    if not m:
                        continue
                    if r in slot:
                        src_b[slot[r]] |= s
                    else:
                        slot[r] = len(rows_b)
                        rows_b.append(r)
                        src_b.append(s)
            rows_out.append(rows_b)
            src_out.append(src_b)
        return Candidates.from_lists(rows_out, src_out, self.rows.device)

    def has(self, source: str) -> torch.Tensor:
        """(B, C) bool: the candidate was proposed by `source`."""
        return (self.source & _flag(source)) != 0

    def sizes(self) -> torch.Tensor:
        """(B,) number of real candidates per question."""
        return self.mask.sum(-1)

    def position(self, rows: torch.Tensor) -> torch.Tensor:
        """rows (B,) -> (B,) position of each question's row in its set, -1 where it is absent."""
        hit = (self.rows == rows.view(-1, 1)) & self.mask  # (B, C)
        pos = hit.float().argmax(-1)  # (B,)
        return torch.where(hit.any(-1), pos, torch.full_like(pos, -1))

    def real_pairs(self) -> List[tuple]:
        """[(b, c, row)] for every real candidate, question-major."""
        return [(b, c, int(self.rows[b, c])) for b, c in self.mask.nonzero().tolist()]
