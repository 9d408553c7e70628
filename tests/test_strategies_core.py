"""Every registered strategy trains and evaluates end to end; independent's retriever loss by hand."""
from __future__ import annotations

import math

import pytest
import torch

from helpers import build, load_json, tiny_cfg
from ragtune import run
from ragtune.cost import KINDS, TRAINING_KINDS
from ragtune.strategies import REGISTRY


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_strategy_trains_and_evaluates(tmp_path, name):
    res = run.train(tiny_cfg(tmp_path, f"strategy.name={name}", "train.steps=2"))
    assert res["status"] == "ok" and res["reason"] == "" and res["strategy"] == name
    assert load_json(tmp_path / "result.json")["status"] == "ok"
    for split in ("dev", "test"):
        s = res[split]
        for key in ("em", "f1", "recall@1", "recall@2"):
            assert 0.0 <= float(s[key]) <= 1.0, (split, key)
        assert s["n"] == 16  # tiny.yaml: 16 dev and 16 test questions
        assert float(s["recall@1"]) <= float(s["recall@2"])
    flops = res["cost"]["flops"]
    assert set(KINDS) <= set(flops)
    assert flops["total_train"] == sum(flops[k] for k in TRAINING_KINDS)
    assert flops["total"] == flops["total_train"] + flops["eval"]
    assert flops["eval"] > 0 and flops["index"] > 0  # evaluation ran; the index was built
    by_comp = res["cost"]["flops_by_component"]
    phases = REGISTRY[name](REGISTRY[name].Options(), None).phases()
    trained = {c for p in phases for c in p.trains}
    if name == "none":
        assert flops["train"] == 0 and res["steps"] == 0 and not phases
    else:
        assert flops["train"] > 0 and res["steps"] == 2
        assert (tmp_path / "final.pt").exists()
    for comp in ("query_encoder", "doc_encoder", "generator"):
        charged_train = by_comp.get(comp, {}).get("train", 0)
        assert (charged_train > 0) == (comp in trained), comp


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
    loss, logs = m.strategy.loss(batch, m, 0)
    assert loss.requires_grad

    with torch.no_grad():
        q = m.retriever.encode_queries([x.question for x in batch]).double()
    emb = m.index.emb.double()
    tau = cfg.retriever.temperature
    pairs = [(b, m.corpus.row(pid)) for b, x in enumerate(batch) for pid in x.gold_passage_ids]
    cands = sorted({r for _, r in pairs})                     # in-batch positives, each once
    terms = []
    for b, pos in pairs:
        own = {m.corpus.row(pid) for pid in batch[b].gold_passage_ids}
        cols = [r for r in cands if r == pos or r not in own]  # own other gold passages are no negatives
        ranked = torch.argsort(emb @ q[b], descending=True).tolist()
        cols += [r for r in ranked if r not in own][:hard]     # top-ranked non-gold passages
        logits = torch.stack([q[b] @ emb[r] for r in cols]) / tau
        terms.append(float(torch.logsumexp(logits, 0) - q[b] @ emb[pos] / tau))
    want = sum(terms) / len(terms)
    assert logs["pairs"] == len(pairs) >= 3
    assert math.isclose(float(loss.detach()), want, rel_tol=1e-4, abs_tol=1e-5)
