"""MuSiQue: multi-hop questions composed from single-hop ones (2 to 4 hops), with distractors.

Trivedi et al. 2022, "MuSiQue: Multihop Questions via Single-hop Question Composition", TACL,
arXiv 2108.00573.

Layout (the release's `musique_ans_v1.0_{train,dev}.jsonl`; hub mirrors such as
`dgslibisey/MuSiQue`, the default, keep it; there is no official hub repository):
{"id": "2hop__...", "question", "answer", "answer_aliases": [...], "answerable": bool,
 "paragraphs": [{"idx", "title", "paragraph_text", "is_supporting"}, ...] (20 per question),
 "question_decomposition": [{"id", "question", "answer", "paragraph_support_idx"}, ...]}.

Mapping: answers = [answer] + answer_aliases.  Gold ids are in hop order: the paragraph that
`question_decomposition[i].paragraph_support_idx` names is gold[i] (and the set must be exactly the
paragraphs marked `is_supporting`).  sub_queries[i] is decomposition step i's question with each
"#k" replaced by step k's answer (so sub_queries[1] names the intermediate entity, as
ragtune.data.schema.Question asks) and sub_answers[i] its answer.  The paragraphs become corpus
passages (id = title + a hash of the text) unless `data.corpus_path` is given, where they are
looked up by title.  Unanswerable questions (the `full` version) are skipped and counted unless
`data.preset_options.answerable_only=false`.  Test answers are withheld, so the literature reports
on dev (2,417): that is the test split here; dev is carved from train.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..schema import Problem, Question
from .base import Preset, need_id, need_str, structured, unique, value

_REF = re.compile(r"#(\d+)")


@dataclass
class Options:
    answerable_only: bool = True  # skip (and count) questions marked answerable=false


class MuSiQue(Preset):
    name = "musique"
    summary = "MuSiQue (hop order from question_decomposition); test = dev"
    paper = "Trivedi et al. 2022, arXiv 2108.00573"
    hub_id = "dgslibisey/MuSiQue"
    test_splits = ("validation",)
    train_splits = ("train",)
    own_paragraphs = True
    Options = Options

    def question(self, rec, where, ctx):
        p = ctx.problems
        n = len(p)
        answerable = rec.get("answerable", True)
        if not isinstance(answerable, bool):
            p.append(Problem(*where, "answerable", f"expected true or false, got {answerable!r}"))
            return None
        if not answerable and self.opts.answerable_only:
            ctx.stats["skipped_unanswerable"] += 1
            return None
        qid = need_id(rec, ("id",), where, p)
        text = need_str(rec, "question", where, p)
        answer = need_str(rec, "answer", where, p)
        aliases = rec.get("answer_aliases") or []
        if not isinstance(aliases, list) or not all(isinstance(a, str) and a.strip() for a in aliases):
            p.append(Problem(*where, "answer_aliases", "expected a list of non-empty strings"))
        paras = structured(rec, "paragraphs", where, p, (list,))
        steps = structured(rec, "question_decomposition", where, p, (list,))
        if len(p) > n:
            return None
        by_idx, supporting, cands = {}, [], []
        for i, para in enumerate(paras):
            key = f"paragraphs[{i}]"
            if not isinstance(para, dict):
                p.append(Problem(*where, key, "expected an object"))
                return None
            idx = value(para, "idx")
            title = need_str(para, "title", where, [])
            body = para.get("paragraph_text")
            if not isinstance(idx, int) or isinstance(idx, bool) or idx in by_idx:
                p.append(Problem(*where, f"{key}.idx", f"expected a unique int, got {idx!r}"))
            elif title is None:
                p.append(Problem(*where, f"{key}.title", "expected a non-empty string"))
            elif not isinstance(body, str) or not body.strip():
                p.append(Problem(*where, f"{key}.paragraph_text", "expected a non-empty string"))
            else:
                pid = ctx.paragraphs.paragraph(title, body.strip())
                by_idx[idx] = pid
                if pid is not None:
                    cands.append(pid)
                if para.get("is_supporting") is True:
                    supporting.append(idx)
        gold_idx, sub_q, sub_a = [], [], []
        for i, step in enumerate(steps):
            key = f"question_decomposition[{i}]"
            if not isinstance(step, dict):
                p.append(Problem(*where, key, "expected an object"))
                return None
            q = need_str(step, "question", where, [])
            a = need_str(step, "answer", where, [])
            if q is None or a is None:
                p.append(
                    Problem(*where, f"{key}.{'question' if q is None else 'answer'}", "expected a non-empty string")
                )
                return None
            for ref in _REF.findall(q):
                if not 1 <= int(ref) <= i:
                    p.append(Problem(*where, f"{key}.question", f"#{ref} refers to no earlier step"))
                    return None
            sub_q.append(_REF.sub(lambda m: sub_a[int(m.group(1)) - 1], q))
            sub_a.append(a)
            support = step.get("paragraph_support_idx")
            if support is None and not answerable:
                continue
            if not isinstance(support, int) or support not in by_idx:
                p.append(Problem(*where, f"{key}.paragraph_support_idx", f"{support!r} is no paragraph's idx"))
                return None
            gold_idx.append(support)
        if len(p) > n:
            return None
        if answerable and sorted(set(gold_idx)) != sorted(supporting):
            p.append(
                Problem(
                    *where,
                    "question_decomposition",
                    f"the steps' supporting paragraphs {sorted(set(gold_idx))} are not the paragraphs "
                    f"marked is_supporting {sorted(supporting)}",
                )
            )
            return None
        gold = [by_idx[i] for i in gold_idx]
        if None in gold:  # data.corpus_path given: a supporting title the corpus lacks
            ctx.stats["without_gold_title_not_in_corpus"] += 1
            gold = []
        elif len(set(gold)) != len(gold):  # gold ids are unique; hop order would be ambiguous
            ctx.stats["without_gold_two_steps_one_passage"] += 1
            gold = []
        meta = {"kind": "bridge", "hops": len(steps), "type": qid.split("__")[0], "answerable": answerable}
        if not sub_q or (gold and len(sub_q) > len(gold)):
            sub_q, sub_a = [], []
        return Question(qid, text, unique([answer, *aliases]), gold, unique(cands), meta, sub_q, sub_a)
