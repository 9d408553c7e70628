"""2WikiMultihopQA: multi-hop questions over Wikipedia with Wikidata evidence triples.

Ho et al. 2020, "Constructing A Multi-hop QA Dataset for Comprehensive Evaluation of Reasoning
Steps", COLING, arXiv 2011.01060.

Layout (the release's `train.json` / `dev.json`; hub mirrors such as `ohjoonhee/2WikiMultihopQA`,
the default, keep it; there is no official hub repository): {"_id", "type": comparison |
bridge_comparison | compositional | inference, "question", "answer", "context": [[title,
[sentences]], ...], "supporting_facts": [[title, sent_id], ...], "evidences": [[subject,
relation, object], ...]}.  Mirrors that store the nested fields as {"title": [...], "content":
[[...]]} dicts or as JSON strings are read too.

Mapping: answers = [answer]; gold = the context paragraphs of the supporting-fact titles, in the
order the supporting facts name them (not annotated as hop order); candidates = all context
paragraphs; meta["kind"] = comparison for comparison and bridge_comparison (independent hops),
bridge for compositional and inference; the evidence triples are kept in meta["evidences"].
Paragraphs become corpus passages (id = title + a hash of the text) unless `data.corpus_path` is
given.  The literature (and FlashRAG, Search-R1) reports on dev (12,576): the test split here;
dev is carved from train.
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

KINDS = {
    "comparison": "comparison",
    "bridge_comparison": "comparison",
    "compositional": "bridge",
    "inference": "bridge",
}


class TwoWikiMultihopQA(Preset):
    name = "2wikimultihopqa"
    summary = "2WikiMultihopQA (supporting_facts titles -> gold); test = dev"
    paper = "Ho et al. 2020, arXiv 2011.01060"
    hub_id = "ohjoonhee/2WikiMultihopQA"
    test_splits = ("validation",)
    train_splits = ("train",)
    own_paragraphs = True
    id_fields = ("_id", "id")

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
        context = structured(rec, "context", where, p)
        if context is not None:
            body_key = "content" if isinstance(context, dict) and "content" in context else "sentences"
            paragraphs = titled_sentences(context, "context", where, p, body_key)
        evidences = rec.get("evidences")
        if isinstance(evidences, str):
            evidences = structured(rec, "evidences", where, p, (list,))
        if len(p) > n:
            return None
        found = context_gold(ctx, paragraphs, titles, where, p)
        if found is None:
            return None
        gold, cands = found
        meta = {"kind": KINDS[kind], "type": kind}
        if evidences:
            meta["evidences"] = evidences
        return Question(qid, text, [answer], gold, unique(cands), meta)
