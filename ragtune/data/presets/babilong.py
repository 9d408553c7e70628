"""BabiLong: bAbI reasoning tasks hidden in long PG-19 haystacks (needle-in-a-haystack QA).

Kuratov et al. 2024, "BABILong: Testing the Limits of LLMs with Long Context Reasoning-in-a-
Haystack", NeurIPS Datasets and Benchmarks, arXiv 2406.10149.

Layout (`RMT-team/babilong`: one config per haystack length, `0k` ... `128k`, default `0k` via
`data.hf_config`; one split per task, `qa1` ... `qa10`, 100 samples each; `RMT-team/babilong-1k-
samples` has 1,000): {"input": the haystack with the task's facts, "question", "target"}.  Local
copies: files or subfolders named after the task (`qa1.json`, or the raw `qa1/0k.json` layout,
where the file name is the length).

Mapping: answers = [target]; each question's haystack is split into sentences, and every
`data.preset_options.sentences_per_passage` consecutive sentences become one passage with the id
"<question id>/<n>"; candidate_passage_ids = that question's passages.  No gold ids (the fields do
not mark the supporting facts).  `data.preset_options.tasks` picks the tasks (default [qa1]); they
are one pool from which train and dev are carved (`data.carve`), as BabiLong has no train split.
A corpus file does not apply (`data.corpus_path` is refused).

Caveat: the corpus is the union of all haystacks, and bAbI facts reuse the same names in every
sample ("Mary went to the kitchen"), so retrieval over the whole corpus mixes the facts of other
questions.  Read BabiLong with the question's own passages (a strategy that draws from
candidate_passage_ids), as the benchmark intends.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import List

from ...config import ConfigError, positive
from ..schema import Question
from .base import FILE_SUFFIXES, Preset, need_str

_TASK = re.compile(r"^qa\d+$")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass
class Options:
    tasks: List[str] = field(default_factory=lambda: ["qa1"])  # the task splits to pool
    sentences_per_passage: int = positive(1)

    def validate(self):
        bad = [t for t in self.tasks if not _TASK.match(t)]
        if bad or not self.tasks:
            raise ValueError(f"config key 'data.preset_options.tasks': expected task names qa1, qa2, ..., got {bad}")


class BabiLong(Preset):
    name = "babilong"
    summary = "BabiLong (input haystack split into passages, question, target); carved from the tasks"
    paper = "Kuratov et al. 2024, arXiv 2406.10149"
    hub_id = "RMT-team/babilong"
    hub_config = "0k"
    test_splits = ("test",)
    train_splits = ()
    own_paragraphs = True
    Options = Options

    def accepts_corpus(self) -> bool:
        return False

    def split_of_file(self, path: Path):
        for part in (path.stem.lower(), path.parent.name.lower()):
            if _TASK.match(part):
                return part
        return None

    def local_files(self, folder: Path, config: str):
        files = super().local_files(folder, config)
        for sub in sorted(d for d in folder.iterdir() if d.is_dir() and _TASK.match(d.name.lower())):
            files += [f for f in sorted(sub.iterdir()) if f.suffix.lower() in FILE_SUFFIXES and f.stem == config]
        return files

    def test_pool(self, available):
        """The chosen tasks, pooled; every one must be a split of the dataset."""
        missing = [t for t in self.opts.tasks if t not in available]
        if missing:
            raise ConfigError(
                f"config key 'data.preset_options.tasks': {missing} not among the dataset's splits {sorted(available)}"
            )
        return list(self.opts.tasks)

    def question(self, rec, where, ctx):
        p = ctx.problems
        haystack = need_str(rec, "input", where, p)
        text = need_str(rec, "question", where, p)
        target = need_str(rec, "target", where, p)
        if haystack is None or text is None or target is None:
            return None
        qid = f"{self.config}-{ctx.split}-{where[1]}"
        sents = [s for s in _SENTENCE_END.split(haystack.strip()) if s.strip()]
        k = self.opts.sentences_per_passage
        cands = [
            ctx.paragraphs.passage(f"{qid}/{j}", "", " ".join(sents[i : i + k]))
            for j, i in enumerate(range(0, len(sents), k))
        ]
        return Question(qid, text, [target], [], cands, {"task": ctx.split, "length": self.config})
