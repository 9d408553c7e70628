"""NQ-open: Natural Questions restricted to short answers of at most five tokens, open-domain.

Kwiatkowski et al. 2019, "Natural Questions: a Benchmark for Question Answering Research", TACL;
the open-domain split: Lee et al. 2019, "Latent Retrieval for Weakly Supervised Open Domain
Question Answering" (ORQA), ACL, arXiv 1906.00300.

Layout (`google-research-datasets/nq_open`, config `nq_open`): {"question": str, "answer":
[str, ...]}; no id and no passages.  Splits: train 87,925 and validation 3,610, which *is* the
standard NQ-open test set (DPR, RAG, FiD, Atlas and Search-R1 all report on it); dev is carved from
train (DPR's split of it is 79,168 train / 8,757 dev, which FlashRAG's `nq` config holds).  Ids are
"<split>-<line>".  No gold passages: suits the label-free strategies.  Needs `data.corpus_path`
(wiki-18).
"""

from __future__ import annotations

from ..schema import Question
from .base import Preset, need_str, need_str_list


class NQOpen(Preset):
    name = "nq_open"
    summary = "NQ-open (question, answer list); test = validation"
    paper = "Kwiatkowski et al. 2019 (TACL); open split: Lee et al. 2019, arXiv 1906.00300"
    hub_id = "google-research-datasets/nq_open"
    hub_config = "nq_open"
    test_splits = ("validation",)
    train_splits = ("train",)

    def question(self, rec, where, ctx):
        text = need_str(rec, "question", where, ctx.problems)
        answers = need_str_list(rec, "answer", where, ctx.problems)
        if text is None or answers is None:
            return None
        return Question(self.default_id(where, ctx), text, answers, meta={"kind": "single"})
