"""The FlashRAG unified format: many QA datasets in one layout, as Search-R1 and FlashRAG load them.

Jin et al. 2024, "FlashRAG: A Modular Toolkit for Efficient Retrieval-Augmented Generation
Research", arXiv 2405.13576 (WWW 2025 resource track).

Layout (`RUC-NLPIR/FlashRAG_datasets`, config = the dataset folder, e.g. `nq`, `triviaqa`,
`popqa`, `hotpotqa`, `2wikimultihopqa`, `musique`, `bamboogle`; required for the hub:
`data.hf_config`; a local folder of its `train/dev/test.jsonl` needs none): {"id", "question",
"golden_answers": [str, ...], "metadata": {...}}.  Splits: the test split is `test` where the
dataset has one, else `dev` (what Search-R1 evaluates on); dev is `dev` when test exists, else
carved from train; a test-only folder has train and dev carved from it.  meta["metadata"] keeps
the metadata, and meta["kind"] follows metadata.type where it names a HotpotQA / 2Wiki type.  No
gold passage ids (the unified format drops them).  Needs `data.corpus_path`: FlashRAG's own
`wiki18_100w.jsonl` is the `contents` encoding.
"""

from __future__ import annotations

import os

from ..schema import Problem, Question
from .base import Preset, need_id, need_str, need_str_list

_KINDS = {
    "bridge": "bridge",
    "comparison": "comparison",
    "bridge_comparison": "comparison",
    "compositional": "bridge",
    "inference": "bridge",
}


class FlashRAG(Preset):
    name = "flashrag"
    summary = "FlashRAG unified {id, question, golden_answers, metadata}; test = test, else dev"
    paper = "Jin et al. 2024, arXiv 2405.13576"
    hub_id = "RUC-NLPIR/FlashRAG_datasets"
    test_splits = ("test", "validation")
    dev_splits = ("validation",)
    train_splits = ("train",)

    def check_config(self, dc):
        local = bool(dc.hf_name) and os.path.exists(os.path.expanduser(dc.hf_name))
        if not local and not self.config:
            return "data.hf_config", f"the FlashRAG hub dataset needs its folder name ({self.hub_id} config, e.g. nq)"
        return None

    def question(self, rec, where, ctx):
        p = ctx.problems
        n = len(p)
        qid = need_id(rec, ("id",), where, p)
        text = need_str(rec, "question", where, p)
        answers = need_str_list(rec, "golden_answers", where, p)
        metadata = rec.get("metadata")
        if metadata is not None and not isinstance(metadata, dict):
            p.append(Problem(*where, "metadata", f"expected an object, got {type(metadata).__name__}"))
        if len(p) > n:
            return None
        meta = {"metadata": metadata} if metadata else {}
        kind = _KINDS.get((metadata or {}).get("type"))
        if kind:
            meta["kind"] = kind
        return Question(qid, text, answers, meta=meta)
