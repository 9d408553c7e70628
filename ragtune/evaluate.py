"""Evaluation: the same decoder and the same metrics for every strategy.

The core decoder is RAG-Sequence "thorough" decoding (Lewis et al. 2020): retrieve the top-K,
greedily decode one candidate answer from each passage, then rescore every distinct candidate y
by the marginal log sum_k p(z_k|x) p_G(y|x,z_k) over all K passages and keep the best. A strategy
with its own inference procedure (multi-step retrieval, a search agent) overrides
`Strategy.predict`. Everything here runs under `ledger.evaluating()`: reported, never counted as
training cost.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch

from ragtune import metrics
from ragtune.data import Question


def oracle_retrieval(m, batch: Sequence[Question], k: int):
    """Gold passages first, padded to k with the best retrieved non-gold ones (an upper bound)."""
    q = m.encode_questions([x.question for x in batch])
    _, top = m.index.search(q, k)
    rows = []
    for x, cand in zip(batch, top.tolist()):
        gold = m.rows_of(x.gold_passage_ids)[:k]
        rows.append(gold + [r for r in cand if r not in gold][: k - len(gold)])
    return m.make_retrieval(q, torch.tensor(rows, device=top.device))


@torch.no_grad()
def core_predict(m, batch: Sequence[Question], k: int, oracle: bool = False) -> List[dict]:
    """RAG-Sequence thorough decoding for a batch; returns {prediction, retrieved_ids} per question."""
    questions = [q.question for q in batch]
    ret = oracle_retrieval(m, batch, k) if oracle else m.retrieve(questions, k)
    prior = torch.log_softmax(ret.scores.float(), dim=-1)                    # (B, K)
    flat_q = [q for q in questions for _ in range(k)]
    flat_p = [p for ps in ret.texts for p in ps]
    cands = m.generator.generate(flat_q, flat_p)                              # (B*K,)
    per_q = [list(dict.fromkeys(cands[b * k:(b + 1) * k])) for b in range(len(batch))]
    rq, rp, ra, owner = [], [], [], []
    for b, cs in enumerate(per_q):
        for c in cs:
            rq.append(questions[b]); rp.append(ret.texts[b]); ra.append(c); owner.append(b)
    tok_lp, mask = m.generator.answer_logprobs(rq, rp, ra)                    # (R, K, T), (R, T)
    seq_lp = tok_lp.sum(-1)                                                   # (R, K)
    marginal = torch.logsumexp(prior[owner] + seq_lp, dim=-1)                 # (R,)
    best: Dict[int, tuple] = {}
    for r, b in enumerate(owner):
        if b not in best or marginal[r] > best[b][0]:
            best[b] = (float(marginal[r]), ra[r])
    return [{"prediction": best[b][1], "retrieved_ids": ret.ids[b]} for b in range(len(batch))]


@torch.no_grad()
def retrieved_ids(m, questions: Sequence[Question], k: int, batch_size: int) -> List[List[str]]:
    """Single-step top-k passage ids for recall@k."""
    out: List[List[str]] = []
    for i in range(0, len(questions), batch_size):
        chunk = [q.question for q in questions[i:i + batch_size]]
        out += m.retrieve(chunk, k).ids
    return out


@torch.no_grad()
def evaluate(m, questions: Sequence[Question], k: int, recall_ks: Sequence[int], batch_size: int,
             oracle: bool = False) -> Dict[str, object]:
    """Scores and per-question predictions on `questions` with the strategy's (or core) predictor."""
    modes = [(mod, mod.training) for mod in m.modules()]
    m.eval()
    preds: List[dict] = []
    with m.ledger.evaluating():
        for i in range(0, len(questions), batch_size):
            batch = questions[i:i + batch_size]
            out = None if oracle else m.strategy.predict(batch, m, k)
            preds += out if out is not None else core_predict(m, batch, k, oracle)
        kmax = min(max(list(recall_ks) + [k]), len(m.corpus))
        single = retrieved_ids(m, questions, kmax, batch_size)
    for mod, mode in modes:
        mod.training = mode
    return score(questions, preds, single, recall_ks)


def score(questions: Sequence[Question], preds: List[dict], single: List[List[str]], recall_ks) -> Dict[str, object]:
    golds = [q.answers for q in questions]
    texts = [p["prediction"] for p in preds]
    ems = [metrics.exact_match(p, g) for p, g in zip(texts, golds)]
    f1s = [metrics.token_f1(p, g) for p, g in zip(texts, golds)]
    n = max(len(questions), 1)
    out: Dict[str, object] = {"em": sum(ems) / n, "f1": sum(f1s) / n, "n": len(questions),
                              "normalization": metrics.NORMALIZATION}
    gold_ids = [q.gold_passage_ids for q in questions]
    for k in recall_ks:
        out[f"recall@{k}"] = metrics.recall_at_k(single, gold_ids, k)
    kinds = sorted({q.meta.get("kind", "") for q in questions} - {""})
    for kind in kinds:
        idx = [i for i, q in enumerate(questions) if q.meta.get("kind") == kind]
        out[f"em/{kind}"] = sum(ems[i] for i in idx) / len(idx)
        for k in recall_ks:
            out[f"recall@{k}/{kind}"] = metrics.recall_at_k([single[i] for i in idx], [gold_ids[i] for i in idx], k)
    rows = [{"id": q.id, "question": q.question, "answers": q.answers, "prediction": p["prediction"],
             "retrieved_ids": p.get("retrieved_ids", []), "gold_passage_ids": q.gold_passage_ids,
             "em": e, "f1": f, **{k: v for k, v in p.items() if k not in ("prediction", "retrieved_ids")}}
            for q, p, e, f in zip(questions, preds, ems, f1s)]
    out["predictions"] = rows
    return out
