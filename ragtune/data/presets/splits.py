"""Deterministic carving of the splits a dataset lacks (the plan of which source split is which is
ragtune.data.presets._plan).

What: ragtune needs train, dev and test.  The test split is always the one the literature reports
on (NQ-open's and TriviaQA's `validation`, HotpotQA's, MuSiQue's and 2Wiki's dev, FlashRAG's test
or else dev).  A dev split the dataset lacks is carved from train; a dataset with only a test split
(PopQA, Bamboogle, BabiLong) has train and dev carved from that one split, which also shrinks the
test set below the published one.

How: each question gets the key sha256("<seed>\\0<question text, lower-cased, whitespace
collapsed>"); questions are ordered by key (then id), and consecutive fractions of that order
become the carved splits.  So the carving does not depend on the order of the rows, the same seed
always gives the same splits, the parts are disjoint, and identical question texts land on the same
side, so the carving never creates a train/dev leak of its own.

Why in result.json: a dev carved from train, or a test that is not the whole published test, is
not the published setting; the provenance says exactly what was done.
"""

from __future__ import annotations

import hashlib
from typing import Dict, List, Sequence, Tuple

from ..schema import Question

METHOD = (
    "questions ordered by sha256('<seed>\\0<question lower-cased, whitespace collapsed>') then id; "
    "consecutive fractions of that order, identical question texts kept together"
)


def _key(q: Question, seed: int) -> str:
    return hashlib.sha256(f"{seed}\0{' '.join(q.question.lower().split())}".encode()).hexdigest()


def carve(
    questions: Sequence[Question], parts: Sequence[Tuple[str, float]], rest: str, seed: int
) -> Dict[str, List[Question]]:
    """Split `questions` into `parts` ((name, fraction) in order) and `rest` (what is left).

    Each part gets round(fraction * n) questions (at least one while more than one is left, so a
    small dataset still has a dev question), extended to keep a run of identical texts together.
    Within a part the questions keep their original order."""
    n = len(questions)
    keys = [_key(q, seed) for q in questions]
    order = sorted(range(n), key=lambda i: (keys[i], questions[i].id))
    out: Dict[str, List[int]] = {}
    pos = 0
    for name, frac in parts:
        left = n - pos
        m = min(max(1, round(frac * n)), left - 1) if left > 1 else 0
        end = pos + m
        while 0 < end < n and end > pos and keys[order[end]] == keys[order[end - 1]]:
            end += 1
        out[name] = sorted(order[pos:end])
        pos = end
    out[rest] = sorted(order[pos:])
    return {name: [questions[i] for i in idx] for name, idx in out.items()}


def describe(source: str, parts: Sequence[Tuple[str, float]], rest: str, seed: int, sizes: Dict[str, int]) -> dict:
    return {
        "from": source,
        "fractions": {name: frac for name, frac in parts},
        "rest": rest,
        "seed": seed,
        "method": METHOD,
        "rows": dict(sizes),
    }
