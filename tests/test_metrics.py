"""Hand-computed checks for ragtune.metrics (SQuAD v1.1 EM/F1, retrieval rates)."""

import math

import pytest

from ragtune.metrics import (
    METRICS,
    NORMALIZATION,
    RateResult,
    answer_containment_at_k,
    any_gold_recall_at_k,
    exact_match,
    get_metric,
    normalize_answer,
    recall_at_k,
    score_predictions,
    token_f1,
)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("The Big Red Dog", "big red dog"),  # case + article
        ("a cat and an owl", "cat and owl"),  # a / an
        ("Theatre then anthem", "theatre then anthem"),  # articles only as whole words
        ("Hello, world!", "hello world"),  # punctuation
        ("don't", "dont"),  # punctuation removed without a space
        ("  lots   of\tspace\n ", "lots of space"),  # whitespace collapse
        ("THE", ""),  # only an article
        ("the-end", "theend"),  # punctuation removed before article removal
        ("U.S.A.", "usa"),
        ("", ""),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_normalization_constant():
    assert NORMALIZATION == "squad_v1.1"


def test_exact_match():
    assert exact_match("The Eiffel Tower.", ["eiffel tower"]) == 1.0
    assert exact_match("Eiffel", ["eiffel tower"]) == 0.0
    assert exact_match("Paris", ["London", "paris!"]) == 1.0  # max over golds
    assert isinstance(exact_match("x", ["x"]), float)


def test_token_f1_partial_overlap():
    # normalised: [big, red, dog] vs [red, dog]: P = 2/3, R = 1, F1 = 0.8
    assert token_f1("the big red dog", ["red dog"]) == pytest.approx(0.8)
    # P = 1/2, R = 1/3 -> F1 = 2 * (1/6) / (5/6) = 0.4
    assert token_f1("red cat", ["big red dog"]) == pytest.approx(0.4)
    assert token_f1("blue", ["red dog"]) == 0.0


def test_token_f1_counts_multiplicity():
    # pred [dog, dog], gold [dog]: overlap 1, P = 1/2, R = 1 -> 2/3
    assert token_f1("dog dog", ["dog"]) == pytest.approx(2 / 3)


def test_token_f1_max_over_golds():
    golds = ["red dog", "the big red dog", "cat"]
    assert token_f1("big red dog", golds) == 1.0
    assert token_f1("red dog barked", ["dog", "red dog"]) == pytest.approx(0.8)  # 2/3,1 vs 1/3,1 -> 0.8


def test_token_f1_empty_cases():
    assert token_f1("the", ["a"]) == 1.0  # both normalise to empty
    assert token_f1("", ["dog"]) == 0.0
    assert token_f1("dog", ["the"]) == 0.0


def test_golds_must_be_a_nonempty_list():
    with pytest.raises(TypeError):
        exact_match("dog", "dog")
    with pytest.raises(ValueError):
        token_f1("dog", [])


# Multi-hop example: q0 needs two passages (bridge), q1 one, q2 has no gold ids.
RETRIEVED = [["p1", "p7", "p2", "p9"], ["p5", "p3"], ["p4"]]
GOLD = [["p1", "p2"], ["p3"], []]


def test_all_gold_vs_any_gold_recall():
    r2 = recall_at_k(RETRIEVED, GOLD, 2)
    a2 = any_gold_recall_at_k(RETRIEVED, GOLD, 2)
    # k=2: q0 top-2 = {p1, p7} -> has p1 but not p2; q1 top-2 has p3.
    assert (r2.value, r2.n_used, r2.per_question) == (0.5, 2, [0.0, 1.0, None])
    assert (a2.value, a2.n_used, a2.per_question) == (1.0, 2, [1.0, 1.0, None])
    r3 = recall_at_k(RETRIEVED, GOLD, 3)
    assert r3.value == 1.0 and r3.n_used == 2
    r1 = recall_at_k(RETRIEVED, GOLD, 1)
    a1 = any_gold_recall_at_k(RETRIEVED, GOLD, 1)
    assert r1.per_question == [0.0, 0.0, None] and a1.per_question == [1.0, 0.0, None]
    assert float(a1) == 0.5


def test_recall_skips_and_validates():
    r = recall_at_k([["p1"]], [[]], 5)
    assert r.n_used == 0 and math.isnan(r.value)
    with pytest.raises(ValueError):
        recall_at_k([["p1"]], [["p1"], ["p2"]], 1)
    with pytest.raises(ValueError):
        recall_at_k([["p1"]], [["p1"]], 0)


def test_answer_containment():
    texts = [
        ["Paris is the capital of France.", "Berlin is in Germany."],
        ["It happened in 1984.", "The Red Dog barked."],
        ["nothing here"],
        ["x"],
    ]
    answers = [["Berlin"], ["1", "red dog"], ["absent"], ["the"]]  # last normalises to "" -> skipped
    c1 = answer_containment_at_k(texts, answers, 1)
    assert isinstance(c1, RateResult)
    # k=1: q0 first passage lacks "berlin"; q1 "1" must not match "1984"
    assert c1.per_question == [0.0, 0.0, 0.0, None] and c1.n_used == 3
    c2 = answer_containment_at_k(texts, answers, 2)
    assert c2.per_question == [1.0, 1.0, 0.0, None]
    assert c2.value == pytest.approx(2 / 3)


def test_metrics_registry():
    assert METRICS["em"].higher_is_better and METRICS["f1"].higher_is_better
    assert METRICS["recall@k"].fn is recall_at_k and METRICS["recall@k"].higher_is_better
    assert not METRICS["loss"].higher_is_better
    assert get_metric("recall@20") is METRICS["recall@k"]
    assert get_metric("any_recall@5") is METRICS["any_recall@k"]
    with pytest.raises(KeyError):
        get_metric("bleu")


def test_score_predictions():
    preds = ["the big red dog", "Paris", "nope"]
    golds = [["red dog"], ["paris", "Paris, France"], ["yes"]]
    out = score_predictions(preds, golds)
    assert out["em_per_question"] == [0.0, 1.0, 0.0]
    assert out["f1_per_question"] == pytest.approx([0.8, 1.0, 0.0])
    assert out["em"] == pytest.approx(1 / 3)
    assert out["f1"] == pytest.approx(0.6)
    assert out["n"] == 3 and out["normalization"] == NORMALIZATION
    with pytest.raises(ValueError):
        score_predictions(["a"], [])


def test_rate_result_is_a_float_with_counts():
    import json
    import pickle

    r = recall_at_k(RETRIEVED, GOLD, 2)
    assert isinstance(r, float) and r == 0.5 and r.value == 0.5
    assert json.loads(json.dumps({"recall@2": r})) == {"recall@2": 0.5}
    r2 = pickle.loads(pickle.dumps(r))
    assert r2 == 0.5 and r2.n_used == 2 and r2.per_question == [0.0, 1.0, None]
