"""Answer and retrieval metrics, and `METRICS`: exactly the scores the evaluator emits.

Answer metrics follow the official SQuAD v1.1 evaluation (Rajpurkar et al. 2016): answers are
normalised (lower-case, ASCII punctuation removed, articles a/an/the removed, whitespace
collapsed) and scored by exact match and bag-of-tokens F1, max over the gold answers. The
normalisation is named by `NORMALIZATION` and recorded with every score, so numbers from
different normalisations are never silently compared.

Retrieval metrics score one question's ranked passage ids against its gold passage ids and
return None when the question has no gold ids (it is then left out of the mean):
- `all_gold_at_k`: the top-k holds EVERY gold id. The honest number for multi-hop questions:
  one of two required passages does not make a bridge question answerable.
- `any_gold_at_k`: the top-k holds at least one gold id (equal for single-gold questions).
- `supporting_prf`: precision / recall / F1 of the set of retrieved ids against the gold set
  (HotpotQA's supporting-fact metric, on passages; an empty retrieval scores 0).
The evaluator applies them to the *predictor's* retrieved ids (what the answer was read from,
possibly several retrieval steps) and, under `single_step_recall@k`, to one top-k search of the
production retriever.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

NORMALIZATION = "squad_v1.1"

_PUNCT = frozenset(string.punctuation)  # ASCII only, exactly as SQuAD v1.1
_ARTICLES = re.compile(r"\b(a|an|the)\b")


# ---- answers ------------------------------------------------------------------------------------
def normalize_answer(s: str) -> str:
    """SQuAD v1.1: lower-case; drop ASCII punctuation without inserting a space ("don't" ->
    "dont"; non-ASCII punctuation is kept); remove the words a/an/the; collapse whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def _check_golds(golds: Sequence[str]) -> None:
    if isinstance(golds, str):
        raise TypeError("golds must be a list of strings, not a single string")
    if len(golds) == 0:
        raise ValueError("need at least one gold answer")


def exact_match(pred: str, golds: Sequence[str]) -> float:
    """1.0 if `normalize_answer(pred)` equals that of any gold answer, else 0.0."""
    _check_golds(golds)
    p = normalize_answer(pred)
    return float(any(p == normalize_answer(g) for g in golds))


def _f1_tokens(pred: list, gold: list) -> float:
    # as the official SQuAD v1.1 script: no common token -> 0, also when both are empty
    common = sum((Counter(pred) & Counter(gold)).values())
    return 0.0 if common == 0 else 2 * common / (len(pred) + len(gold))


def token_f1(pred: str, golds: Sequence[str]) -> float:
    """SQuAD token F1 (multiset overlap of normalised whitespace tokens), max over golds:
    P = overlap/|pred|, R = overlap/|gold|, F1 = 2PR/(P+R). Two answers that both normalise to
    empty score 0, as in the official v1.1 script (EM of the two is 1)."""
    _check_golds(golds)
    p = normalize_answer(pred).split()
    return max(_f1_tokens(p, normalize_answer(g).split()) for g in golds)


# ---- retrieval (one question) -------------------------------------------------------------------
def _top(retrieved: Sequence[str], k: int) -> set:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    return set(list(dict.fromkeys(retrieved))[:k])  # distinct ids, best first


def all_gold_at_k(retrieved: Sequence[str], gold: Sequence[str], k: int) -> Optional[float]:
    """1.0 if the first k distinct retrieved ids contain every gold id; None without gold ids."""
    top = _top(retrieved, k)
    return None if not gold else float(set(gold) <= top)


def any_gold_at_k(retrieved: Sequence[str], gold: Sequence[str], k: int) -> Optional[float]:
    """1.0 if the first k distinct retrieved ids contain some gold id; None without gold ids."""
    top = _top(retrieved, k)
    return None if not gold else float(bool(set(gold) & top))


def supporting_prf(retrieved: Sequence[str], gold: Sequence[str]) -> Optional[Tuple[float, float, float]]:
    """(precision, recall, F1) of the set of all retrieved ids against the gold ids; None without
    gold ids. Nothing retrieved scores (0, 0, 0)."""
    if not gold:
        return None
    pred, gold = set(retrieved), set(gold)
    hit = len(pred & gold)
    if hit == 0:
        return 0.0, 0.0, 0.0
    p, r = hit / len(pred), hit / len(gold)
    return p, r, 2 * p * r / (p + r)


def mean(values: Sequence[Optional[float]]) -> float:
    """Mean over the values that are not None; NaN if there are none."""
    used = [v for v in values if v is not None]
    return sum(used) / len(used) if used else math.nan


# ---- what the evaluator emits -------------------------------------------------------------------
@dataclass(frozen=True)
class Metric:
    higher_is_better: bool
    description: str


METRICS: Dict[str, Metric] = {
    "em": Metric(True, f"exact match after {NORMALIZATION} normalisation, max over golds"),
    "f1": Metric(True, f"token F1 after {NORMALIZATION} normalisation, max over golds"),
    "recall@k": Metric(True, "all-gold recall of the predictor's retrieved ids: the first k hold every gold id"),
    "any_recall@k": Metric(True, "any-gold recall of the predictor's retrieved ids: the first k hold a gold id"),
    "single_step_recall@k": Metric(True, "all-gold recall of one top-k search with the production query encoder"),
    "sp_precision": Metric(True, "supporting passages: share of the predictor's retrieved ids that are gold"),
    "sp_recall": Metric(True, "supporting passages: share of the gold ids the predictor retrieved"),
    "sp_f1": Metric(True, "supporting passages: F1 of sp_precision and sp_recall, per question"),
    "retrieved_per_question": Metric(False, "distinct passage ids the predictor retrieved, per question"),
    "rounds": Metric(False, "retrieval rounds per question (sequential search calls; a single-step reader: 1)"),
    "queries": Metric(False, "search queries issued per question (a single-step reader: 1)"),
    "queries_per_round": Metric(False, "search queries per retrieval round: total queries / total rounds"),
    "errors": Metric(False, "questions whose predict raised (scored as an empty prediction)"),
    "seconds_per_question": Metric(False, "wall-clock of prediction per question, at eval_batch_size"),
    "flops_per_question": Metric(False, "evaluation FLOPs of prediction per question (analytic, ragtune.flops)"),
}
# Templates: "<name>@k" for every k of eval.recall_k; "<name>/<question kind>" for em, recall@k and
# single_step_recall@k, one per question kind present (meta["kind"]: single, bridge, ...).
PER_KIND = ("em", "recall@k", "single_step_recall@k", "sp_recall", "sp_f1", "rounds")
# The evaluator's result also holds these fields, which are not scores.
INFO_FIELDS = ("n", "normalization", "decoder", "oracle", "eval_batch_size", "predictions")
# Scores that measure time: they legitimately differ between two executions of the same run.
TIMING_METRICS = ("seconds_per_question",)

_AT_K = re.compile(r"^(?P<base>[a-z_]+)@(?P<k>\d+)$")


def get_metric(name: str) -> Metric:
    """The METRICS entry of an emitted key: "recall@5" -> "recall@k", "em/bridge" -> "em"."""
    base = name.split("/", 1)[0] if "/" in name else name
    m = _AT_K.match(base)
    key = f"{m['base']}@k" if m else base
    if key in METRICS and (base == name or key in PER_KIND):
        return METRICS[key]
    raise KeyError(f"unknown metric {name!r}; known: {sorted(METRICS)}")
