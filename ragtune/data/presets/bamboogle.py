"""Bamboogle: 125 hand-written two-hop questions that a search engine cannot answer directly.

Press et al. 2023, "Measuring and Narrowing the Compositionality Gap in Language Models" (Self-Ask),
Findings of EMNLP, arXiv 2210.03350.

Layout (`chiayewken/bamboogle`): {"Question", "Answer"}: **the field names are capitalised**; a
row with lower-case `question` / `answer` is reported (it is not this dataset's layout).  No ids
("test-<line>") and no passages.  Only a test split (125): train and dev are carved from it
(`data.carve`), so all three come from one distribution and the test set is smaller than the
published one; result.json says so.  meta["kind"] = bridge (every question is two-hop).  Needs
`data.corpus_path`.
"""

from __future__ import annotations

from ..schema import Question
from .base import Preset, need_str, present


class Bamboogle(Preset):
    name = "bamboogle"
    summary = "Bamboogle (capitalised Question/Answer); test only: train/dev carved"
    paper = "Press et al. 2023, arXiv 2210.03350"
    hub_id = "chiayewken/bamboogle"
    test_splits = ("test",)
    train_splits = ()

    def question(self, rec, where, ctx):
        p = ctx.problems
        hint = lambda k: (
            f"Bamboogle's fields are capitalised; this row has {k.lower()!r}" if present(rec, k.lower()) else ""
        )
        text = need_str(rec, "Question", where, p, hint("Question"))
        answer = need_str(rec, "Answer", where, p, hint("Answer"))
        if text is None or answer is None:
            return None
        return Question(self.default_id(where, ctx), text, [answer], meta={"kind": "bridge"})
