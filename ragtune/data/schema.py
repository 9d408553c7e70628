"""Domain objects shared by every part of ragtune: passages, questions, corpus, splits.

Kept free of I/O so that retrievers, generators and strategies can depend on it
without pulling in file formats.  `passage_text` is the single definition of what
an encoder or generator sees for a passage; use it everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator, NamedTuple, Sequence


@dataclass
class Passage:
    id: str
    title: str
    text: str


# meta["kind"] values whose hops do not depend on each other (see Question)
PARALLEL_KINDS = frozenset({"comparison"})


@dataclass
class Question:
    """One question with its answers and, optionally, its reasoning chain.

    gold_passage_ids: the gold passages in hop order.
    candidate_passage_ids: a pool (gold + distractors) for re-ranking setups.
    meta: free-form; meta["kind"] is the question type: "single", "bridge" or
        "comparison" (real datasets map their own types onto these).

    Optional chain of sub-questions, one per hop, both empty when unknown (and
    for single-hop questions, where the question itself is the only query):

    sub_queries[i]: the search query that finds hop i's gold passage,
        gold_passage_ids[i] (so, with gold ids, sub_queries is never the longer list).
    sub_answers[i]: the answer of sub_queries[i].  Bridge question: the
        intermediate entity, then the final answer (sub_answers[-1] is an
        answer).  Comparison question: the value of each compared entity, from
        which the answer follows.

    Bridge sub-queries are sequential: sub_queries[1] names the intermediate
    entity (sub_answers[0]), which is only known once hop 1 is answered.
    Comparison sub-queries are independent and can be issued in parallel.  Use
    `parallel_hops` (or `hops_parallel(q)`) rather than testing meta["kind"].
    """

    id: str
    question: str
    answers: list[str]
    gold_passage_ids: list[str] = field(default_factory=list)  # in hop order
    candidate_passage_ids: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)  # e.g. {"kind": "bridge"}
    sub_queries: list[str] = field(default_factory=list)  # one per hop, in hop order
    sub_answers: list[str] = field(default_factory=list)  # answer of each sub-query

    @property
    def parallel_hops(self) -> bool:
        """True when the hops are independent (comparison): sub-queries may be issued
        together.  False for bridge, single-hop and untyped questions: issue them in order."""
        return hops_parallel(self)


def hops_parallel(q: Question) -> bool:
    """Whether q's sub-queries are independent of each other (meta["kind"] "comparison").

    Unknown or missing kinds count as sequential, which is always safe."""
    return q.meta.get("kind") in PARALLEL_KINDS


def passage_text(p: Passage) -> str:
    """The text models see for a passage: "title. text" (just text when untitled)."""
    return f"{p.title}. {p.text}" if p.title else p.text


class Problem(NamedTuple):
    """One validation problem; line is 1-based (0 = the file as a whole)."""

    file: str
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.field}: {self.message}"


class DataError(Exception):
    """Raised with every problem found, never just the first."""

    def __init__(self, problems: Iterable[tuple]):
        self.problems = [Problem(*p) for p in problems]
        super().__init__(self.problems)  # args round-trip through pickle

    def __str__(self) -> str:
        return "\n".join(str(p) for p in self.problems)


class Corpus:
    """An ordered list of passages with an id -> row index."""

    def __init__(self, passages: Iterable[Passage]):
        self.passages: list[Passage] = list(passages)
        self._rows: dict[str, int] = {}
        problems = []
        for i, p in enumerate(self.passages):
            if p.id in self._rows:
                problems.append(
                    ("<corpus>", i + 1, "id", f"duplicate id {p.id!r} (first at row {self._rows[p.id] + 1})")
                )
            else:
                self._rows[p.id] = i
        if problems:
            raise DataError(problems)

    def __len__(self) -> int:
        return len(self.passages)

    def __getitem__(self, i: int) -> Passage:
        return self.passages[i]

    def __iter__(self) -> Iterator[Passage]:
        return iter(self.passages)

    def __contains__(self, pid: object) -> bool:
        return pid in self._rows

    def row(self, pid: str) -> int:
        try:
            return self._rows[pid]
        except KeyError:
            raise KeyError(f"passage id {pid!r} is not in the corpus ({len(self)} passages)") from None

    def get(self, pid: str) -> Passage:
        return self.passages[self.row(pid)]

    @property
    def ids(self) -> list[str]:
        return [p.id for p in self.passages]

    passage_text = staticmethod(passage_text)

    def texts(self, rows: Sequence[int] | None = None) -> list[str]:
        """Model-facing strings for the given rows (all rows when None)."""
        ps = self.passages if rows is None else (self.passages[r] for r in rows)
        return [passage_text(p) for p in ps]

    @property
    def model_texts(self) -> PassageTexts:
        """Every passage's model-facing string as one read-only sequence, made on access: the
        pipeline, the tokenizers and the caches read passage text through it, so the corpus's
        passages are the only copy of the text in memory (a 1M-passage wiki corpus is ~0.6 GB of
        text; a list of joined strings would double it). The same object every time (the retriever's
        token cache is keyed by it)."""
        view = self.__dict__.get("_model_texts")
        if view is None:
            view = self.__dict__["_model_texts"] = PassageTexts(self.passages)
        return view


class PassageTexts(Sequence[str]):
    """`passage_text` of each of `passages`, computed when read (no stored copy)."""

    def __init__(self, passages: Sequence[Passage]):
        self._passages = passages

    def __len__(self) -> int:
        return len(self._passages)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [passage_text(p) for p in self._passages[i]]
        return passage_text(self._passages[i])

    def __iter__(self) -> Iterator[str]:
        return (passage_text(p) for p in self._passages)


class ConcatTexts(Sequence[str]):
    """Several text sequences read as one (the tokenizer's training texts: passages + questions),
    without copying them into a list."""

    def __init__(self, *parts: Sequence[str]):
        self._parts = parts
        self._n = sum(len(p) for p in parts)

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._n))]
        if i < 0:
            i += self._n
        for part in self._parts:
            if 0 <= i < len(part):
                return part[i]
            i -= len(part)
        raise IndexError(i)

    def __iter__(self) -> Iterator[str]:
        return (t for part in self._parts for t in part)


@dataclass
class RAGData:
    corpus: Corpus
    train: list[Question]
    dev: list[Question]
    test: list[Question]

    def split(self, name: str) -> list[Question]:
        if name not in ("train", "dev", "test"):
            raise KeyError(f"unknown split {name!r}; expected train, dev or test")
        return getattr(self, name)
