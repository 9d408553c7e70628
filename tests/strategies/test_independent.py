"""independent: its retriever loss is InfoNCE with in-batch and mined negatives, recomputed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import build, step_ctx, tiny_cfg


def _pick_batch(train):
    """A multi-gold question plus another one sharing one of its gold passages (if any)."""
    multi = next(q for q in train if len(q.gold_passage_ids) >= 2)
    share = [q for q in train if q is not multi and set(q.gold_passage_ids) & set(multi.gold_passage_ids)]
    other = share[0] if share else next(q for q in train if q is not multi)
    return [multi, other]


@pytest.mark.parametrize("hard", [0, 2])
def test_independent_retriever_loss_is_infonce(tmp_path, hard):
    cfg = tiny_cfg(tmp_path, "strategy.name=independent", f"strategy.hard_negatives={hard}")
    data, m, _ = build(cfg)
    for p in m.parameters():
        p.requires_grad_(False)
    for p in m.retriever.query_encoder.parameters():  # the retriever phase: query tower only
        p.requires_grad_(True)
    batch = _pick_batch(data.train)
    loss, logs = m.strategy.loss(batch, m, step_ctx(m, "retriever"))
    assert loss.requires_grad

    with torch.no_grad():
        q = m.retriever.encode_queries([x.question for x in batch]).double()
    emb = m.index.emb.double()
    tau = cfg.retriever.temperature
    pairs = [(b, m.corpus.row(pid)) for b, x in enumerate(batch) for pid in x.gold_passage_ids]
    cands = sorted({r for _, r in pairs})  # in-batch positives, each once
    terms = []
    for b, pos in pairs:
        own = {m.corpus.row(pid) for pid in batch[b].gold_passage_ids}
        cols = [r for r in cands if r == pos or r not in own]  # own other gold passages are no negatives
        ranked = torch.argsort(emb @ q[b], descending=True).tolist()
        cols += [r for r in ranked if r not in own and r not in cands][:hard]  # top non-gold, not in-batch
        logits = torch.stack([q[b] @ emb[r] for r in cols]) / tau
        terms.append(float(torch.logsumexp(logits, 0) - q[b] @ emb[pos] / tau))
    want = sum(terms) / len(terms)
    assert logs["pairs"] == len(pairs) >= 3
    assert math.isclose(float(loss.detach()), want, rel_tol=1e-4, abs_tol=1e-5)


def test_mined_negatives_never_repeat_an_in_batch_candidate(tmp_path, monkeypatch):
    """The best-ranked non-gold passage of question 0 is made question 1's gold passage: it is an
    in-batch candidate, so mining must skip it (else it would sit twice in question 0's softmax)."""
    import dataclasses

    from ragtune.strategies import independent

    cfg = tiny_cfg(tmp_path, "strategy.name=independent", "strategy.hard_negatives=2")
    data, m, _ = build(cfg)
    q0, q1 = data.train[0], data.train[1]
    with torch.no_grad():
        emb = m.retriever.encode_queries([q0.question])[0]
    own = {m.corpus.row(p) for p in q0.gold_passage_ids}
    top = next(r for r in torch.argsort(m.index.emb @ emb, descending=True).tolist() if r not in own)
    batch = [q0, dataclasses.replace(q1, gold_passage_ids=[m.corpus[top].id])]
    seen = {}
    real = independent.mine_negatives

    def spy(rag, q, gold_sets, exclude, n):
        seen["rows"], seen["exclude"] = real(rag, q, gold_sets, exclude, n), exclude
        return seen["rows"]

    monkeypatch.setattr(independent, "mine_negatives", spy)
    m.strategy.loss(batch, m, step_ctx(m, "retriever"))
    assert top in seen["exclude"]
    assert not set(seen["rows"].reshape(-1).tolist()) & seen["exclude"]
    assert seen["rows"].shape[1] == 2
