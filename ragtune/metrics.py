"""Answer and retrieval metrics for open-domain / multi-hop QA.

Answer metrics follow the official SQuAD v1.1 evaluation (Rajpurkar et al.
2016, arXiv:1606.05250): answers are normalised (lower-case, ASCII
punctuation removed, articles a/an/the removed, whitespace collapsed) and
scored by exact match and bag-of-tokens F1, taking the max over the gold
answers.  The normalisation is named by :data:`NORMALIZATION`, which is
recorded with every score so numbers from different normalisations are never
silently compared.

Retrieval metrics are kept deliberately distinct:

* :func:`recall_at_k` -- **all-gold** recall: a question counts only if its
  top-k contains *every* gold passage id.  For multi-hop QA (HotpotQA-style
  bridge/comparison questions) this is the honest number: retrieving one of
  two required passages does not make the question answerable.
* :func:`any_gold_recall_at_k` -- lenient: at least one gold id in the top-k
  (equal to :func:`recall_at_k` for single-gold questions).
* :func:`answer_containment_at_k` -- some top-k passage *contains an answer
  string* (the DPR "top-k accuracy" heuristic).  It needs no gold passage ids
  but is not recall: a passage can mention the answer without supporting it.

Questions without gold ids (or without non-empty answers for containment)
are skipped, and every rate reports how many questions it used.
"""

from __future__ import annotations

import math
import numbers
import re
import string
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

__all__ = [
    "NORMALIZATION",
    "normalize_answer",
    "exact_match",
    "token_f1",
    "RateResult",
    "recall_at_k",
    "any_gold_recall_at_k",
    "answer_containment_at_k",
    "Metric",
    "METRICS",
    "get_metric",
    "score_predictions",
]

NORMALIZATION = "squad_v1.1"

_PUNCT = frozenset(string.punctuation)  # ASCII only, exactly as SQuAD v1.1
_ARTICLES = re.compile(r"\b(a|an|the)\b")


# --------------------------------------------------------------------------- answers
def normalize_answer(s: str) -> str:
    """SQuAD v1.1 answer normalisation.

    Steps, in the official order: lower-case; drop ASCII punctuation
    (``string.punctuation``; non-ASCII punctuation is kept, as in SQuAD);
    remove the whole words ``a``, ``an``, ``the``; collapse whitespace.
    Note punctuation is removed *without* inserting a space ("don't" -> "dont").
    """
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _check_golds(golds: Sequence[str]) -> None:
    if isinstance(golds, str):
        raise TypeError("golds must be a list of strings, not a single string")
    if len(golds) == 0:
        raise ValueError("need at least one gold answer")


def exact_match(pred: str, golds: Sequence[str]) -> float:
    """1.0 if ``normalize_answer(pred)`` equals that of any gold answer, else 0.0."""
    _check_golds(golds)
    p = normalize_answer(pred)
    return float(any(p == normalize_answer(g) for g in golds))


def _f1_tokens(pred_toks: list[str], gold_toks: list[str]) -> float:
    if not pred_toks or not gold_toks:
        # Convention: empty vs empty = 1, empty vs non-empty = 0.
        return float(pred_toks == gold_toks)
    common = sum((Counter(pred_toks) & Counter(gold_toks)).values())
    if common == 0:
        return 0.0
    precision = common / len(pred_toks)
    recall = common / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


def token_f1(pred: str, golds: Sequence[str]) -> float:
    """SQuAD token-level F1, max over gold answers.

    Tokens are the whitespace-split normalised strings; overlap counts
    multiplicity (multiset intersection).  P = overlap / |pred|,
    R = overlap / |gold|, F1 = 2PR / (P + R).  If either normalised token list
    is empty, F1 = 1.0 when both are empty and 0.0 otherwise.
    """
    _check_golds(golds)
    p = normalize_answer(pred).split()
    return max(_f1_tokens(p, normalize_answer(g).split()) for g in golds)


# --------------------------------------------------------------------------- retrieval
class RateResult(float):
    """A rate over the questions a metric could score; behaves as a plain float.

    The float value is the mean of ``per_question`` over the used questions
    (NaN if none), so it can be stored, compared and ``json.dumps``-ed like a
    number.  Extra attributes: ``n_used`` (number of questions scored) and
    ``per_question`` (aligned with the input: 1.0 / 0.0 per used question,
    ``None`` for skipped ones; for bootstrap CIs and paired tests).
    """

    n_used: int
    per_question: list

    def __new__(cls, value: float, n_used: int = 0, per_question: Optional[list] = None) -> "RateResult":
        obj = super().__new__(cls, value)
        obj.n_used = n_used
        obj.per_question = list(per_question) if per_question is not None else []
        return obj

    @property
    def value(self) -> float:
        return float(self)

    def __repr__(self) -> str:
        return f"RateResult({float(self)!r}, n_used={self.n_used})"


def _rate(per_question: list) -> RateResult:
    used = [v for v in per_question if v is not None]
    value = sum(used) / len(used) if used else math.nan
    return RateResult(value=value, n_used=len(used), per_question=per_question)


def _check_k(k: int, *lists: Sequence) -> None:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if len({len(x) for x in lists}) != 1:
        raise ValueError(f"length mismatch between per-question lists: {[len(x) for x in lists]}")


def recall_at_k(retrieved_ids: Sequence[Sequence[str]], gold_ids: Sequence[Sequence[str]], k: int) -> RateResult:
    """All-gold recall@k: fraction of questions whose top-k ids contain ALL gold ids.

    ``retrieved_ids[i]`` is question i's ranked passage ids (best first);
    ``gold_ids[i]`` its gold passage ids.  Questions with no gold ids are
    skipped (``per_question`` None, not counted in ``n_used``).
    """
    _check_k(k, retrieved_ids, gold_ids)
    per_q = [None if not set(g) else float(set(g) <= set(r[:k])) for r, g in zip(retrieved_ids, gold_ids)]
    return _rate(per_q)


def any_gold_recall_at_k(
    retrieved_ids: Sequence[Sequence[str]], gold_ids: Sequence[Sequence[str]], k: int
) -> RateResult:
    """Any-gold recall@k: fraction of questions whose top-k contains AT LEAST ONE gold id.

    Lenient upper bound of :func:`recall_at_k` (equal for single-gold
    questions).  Questions with no gold ids are skipped.
    """
    _check_k(k, retrieved_ids, gold_ids)
    per_q = [None if not set(g) else float(bool(set(g) & set(r[:k]))) for r, g in zip(retrieved_ids, gold_ids)]
    return _rate(per_q)


def answer_containment_at_k(
    retrieved_texts: Sequence[Sequence[str]], answers: Sequence[Sequence[str]], k: int
) -> RateResult:
    """Fraction of questions where some top-k passage text contains some answer.

    Both sides are SQuAD-normalised and matched on whole-token boundaries
    (" red dog " in " big red dog barked "), so "1" does not match "1984".
    Not recall: containing the string does not mean the passage supports the
    answer.  Answers that normalise to "" are ignored; questions left with no
    answer are skipped.
    """
    _check_k(k, retrieved_texts, answers)
    if any(isinstance(a, str) for a in answers):
        raise TypeError("answers must be a list of lists of strings")
    per_q: list = []
    for texts, golds in zip(retrieved_texts, answers):
        norm = [f" {a} " for a in (normalize_answer(g) for g in golds) if a]
        if not norm:
            per_q.append(None)
            continue
        padded = [f" {normalize_answer(t)} " for t in texts[:k]]
        per_q.append(float(any(a in t for t in padded for a in norm)))
    return _rate(per_q)


# --------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Metric:
    """Metadata for reporting: which way is better and what the number means.

    ``fn`` is None for metrics that are computed elsewhere (e.g. the loss).
    """

    fn: Optional[Callable]
    higher_is_better: bool
    description: str


METRICS: dict[str, Metric] = {
    "em": Metric(exact_match, True, f"exact match after {NORMALIZATION} normalisation, max over golds"),
    "f1": Metric(token_f1, True, f"token F1 after {NORMALIZATION} normalisation, max over golds"),
    "recall@k": Metric(recall_at_k, True, "all-gold recall: top-k contains every gold passage id"),
    "any_recall@k": Metric(any_gold_recall_at_k, True, "any-gold recall: top-k contains at least one gold id"),
    "containment@k": Metric(
        answer_containment_at_k, True, "some top-k passage contains a normalised answer string (not recall)"
    ),
    "loss": Metric(None, False, "training/validation loss (see ragtune.losses for the reduction used)"),
}

_AT_K = re.compile(r"^(?P<base>[a-z_]+)@(?P<k>\d+)$")


def get_metric(name: str) -> Metric:
    """Look up a metric, resolving ``"recall@5"`` to the ``"recall@k"`` entry."""
    if name in METRICS:
        return METRICS[name]
    m = _AT_K.match(name)
    if m and f"{m['base']}@k" in METRICS:
        return METRICS[f"{m['base']}@k"]
    raise KeyError(f"unknown metric {name!r}; known: {sorted(METRICS)}")


def score_predictions(preds: Sequence[str], golds: Sequence[Sequence[str]]) -> dict:
    """Score a list of predictions against per-question gold answer lists.

    Returns ``{"em", "f1"}`` (means in [0, 1]), ``"em_per_question"`` and
    ``"f1_per_question"`` (aligned with the input, for bootstrap / paired
    tests), ``"n"`` and ``"normalization"`` (= :data:`NORMALIZATION`).
    """
    if len(preds) != len(golds):
        raise ValueError(f"{len(preds)} predictions but {len(golds)} gold lists")
    if len(preds) == 0:
        raise ValueError("no predictions to score")
    em = [exact_match(p, g) for p, g in zip(preds, golds)]
    f1 = [token_f1(p, g) for p, g in zip(preds, golds)]
    return {
        "em": sum(em) / len(em),
        "f1": sum(f1) / len(f1),
        "em_per_question": em,
        "f1_per_question": f1,
        "n": len(em),
        "normalization": NORMALIZATION,
    }
