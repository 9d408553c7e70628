"""TriviaQA, open-domain: trivia questions with the aliases of their answer entity.

Joshi et al. 2017, "TriviaQA: A Large Scale Distantly Supervised Challenge Dataset for Reading
Comprehension", ACL, arXiv 1705.03551; the open-domain setting: Lee et al. 2019 (ORQA), arXiv
1906.00300.

Layout (`mandarjoshi/trivia_qa`, config `unfiltered.nocontext` by default; `rc.nocontext` also
works): {"question", "question_id", "question_source", "answer": {"aliases", "normalized_aliases",
"value", "normalized_value", ...}} (the `rc` configs add entity_pages / search_results, unused).
Answers are `answer.aliases` (`data.preset_options.answers=normalized_aliases` for the other
list).  The hub's `test` split hides its answers, so the open-domain literature (ORQA, DPR, RAG,
FlashRAG's `triviaqa`) reports on the unfiltered `validation` (11,313) and carves dev from train:
so does this preset.  No gold passages.  Needs `data.corpus_path`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...config import choice
from ..schema import Question
from .base import Preset, need_id, need_str, need_str_list, unique


@dataclass
class Options:
    answers: str = choice("aliases", "aliases", "normalized_aliases")  # which answer list


class TriviaQA(Preset):
    name = "triviaqa"
    summary = "TriviaQA open-domain (answer.aliases); test = unfiltered validation"
    paper = "Joshi et al. 2017, arXiv 1705.03551; open setting: Lee et al. 2019"
    hub_id = "mandarjoshi/trivia_qa"
    hub_config = "unfiltered.nocontext"
    test_splits = ("validation",)
    train_splits = ("train",)
    id_fields = ("question_id",)
    Options = Options

    def question(self, rec, where, ctx):
        qid = need_id(rec, self.id_fields, where, ctx.problems)
        text = need_str(rec, "question", where, ctx.problems)
        answers = need_str_list(rec, f"answer.{self.opts.answers}", where, ctx.problems)
        if qid is None or text is None or answers is None:
            return None
        meta = {"kind": "single"}
        if isinstance(rec.get("question_source"), str):
            meta["question_source"] = rec["question_source"]
        return Question(qid, text, unique(answers), meta=meta)
