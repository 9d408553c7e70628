"""The evaluator: scores over the predictor's own retrieved ids, isolated predict failures, declared
metrics, timing and FLOPs per question, one question encoding, and METRICS == what is emitted."""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from ragtune import decoding, metrics
from ragtune.evaluate import evaluate
from ragtune.strategy import Strategy

from helpers import build, tiny_cfg

K, BS = 2, 4


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cfg = tiny_cfg(tmp_path_factory.mktemp("run"), "strategy.name=none", "generator.max_new_tokens=4")
    data, m, ledger = build(cfg)
    for p in m.parameters():
        p.requires_grad_(False)
    return cfg, data, m, ledger


class Scripted(Strategy):
    """predict = a function of (batch, rag, ctx); declares one reported metric."""

    name = "scripted"
    reports = {"hops": "retrieval hops"}

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def phases(self):
        return []

    def predict(self, batch, rag, ctx):
        return self.fn(batch, rag, ctx)


@contextmanager
def strategy(m, s):
    real = m.strategy
    m.strategy = s
    try:
        yield s
    finally:
        m.strategy = real


def _charged(ledger, fn):
    """(result, {(component, activity): (flops, calls)} charged by fn)."""
    before = ledger.deterministic_view()
    out = fn()
    after = ledger.deterministic_view()
    delta = {}
    for comp, acts in after["flops_by_component"].items():
        for act, v in acts.items():
            old = before["flops_by_component"].get(comp, {}).get(act, 0)
            calls = after["calls_by_component"][comp][act] - before["calls_by_component"].get(comp, {}).get(act, 0)
            if v - old or calls:
                delta[(comp, act)] = (v - old, calls)
    return out, delta


def _has_gold(qs):
    return [q for q in qs if q.gold_passage_ids]


def test_recall_over_predictor_ids_is_not_single_step_recall(built):
    _, data, m, _ = built
    qs = _has_gold(data.dev)[:8]
    core = evaluate(m, qs, K, [1, 2], BS)
    # a predictor that "retrieves" exactly the gold passages, in order
    with strategy(
        m, Scripted(lambda b, rag, ctx: [{"prediction": "x", "retrieved_ids": list(q.gold_passage_ids)} for q in b])
    ):
        gold = evaluate(m, qs, K, [1, 2], BS)
    assert gold["recall@2"] == pytest.approx(sum(len(q.gold_passage_ids) <= 2 for q in qs) / len(qs))
    assert gold["recall@1"] == pytest.approx(sum(len(q.gold_passage_ids) == 1 for q in qs) / len(qs))
    assert gold["sp_precision"] == gold["sp_recall"] == gold["sp_f1"] == 1.0
    # the production retriever's single step is the same in both runs, under its own name
    for k in (1, 2):
        assert gold[f"single_step_recall@{k}"] == core[f"single_step_recall@{k}"]
    # the core decoder's predictor ids ARE the single top-K search
    assert core["recall@2"] == core["single_step_recall@2"]
    assert core["decoder"] == decoding.label(m.strategy.default_decoder(), 2) and gold["decoder"] == "scripted.predict"
    assert all(r["retrieved_ids"] == list(q.gold_passage_ids) for r, q in zip(gold["predictions"], qs))


def test_supporting_passage_scores_hand_computed(built):
    _, data, m, _ = built
    qs = _has_gold(data.dev)[:6]
    other = next(p.id for p in data.corpus if all(p.id not in q.gold_passage_ids for q in qs))

    def predict(b, rag, ctx):  # first gold passage + one wrong one
        return [{"prediction": "", "retrieved_ids": [q.gold_passage_ids[0], other]} for q in b]

    with strategy(m, Scripted(predict)):
        res = evaluate(m, qs, K, [1], BS)
    # per question: P = 1/2, R = 1/|gold|, F1 = 2PR/(P+R)
    p = [0.5] * len(qs)
    r = [1 / len(q.gold_passage_ids) for q in qs]
    f = [2 * a * b / (a + b) for a, b in zip(p, r)]
    assert res["sp_precision"] == pytest.approx(0.5)
    assert res["sp_recall"] == pytest.approx(sum(r) / len(r))
    assert res["sp_f1"] == pytest.approx(sum(f) / len(f))
    assert res["recall@1"] == pytest.approx(sum(len(q.gold_passage_ids) == 1 for q in qs) / len(qs))
    assert res["any_recall@1"] == 1.0 and res["retrieved_per_question"] == 2.0
    assert [row["sp_f1"] for row in res["predictions"]] == pytest.approx(f)


def test_predict_failing_on_one_question_counts_one_error(built, capsys):
    _, data, m, _ = built
    qs = data.dev[:6]
    bad = qs[2].id  # in the first batch of BS=4
    calls = []

    def predict(b, rag, ctx):
        calls.append(len(b))
        if any(q.id == bad for q in b):
            raise RuntimeError("boom")
        return [{"prediction": f"answer {q.id}", "retrieved_ids": [], "rounds": 2, "metrics": {"hops": 2.0}} for q in b]

    with strategy(m, Scripted(predict)):
        res = evaluate(m, qs, K, [1], BS)
    assert res["errors"] == 1 and res["n"] == len(qs) == len(res["predictions"])
    rows = {r["id"]: r for r in res["predictions"]}
    assert rows[bad]["prediction"] == "" and rows[bad]["error"] == "RuntimeError: boom"
    assert all(rows[q.id]["prediction"] == f"answer {q.id}" and "error" not in rows[q.id] for q in qs if q.id != bad)
    assert calls == [4, 1, 1, 1, 1, 2]  # the failing batch is retried question by question
    assert res["hops"] == 2.0  # mean over the questions that reported it
    # core rounds/queries: 2 rounds and 1 query (the default) per answered question, 0 for the failed one
    n_ok = len(qs) - 1
    assert res["rounds"] == pytest.approx(2 * n_ok / len(qs)) and rows[bad]["rounds"] == 0
    assert res["queries_per_round"] == pytest.approx(n_ok / (2 * n_ok))
    assert bad in capsys.readouterr().err


def test_undeclared_or_malformed_metrics_are_errors(built):
    _, data, m, _ = built
    with strategy(
        m, Scripted(lambda b, rag, ctx: [{"prediction": "", "retrieved_ids": [], "metrics": {"depth": 1.0}} for _ in b])
    ):
        with pytest.raises(ValueError, match="undeclared metrics \\['depth'\\]"):
            evaluate(m, data.dev[:2], K, [1], BS)
    with strategy(m, Scripted(lambda b, rag, ctx: [{"prediction": ""}])):  # one answer for two questions
        with pytest.raises(ValueError, match="for 2 questions"):
            evaluate(m, data.dev[:2], K, [1], BS)
    bad_rounds = Scripted(lambda b, rag, ctx: [{"prediction": "", "rounds": 1.5} for _ in b])
    with strategy(m, bad_rounds), pytest.raises(ValueError, match="'rounds' must be an int"):
        evaluate(m, data.dev[:2], K, [1], BS)
    s = Scripted(lambda b, rag, ctx: None)
    s.reports = {"rounds": "clashes with the evaluator's rounds"}
    with strategy(m, s), pytest.raises(ValueError, match="collides"):
        evaluate(m, data.dev[:2], K, [1], BS)


def test_time_and_flops_per_question_and_one_encoding(built):
    cfg, data, m, ledger = built
    qs = data.dev[:10]
    res, charged = _charged(ledger, lambda: evaluate(m, qs, K, [1, 5], BS))
    batches = math.ceil(len(qs) / BS)
    # the questions are encoded once per batch: the single-step search reuses the decoder's embeddings
    assert charged[("query_encoder", "eval")][1] == batches
    assert res["eval_batch_size"] == BS and res["seconds_per_question"] > 0
    # on the core path everything charged is prediction, except the single-step recall's own search
    # (recall_k 5 > K: one more exact search per batch, measurement, not prediction)
    search = 2 * BS * cfg.retriever.tiny.hidden * len(m.passage_texts)
    extra = sum(
        2 * min(BS, len(qs) - i) * cfg.retriever.tiny.hidden * len(m.passage_texts) for i in range(0, len(qs), BS)
    )
    assert charged[("index", "eval")][0] == 2 * extra and search > 0
    assert res["flops_per_question"] * len(qs) == pytest.approx(sum(f for f, _ in charged.values()) - extra)
    assert res["flops_per_question"] > 0


def test_metrics_registry_is_exactly_what_is_emitted(built):
    _, data, m, _ = built
    qs = data.dev[:8]
    assert len({q.meta.get("kind") for q in qs}) > 1
    res = evaluate(m, qs, K, [1, 3], BS)
    keys = set(res) - set(metrics.INFO_FIELDS)
    assert set(metrics.INFO_FIELDS) <= set(res)
    assert {metrics.get_metric(k) for k in keys} == set(metrics.METRICS.values())
    kinds = {q.meta["kind"] for q in qs}
    want = {b.replace("@k", f"@{k}") for b in metrics.METRICS for k in (1, 3)}
    want |= {f"{b.replace('@k', f'@{k}')}/{kind}" for b in metrics.PER_KIND for k in (1, 3) for kind in kinds}
    assert keys == want
    # a strategy's reported metric appears under its own name, and only then
    with strategy(
        m, Scripted(lambda b, rag, ctx: [{"prediction": "", "retrieved_ids": [], "metrics": {"hops": 3}} for _ in b])
    ):
        rep = evaluate(m, qs, K, [1, 3], BS)
    assert set(rep) - set(res) == {"hops"} and rep["hops"] == 3.0


def test_oracle_reads_gold_first_passages(built):
    _, data, m, _ = built
    qs = [q for q in _has_gold(data.dev) if len(q.gold_passage_ids) <= K][:6]
    res = evaluate(m, qs, K, [K], BS, oracle=True)
    assert res["oracle"] is True and res["recall@2"] == 1.0
    for r, q in zip(res["predictions"], qs):
        assert r["retrieved_ids"][: len(q.gold_passage_ids)] == list(q.gold_passage_ids)
    assert res["single_step_recall@2"] == evaluate(m, qs, K, [K], BS)["single_step_recall@2"]


def test_strategy_owned_towers_are_charged_under_their_own_names(built):
    cfg, data, m, ledger = built
    texts = [q.question for q in data.train[:3]]
    tower = copy.deepcopy(m.retriever.query_encoder)
    mode = FlopCounterMode(display=False)
    with torch.no_grad(), mode:
        emb, charged = _charged(ledger, lambda: m.retriever.encode(texts, tower, "posterior", 32))
    assert emb.shape == (3, cfg.retriever.tiny.hidden)
    assert charged == {("posterior", "score"): (int(mode.get_total_flops()), 1)}
    tower.requires_grad_(True)
    _, charged = _charged(ledger, lambda: m.retriever.encode(texts, tower, "posterior", 32).sum().backward())
    assert set(charged) == {("posterior", "train")}
    ref = m.generator.copy_as("reference")
    assert ref.model is not m.generator.model and ref.ledger is ledger
    ctx = [[m.passage_texts[0]]] * 3
    with torch.no_grad():
        _, charged = _charged(ledger, lambda: ref.answer_logprobs(texts, ctx, ["a", "b", "c"]))
    assert set(charged) == {("reference", "score")}
    _, charged = _charged(ledger, lambda: ref.generate(texts[:1], [m.passage_texts[0]], max_new_tokens=2))
    assert set(charged) == {("reference", "generate")}
