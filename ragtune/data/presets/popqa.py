"""PopQA: entity-centric questions over Wikidata relations, across the popularity spectrum.

Mallen et al. 2023, "When Not to Trust Language Models: Investigating Effectiveness of Parametric
and Non-Parametric Memories", ACL, arXiv 2212.10511.

Layout (`akariasai/PopQA`, `test.tsv`): id, subj, prop, obj, subj_id, prop_id, obj_id, s_aliases,
o_aliases, s_uri, o_uri, s_wiki_title, o_wiki_title, s_pop, o_pop, question, possible_answers.
**`possible_answers` is a JSON string** ('["Kennedy", "John F. Kennedy"]'): decoded with
json.loads and required to be a non-empty list of strings (a copy that already holds a list is
read as it is).  There is only a test split (~14.3k), so train and dev are carved from it
(`data.carve`); the test set is then smaller than the published one, train, dev and test come
from one distribution, and result.json says so.  No gold passages (s_wiki_title, the subject's
article, is kept in meta).  Needs `data.corpus_path`.
"""

from __future__ import annotations

from ..schema import Question
from .base import Preset, check_str_list, need_id, need_str, structured, unique

_META = ("prop", "s_wiki_title", "s_pop", "subj", "obj")


class PopQA(Preset):
    name = "popqa"
    summary = "PopQA (possible_answers is a JSON string); test only: train/dev carved"
    paper = "Mallen et al. 2023, arXiv 2212.10511"
    hub_id = "akariasai/PopQA"
    test_splits = ("test",)
    train_splits = ()

    def question(self, rec, where, ctx):
        p = ctx.problems
        qid = need_id(rec, ("id",), where, p)
        text = need_str(rec, "question", where, p)
        raw = structured(rec, "possible_answers", where, p, (list,))
        answers = check_str_list(raw, "possible_answers", where, p) if raw is not None else None
        if qid is None or text is None or answers is None:
            return None
        meta = {"kind": "single", **{k: rec[k] for k in _META if rec.get(k) not in (None, "")}}
        return Question(qid, text, unique(answers), meta=meta)
