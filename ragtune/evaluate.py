"""Evaluation: the same metrics, timing and FLOP accounting for every strategy's predictor.

Per batch of questions the strategy's `predict(batch, rag, ctx)` answers, or, when it returns
None, a core decoder does (`ragtune.decoding`: greedy_rescore, thorough, fast, token_mixture,
Lewis et al. 2020's RAG-Sequence and RAG-Token decoding). Which one is `evaluate`'s `decoder`
(`eval.decoder`; "auto" = the strategy's `default_decoder()`) with `beams` (`eval.beams`); the
result's `decoder` names what answered, beam width included (e.g. `thorough(beams=2)`,
`token_mixture(greedy)`, `greedy_rescore`, `<strategy>.predict`, or both joined by " + " when
some questions fell back to the core decoder). With `oracle` the chosen core decoder reads
gold-first passages instead of the top-K.

What is scored, and why here: answers (em, f1) and retrieval (recall@k, any_recall@k,
sp_precision/recall/f1) are computed over what the predictor says it read, its ordered
`retrieved_ids`, so a multi-step predictor is judged on its own retrieval; the production
retriever's single top-k search is reported apart as `single_step_recall@k`, from the same
question embeddings the core decoder used (questions are encoded once). Prediction is timed and
its FLOPs counted for every strategy alike (`seconds_per_question` at `eval_batch_size`,
`flops_per_question`). A predict that raises on a batch is retried question by question; a
question that still fails gets an empty prediction and is counted in `errors` (never a crashed
run, never a skipped question). Metrics a predictor reports must be declared in the strategy's
`reports`; their means are emitted under their own names. Retrieval rounds and queries are core
scores of every strategy (`rounds`, `queries`, `queries_per_round`): a predict dict may say how
many sequential retrieval rounds and how many search queries it used (top-level `rounds`,
`queries`); a core decoder searches once (1 and 1). Everything runs under
`ledger.evaluating()`: reported, never counted as training cost. `METRICS` (ragtune.metrics)
lists every score emitted here.

`sharded=True` under a process group of W ranks (every rank calls it): batch j of the questions
(in order, `batch_size` each) is predicted by rank j % W only, whole batches, so each batch is
computed exactly as one process computes it; the per-batch results are all-gathered and every
rank scores the same full list (the same result as one process, predictions in question order).
Each rank charges only its batches to its ledger, so a merge of the ranks' ledgers counts the
evaluation once; `seconds_per_question` and `flops_per_question` sum the ranks' shares.
"""

from __future__ import annotations

import math
import sys
from typing import Dict, List, Optional, Sequence

import torch

from ragtune import decoding, metrics
from ragtune.data import Question
from ragtune.distributed import rank_world
from ragtune.ledger import clock
from ragtune.strategy import StepContext


@torch.no_grad()
def evaluate(
    rag,
    questions: Sequence[Question],
    k: int,
    recall_ks: Sequence[int],
    batch_size: int,
    oracle: bool = False,
    step: int = 0,
    decoder: str = "auto",
    beams: int = 2,
    sharded: bool = False,
) -> Dict[str, object]:
    """Scores and per-question predictions (`predictions`) of the strategy's predictor (or the core
    decoder `decoder` with `beams`, see ragtune.decoding; always the core decoder on gold-first
    passages with `oracle`). `step`: optimizer steps done, passed to `predict` in its StepContext.
    `sharded`: the batches split over the ranks of the process group (module docstring)."""
    core = decoding.resolve(decoder, rag.strategy)
    reports = dict(rag.strategy.reports or {})
    _check_report_names(rag.strategy.name, reports)
    ctx = StepContext(phase=None, step=step, phase_step=0, phase_steps=0, lrs={}, k=k)
    kmax = min(max([*recall_ks, k]), len(rag.corpus))
    modes = [(mod, mod.training) for mod in rag.modules()]
    rag.eval()
    rank, world = rank_world() if sharded else (0, 1)
    starts = range(0, len(questions), batch_size)
    mine = []  # this rank's batches: (j, predictions, single-step ids (B, kmax), decoders, seconds, flops)
    try:
        with rag.ledger.evaluating():
            for j in range(rank, len(starts), world):  # batch j on rank j % world
                batch = list(questions[starts[j] : starts[j] + batch_size])
                f0, t0 = _eval_flops(rag.ledger), clock()
                out, q, rows, used = _predict_batch(rag, batch, k, ctx, reports, oracle, core, beams)
                seconds, flops = clock() - t0, _eval_flops(rag.ledger) - f0
                # single-step recall: the core decoder's question embeddings (and search) when it has them
                q = rag.encode_questions([x.question for x in batch]) if q is None else q  # (B, H)
                top = rows if rows is not None and kmax == k else rag.search(q, kmax)  # (B, kmax)
                single = [[rag.corpus[r].id for r in row] for row in top.tolist()]
                mine.append((j, out, single, sorted(used), seconds, flops))
    finally:
        for mod, mode in modes:
            mod.training = mode
    shares = rag.gather(mine) if world > 1 else [mine]  # every rank's batches, on every rank
    done = sorted((b for share in shares for b in share), key=lambda b: b[0])
    preds = [p for b in done for p in b[1]]
    single = [ids for b in done for ids in b[2]]
    decoders = {d for b in done for d in b[3]}
    seconds, flops = sum(b[4] for b in done), sum(b[5] for b in done)
    res = score(questions, preds, single, recall_ks, list(reports))
    n = max(len(questions), 1)
    res.update(
        decoder=" + ".join(sorted(decoders)),
        oracle=bool(oracle),
        eval_batch_size=int(batch_size),
        seconds_per_question=seconds / n,
        flops_per_question=flops / n,
    )
    return res


def _predict_batch(rag, batch: List[Question], k: int, ctx: StepContext, reports, oracle: bool, core: str, beams: int):
    """(predictions, q (B, H) or None, single top-k rows (B, k) or None, decoders used). q and rows
    are those of the core decoder `core` when it decoded the whole batch from the index, for reuse."""
    out = None if oracle else _strategy_predict(rag, batch, ctx, reports)
    todo = [j for j in range(len(batch)) if out is None or out[j] is None]
    if not todo:
        return out, None, None, {f"{rag.strategy.name}.predict"}
    sub = [batch[j] for j in todo]
    q = rag.encode_questions([x.question for x in sub])  # (B', H)
    rows = rag.gold_first_rows(sub, k, q=q) if oracle else rag.search(q, k)  # (B', k)
    decoded = decoding.decode(core, rag, sub, rag.make_retrieval(q, rows), beams)
    name = decoding.label(core, beams)
    if out is None:
        return decoded, q, (None if oracle else rows), {name}
    for j, p in zip(todo, decoded):  # some questions fell back to the core decoder
        out[j] = p
    return out, None, None, {name, f"{rag.strategy.name}.predict"}


def _eval_flops(ledger) -> int:
    return ledger.deterministic_view()["flops"]["eval"]


def _check_report_names(strategy: str, reports: Dict[str, str]) -> None:
    for name in reports:
        try:
            metrics.get_metric(name)
            taken = True
        except KeyError:
            taken = name in metrics.INFO_FIELDS
        if taken or "/" in name or "@" in name:
            raise ValueError(
                f"strategy '{strategy}': reported metric '{name}' collides with an evaluator score or uses '/' or '@'"
            )


def _strategy_predict(rag, batch: List[Question], ctx: StepContext, reports) -> Optional[List[Optional[dict]]]:
    """The strategy's predictions, checked; None means the core decoder (per question too). A batch
    that raises is retried question by question, so only the questions that fail lose their answer."""
    try:
        out = rag.strategy.predict(batch, rag, ctx)
    except Exception as err:  # noqa: BLE001 - isolated and counted, see module docstring
        if len(batch) > 1:
            return [p for x in batch for p in (_strategy_predict(rag, [x], ctx, reports) or [None])]
        print(f"predict failed on question {batch[0].id}: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        failed = {"prediction": "", "retrieved_ids": [], "rounds": 0, "queries": 0, "metrics": {}}
        return [{**failed, "error": f"{type(err).__name__}: {err}"}]
    if out is None:
        return None
    if not isinstance(out, (list, tuple)) or len(out) != len(batch):
        raise ValueError(
            f"strategy '{rag.strategy.name}': predict returned {type(out).__name__} of "
            f"{len(out) if hasattr(out, '__len__') else '?'} items for {len(batch)} questions"
        )
    return [_checked(rag.strategy.name, p, reports) for p in out]


def _checked(strategy: str, p: dict, reports) -> dict:
    if not isinstance(p, dict) or not isinstance(p.get("prediction"), str):
        raise ValueError(f"strategy '{strategy}': predict must return dicts with a str 'prediction', got {p!r}")
    ids = p.get("retrieved_ids", [])
    if not isinstance(ids, (list, tuple)):
        raise ValueError(f"strategy '{strategy}': 'retrieved_ids' must be a list of passage ids, got {ids!r}")
    vals = dict(p.get("metrics") or {})
    undeclared = sorted(set(vals) - set(reports))
    if undeclared:
        raise ValueError(
            f"strategy '{strategy}': predict reported undeclared metrics {undeclared}; "
            f"declare them in the class's `reports` (declared: {sorted(reports)})"
        )
    for name, v in vals.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"strategy '{strategy}': metric '{name}' must be a finite number, got {v!r}")
    for key in ("rounds", "queries"):
        v = p.get(key, 1)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"strategy '{strategy}': '{key}' must be an int >= 0, got {v!r}")
    return {
        "prediction": p["prediction"],
        "retrieved_ids": [str(i) for i in ids],
        "rounds": int(p.get("rounds", 1)),
        "queries": int(p.get("queries", 1)),
        "metrics": {n: float(v) for n, v in vals.items()},
        **({"error": p["error"]} if "error" in p else {}),
    }


def score(
    questions: Sequence[Question],
    preds: List[dict],
    single: List[List[str]],
    recall_ks: Sequence[int],
    reports: Sequence[str] = (),
) -> Dict[str, object]:
    """Every METRICS score over `preds` (aligned with `questions`), the single-step ids `single`,
    the reported metrics' means, and the per-question rows (`predictions`)."""
    ks = list(recall_ks)
    rows = []
    for q, p, s in zip(questions, preds, single):
        ids, gold = p["retrieved_ids"], q.gold_passage_ids
        sp = metrics.supporting_prf(ids, gold)
        row = {
            "id": q.id,
            "kind": q.meta.get("kind", ""),
            "question": q.question,
            "answers": q.answers,
            "prediction": p["prediction"],
            "retrieved_ids": ids,
            "gold_passage_ids": gold,
            "em": metrics.exact_match(p["prediction"], q.answers),
            "f1": metrics.token_f1(p["prediction"], q.answers),
            **{f"recall@{k}": metrics.all_gold_at_k(ids, gold, k) for k in ks},
            **{f"any_recall@{k}": metrics.any_gold_at_k(ids, gold, k) for k in ks},
            **{f"single_step_recall@{k}": metrics.all_gold_at_k(s, gold, k) for k in ks},
            **dict(zip(("sp_precision", "sp_recall", "sp_f1"), sp or (None, None, None))),
            "retrieved_per_question": float(len(set(ids))),
            "rounds": float(p.get("rounds", 1)),
            "queries": float(p.get("queries", 1)),
            **p["metrics"],
        }
        if "error" in p:
            row["error"] = p["error"]
        rows.append(row)
    keys = (
        ["em", "f1"]
        + [f"{b}@{k}" for b in ("recall", "any_recall", "single_step_recall") for k in ks]
        + ["sp_precision", "sp_recall", "sp_f1", "retrieved_per_question", "rounds", "queries"]
    )
    out: Dict[str, object] = {key: metrics.mean([r[key] for r in rows]) for key in keys}
    total_rounds = sum(r["rounds"] for r in rows)
    out["queries_per_round"] = sum(r["queries"] for r in rows) / total_rounds if total_rounds else math.nan
    out.update(errors=sum("error" in r for r in rows), n=len(rows), normalization=metrics.NORMALIZATION)
    for name in reports:  # mean over the questions that reported it; absent if none did
        vals = [r[name] for r in rows if name in r]
        if vals:
            out[name] = sum(vals) / len(vals)
    for kind in sorted({q.meta.get("kind", "") for q in questions} - {""}):
        sel = [r for r, q in zip(rows, questions) if q.meta.get("kind") == kind]
        for key in metrics.PER_KIND:
            for name in [key.replace("@k", f"@{k}") for k in ks] if "@k" in key else [key]:
                out[f"{name}/{kind}"] = metrics.mean([r[name] for r in sel])
    out["predictions"] = rows
    return out
