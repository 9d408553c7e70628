"""HotpotQA: two-hop questions (bridge and comparison) over Wikipedia abstracts.

Yang et al. 2018, "HotpotQA: A Dataset for Diverse, Explainable Multi-hop Question Answering",
EMNLP, arXiv 1809.09600.

Layout (`hotpotqa/hotpot_qa`, configs `distractor` and `fullwiki`): {"id", "question", "answer",
"type": bridge|comparison, "level", "supporting_facts": {"title": [...], "sent_id": [...]},
"context": {"title": [...], "sentences": [[...], ...]}}.  The original release files
(`hotpot_train_v1.1.json`, `hotpot_dev_distractor_v1.json`, read by Q-RAG) spell the same as
`_id` and lists of pairs ([[title, sent_id]], [[title, [sentences]]]); both are read.

Settings (`data.hf_config`, also for local files; default distractor):
  distractor  each question's ten context paragraphs (two gold, eight distractors) become corpus
              passages (id = title + a hash of the text, shared by the questions that share the
              paragraph) unless `data.corpus_path` is given; candidate_passage_ids = those ten;
              gold = the paragraphs of the supporting-fact titles.
  fullwiki    open-domain: needs `data.corpus_path`; gold = the first corpus passage of each
              supporting-fact title (the article's opening, what HotpotQA's abstracts are); a
              question with a title the corpus lacks gets no gold ids (counted in result.json).
Gold ids are in the order the supporting facts name their titles: HotpotQA does not annotate hop
order.  The test splits hide their answers, so the literature reports on validation (7,405): that
is the test split here, and dev is carved from train.  No sub-queries (none annotated).
"""

from __future__ import annotations

from ..schema import Problem, Question
from .base import (
    Preset,
    context_gold,
    fact_titles,
    need_id,
    need_str,
    structured,
    titled_sentences,
    unique,
)

SETTINGS = ("distractor", "fullwiki")
KINDS = ("bridge", "comparison")


class HotpotQA(Preset):
    name = "hotpotqa"
    summary = "HotpotQA distractor / fullwiki (data.hf_config); test = validation"
    paper = "Yang et al. 2018, arXiv 1809.09600"
    hub_id = "hotpotqa/hotpot_qa"
    hub_config = "distractor"
    test_splits = ("validation",)
    train_splits = ("train",)
    own_paragraphs = True
    id_fields = ("id", "_id")

    @property
    def fullwiki(self) -> bool:
        return self.config == "fullwiki"

    def needs_corpus(self) -> bool:
        return self.fullwiki

    def check_config(self, dc):
        if self.config not in SETTINGS:
            return "data.hf_config", f"hotpotqa setting {self.config!r} is not one of {', '.join(SETTINGS)}"
        return None

    def question(self, rec, where, ctx):
        p = ctx.problems
        n = len(p)
        qid = need_id(rec, self.id_fields, where, p)
        text = need_str(rec, "question", where, p)
        answer = need_str(rec, "answer", where, p)
        kind = need_str(rec, "type", where, p)
        if kind is not None and kind not in KINDS:
            p.append(Problem(*where, "type", f"{kind!r} is not one of {', '.join(KINDS)}"))
        titles = paragraphs = None
        sf = structured(rec, "supporting_facts", where, p)
        if sf is not None:
            titles = fact_titles(sf, "supporting_facts", where, p)
        if not self.fullwiki:
            context = structured(rec, "context", where, p)
            if context is not None:
                paragraphs = titled_sentences(context, "context", where, p, "sentences")
        if len(p) > n:
            return None
        meta = {"kind": kind}
        if rec.get("level") is not None:
            meta["level"] = rec["level"]
        if self.fullwiki:
            gold = [ctx.paragraphs.paragraph(t, "") for t in titles]
            if None in gold:
                ctx.stats["without_gold_title_not_in_corpus"] += 1
                gold = []
            return Question(qid, text, [answer], gold, [], meta)
        found = context_gold(ctx, paragraphs, titles, where, p)
        if found is None:
            return None
        gold, cands = found
        return Question(qid, text, [answer], gold, unique(cands), meta)
