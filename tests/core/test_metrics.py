"""Hand-computed checks for ragtune.metrics (SQuAD v1.1 EM/F1, retrieval and supporting-passage metrics)."""

import math

import pytest

from ragtune.metrics import (
    METRICS,
    NORMALIZATION,
    all_gold_at_k,
    any_gold_at_k,
    exact_match,
    get_metric,
    mean,
    normalize_answer,
    supporting_prf,
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
    # both normalise to empty: the SQuAD v1.1 script gives F1 0 (no common token) and EM 1
    assert token_f1("the", ["a"]) == 0.0 and exact_match("the", ["a"]) == 1.0
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


def _rates(fn, k):
    return [fn(r, g, k) for r, g in zip(RETRIEVED, GOLD)]


def test_all_gold_vs_any_gold_recall():
    # k=2: q0 top-2 = {p1, p7} -> has p1 but not p2; q1 top-2 has p3; q2 has no gold ids.
    assert _rates(all_gold_at_k, 2) == [0.0, 1.0, None] and mean(_rates(all_gold_at_k, 2)) == 0.5
    assert _rates(any_gold_at_k, 2) == [1.0, 1.0, None]
    assert mean(_rates(all_gold_at_k, 3)) == 1.0
    assert _rates(all_gold_at_k, 1) == [0.0, 0.0, None] and _rates(any_gold_at_k, 1) == [1.0, 0.0, None]
    # the first k DISTINCT ids: a repeated id does not use up a rank
    assert all_gold_at_k(["p1", "p1", "p2"], ["p1", "p2"], 2) == 1.0


def test_recall_skips_and_validates():
    assert all_gold_at_k(["p1"], [], 5) is None and math.isnan(mean([None]))
    with pytest.raises(ValueError):
        all_gold_at_k(["p1"], ["p1"], 0)
    assert all_gold_at_k([], ["p1"], 3) == 0.0  # nothing retrieved


def test_supporting_passage_precision_recall_f1():
    # q0: retrieved {p1, p7, p2, p9}, gold {p1, p2}: P = 2/4, R = 2/2, F1 = 2*0.5*1/1.5 = 2/3
    assert supporting_prf(RETRIEVED[0], GOLD[0]) == pytest.approx((0.5, 1.0, 2 / 3))
    # q1: retrieved {p5, p3}, gold {p3}: P = 1/2, R = 1, F1 = 2/3
    assert supporting_prf(RETRIEVED[1], GOLD[1]) == pytest.approx((0.5, 1.0, 2 / 3))
    # one of two gold, one extra: P = 1/2, R = 1/2, F1 = 1/2; duplicates count once
    assert supporting_prf(["a", "x", "a"], ["a", "b"]) == pytest.approx((0.5, 0.5, 0.5))
    assert supporting_prf(["x"], ["a"]) == (0.0, 0.0, 0.0)
    assert supporting_prf([], ["a"]) == (0.0, 0.0, 0.0)
    assert supporting_prf(["a"], []) is None


def test_metrics_registry():
    assert METRICS["em"].higher_is_better and METRICS["f1"].higher_is_better
    assert METRICS["recall@k"].higher_is_better and not METRICS["seconds_per_question"].higher_is_better
    assert not METRICS["errors"].higher_is_better
    assert get_metric("recall@20") is METRICS["recall@k"]
    assert get_metric("any_recall@5") is METRICS["any_recall@k"]
    assert get_metric("single_step_recall@5/bridge") is METRICS["single_step_recall@k"]
    assert get_metric("em/single") is METRICS["em"]
    assert (
        get_metric("sp_recall/bridge") is METRICS["sp_recall"] and get_metric("rounds/comparison") is METRICS["rounds"]
    )
    for bad in ("bleu", "loss", "sp_precision/bridge", "queries/bridge", "em@5"):
        with pytest.raises(KeyError):
            get_metric(bad)
