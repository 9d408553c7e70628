"""Leaderboard rows and files: one row per strategy at its selected grid point.

What: `summarize` turns the selected runs of a strategy (one per seed) plus its whole grid into a
flat row: the decoder that answered each split (`{split}_decoder`, from the scores' `decoder`, e.g.
`thorough(beams=2)` or `<strategy>.predict`, so that rows decoded differently are told apart),
dev/test EM/F1 mean and std over seeds with a seeded bootstrap 95% CI over questions,
recall@k, every other number the evaluation reported (metrics a strategy reports, e.g.
`rounds`; seconds and eval FLOPs per question), the selected learning rates, FLOPs of the
selected run by kind (its phase-1 parent included) and of the whole grid search, wall-clock,
device-hours, peak memory, runs and failures. `write_leaderboard` writes leaderboard.csv (full
precision, what `ragtune compare` reads) and leaderboard.md (rounded, with the normalisation,
selection rule, machine and date). Why one module: the experiment runner and `ragtune compare`
must produce identical rows and tables.
"""

from __future__ import annotations

import csv
import io
import math
import platform
import time
from pathlib import Path
from statistics import mean, stdev
from typing import Dict, List, Optional, Sequence

from ragtune import fileio
from ragtune.experiment.records import FLOP_KINDS, devices, sum_costs
from ragtune.experiment.stats import bootstrap_ci, per_question
from ragtune.metrics import NORMALIZATION, get_metric

CI_METRICS = ("em", "f1")
# per-split numbers of the evaluation that are about its cost or health, not quality: a table of their own
EVAL_COST = {
    "rounds": ("rounds", ".2f"),
    "queries_per_round": ("queries/round", ".2f"),
    "seconds_per_question": ("s/question", ".3g"),
    "flops_per_question": ("eval FLOPs/question", ".3g"),
    "eval_batch_size": ("eval batch", ".0f"),
    "errors": ("errors", ".0f"),
}
# columns that measure time or memory: they legitimately differ between two executions
TIMING_COLUMNS = ("wall_s", "grid_wall_s", "device_hours", "grid_device_hours", "peak_cpu_mb", "peak_gpu_mb") + tuple(
    f"{s}_seconds_per_question_{x}" for s in ("dev", "test") for x in ("mean", "std")
)


def summarize(
    strategy: str,
    lrs: Dict[str, float],
    runs: Sequence[dict],
    grid_costs: Sequence[Optional[dict]],
    n_runs: int,
    n_failed: int,
    splits: Sequence[str],
    boot_samples: int = 1000,
    boot_seed: int = 0,
    status: str = "ok",
    reason: str = "",
) -> dict:
    """One row. `runs`: the selected runs, one per seed, each {dir, scores: {split: dict}, cost}
    with cost already chained over the runs it started from; `grid_costs`: every run's own cost."""
    row: dict = {
        "strategy": strategy,
        "status": status,
        "reason": reason,
        "lrs": " ".join(f"{c}={v:g}" for c, v in sorted(lrs.items())),
    }
    row.update({f"lr_{c}": v for c, v in sorted(lrs.items())})
    row["n_seeds"] = len(runs)
    norms = set()
    for split in splits:
        scored = [r["scores"].get(split) for r in runs]
        if not runs or any(s is None for s in scored):
            continue
        norms |= {s.get("normalization", "") for s in scored}
        row[f"{split}_n"] = scored[0].get("n")
        row[f"{split}_decoder"] = " / ".join(sorted({str(s["decoder"]) for s in scored if s.get("decoder")}))
        for key in [k for k, v in scored[0].items() if _is_metric(k, v)]:
            vals = [float(s[key]) for s in scored if key in s]
            row[f"{split}_{key}_mean"] = mean(vals)
            row[f"{split}_{key}_std"] = stdev(vals) if len(vals) > 1 else float("nan")
            if key in CI_METRICS:
                pq = per_question([r["dir"] for r in runs], split, key)
                lo, hi = bootstrap_ci(list(pq.values()), boot_samples, boot_seed)
                row[f"{split}_{key}_ci_lo"], row[f"{split}_{key}_ci_hi"] = lo, hi
    row["normalization"] = " / ".join(sorted(n for n in norms if n)) or NORMALIZATION
    costs = [r["cost"] for r in runs if r.get("cost")]
    for k in FLOP_KINDS:
        row[f"flops_{k}"] = mean(c[f"flops_{k}"] for c in costs) if costs else float("nan")
    grid = sum_costs(list(grid_costs))
    row["grid_flops_total_train"] = grid["flops_total_train"] if grid else 0
    row["wall_s"] = mean(c["wall_s"] for c in costs) if costs else float("nan")
    row["grid_wall_s"] = grid["wall_s"] if grid else 0.0
    row["device_hours"] = mean(c["device_hours"] for c in costs) if costs else float("nan")
    row["grid_device_hours"] = grid["device_hours"] if grid else 0.0
    row["device"] = devices(list(grid_costs or []))
    row["peak_cpu_mb"] = max((c["peak_cpu_bytes"] for c in costs), default=0) / 2**20
    row["peak_gpu_mb"] = max((c["peak_gpu_bytes"] for c in costs), default=0) / 2**20
    row["n_runs"], row["n_failed"] = n_runs, n_failed
    row["run_dirs"] = ";".join(r["dir"] for r in runs)
    return row


# per question kind (e.g. "sp_recall/bridge"): the multi-hop numbers kept in the row
PER_KIND_KEPT = ("em", "sp_recall", "rounds")
MULTI_HOP_KINDS = ("bridge", "comparison")


def _is_metric(key: str, value) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or key == "n":
        return False
    if "/" in key:
        base, kind = key.split("/", 1)
        return base in PER_KIND_KEPT and kind in MULTI_HOP_KINDS
    return True


def sort_rows(
    rows: List[dict], metric: str, splits: Sequence[str] = ("test", "dev"), higher: Optional[bool] = None
) -> List[dict]:
    """Best first on the first of `splits` a row has for `metric` (direction `higher`, by default
    from ragtune.metrics); rows without it last. Stable, so ties keep their order."""
    higher = get_metric(metric).higher_is_better if higher is None else higher

    def key(r):
        for split in splits:
            v = num(r.get(f"{split}_{metric}_mean"))
            if v is not None:
                return (0, -v if higher else v)
        return (1, 0.0)

    return sorted(rows, key=key)


def num(v) -> Optional[float]:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def columns(rows: Sequence[dict]) -> List[str]:
    return list(dict.fromkeys(k for r in rows for k in r))


def write_csv(path: Path, rows: Sequence[dict]) -> None:
    """Written whole, then renamed into place: a kill never leaves a torn leaderboard."""
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=columns(rows))
    w.writeheader()
    for r in rows:
        w.writerow({k: cell(v) for k, v in r.items()})
    fileio.write_text(path, buf.getvalue())


def cell(v):
    if isinstance(v, float):
        return "" if math.isnan(v) else repr(v)
    return v


def read_csv(path: Path) -> List[dict]:
    """Rows of a leaderboard CSV; a torn or ragged row is a CorruptFile naming the file and line."""
    with open(path, newline="") as f:
        text = f.read()
    if text and not text.endswith("\n"):
        raise fileio.CorruptFile(f"{path}: unreadable CSV (the last line is incomplete)")
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if header is None:
        raise fileio.CorruptFile(f"{path}: unreadable CSV (empty)")
    rows = []
    for line, fields in enumerate(reader, start=2):
        if len(fields) != len(header):
            raise fileio.CorruptFile(f"{path}:{line}: unreadable CSV ({len(fields)} fields, header has {len(header)})")
        rows.append(dict(zip(header, fields)))
    return rows


def fmt_score(r: dict, split: str, metric: str) -> str:
    """'12.5 ± 1.2 [10.1, 15.0]' in percent: mean ± std over seeds [bootstrap CI over questions]."""
    m = num(r.get(f"{split}_{metric}_mean"))
    if m is None:
        return "–"
    s, lo, hi = (num(r.get(f"{split}_{metric}_{x}")) for x in ("std", "ci_lo", "ci_hi"))
    out = f"{100 * m:.1f}" + (f" ± {100 * s:.1f}" if s is not None else "")
    return out + (f" [{100 * lo:.1f}, {100 * hi:.1f}]" if lo is not None and hi is not None else "")


def fmtnum(v, spec: str = ".3g") -> str:
    f = num(v)
    return "–" if f is None else format(f, spec)


def reported_columns(rows: Sequence[dict], split: str) -> List[str]:
    """`{split}_<name>_mean` columns of metrics some strategy reported (e.g. rounds): numbers
    that are neither an evaluator metric (ragtune.metrics) nor an evaluation-cost number."""
    out = []
    for k in columns(rows):
        if not (k.startswith(f"{split}_") and k.endswith("_mean")):
            continue
        name = k[len(split) + 1 : -len("_mean")]
        try:
            get_metric(name)
        except KeyError:
            if name not in EVAL_COST and name not in CI_METRICS:
                out.append(k)
    return out


def markdown_table(rows: Sequence[dict], splits: Sequence[str]) -> str:
    """The main table (also what `ragtune compare --format md` prints): the decoder, scores, recall@k
    and the strategy-reported metrics of the last split, and the training cost."""
    recall = [k for k in columns(rows) if k.startswith(f"{splits[-1]}_recall@") and k.endswith("_mean")]
    reported = reported_columns(rows, splits[-1])
    head = ["strategy", "selected lrs", "decoder"] + [f"{s} {m.upper()}" for s in reversed(splits) for m in CI_METRICS]
    head += [k[: -len("_mean")].replace("_", " ") for k in recall + reported]
    head += ["train FLOPs", "grid FLOPs", "wall s", "device-h", "peak MB", "runs (failed)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            str(r.get("label") or r["strategy"]) + ("" if r.get("status", "ok") == "ok" else f" ({r['status']})"),
            r.get("lrs") or "–",
            decoder_cell(r, splits),
        ]
        cells += [fmt_score(r, s, m) for s in reversed(splits) for m in CI_METRICS]
        cells += [fmtnum(100 * (num(r.get(k)) or 0), ".1f") if num(r.get(k)) is not None else "–" for k in recall]
        cells += [fmtnum(r.get(k)) for k in reported]
        peak = max(num(r.get("peak_cpu_mb")) or 0, num(r.get("peak_gpu_mb")) or 0)
        cells += [
            fmtnum(r.get("flops_total_train")),
            fmtnum(r.get("grid_flops_total_train")),
            fmtnum(r.get("wall_s"), ".1f"),
            fmtnum(r.get("device_hours"), ".2g"),
            fmtnum(peak, ".0f"),
            f"{r.get('n_runs', '–')} ({r.get('n_failed', '–')})",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def decoder_cell(r: dict, splits: Sequence[str]) -> str:
    """The decoder that answered the row's splits; named per split only when they differ."""
    per = {s: r.get(f"{s}_decoder") for s in splits if r.get(f"{s}_decoder")}
    if len(set(per.values())) > 1:
        return "; ".join(f"{s}: {d}" for s, d in per.items())
    return next(iter(per.values()), "–")


def multi_hop_table(rows: Sequence[dict], split: str) -> str:
    """EM, supporting-passage recall and retrieval rounds on the multi-hop question kinds of `split`
    (bridge, comparison); "" when no row has them."""
    cols = [(b, k) for k in MULTI_HOP_KINDS for b in PER_KIND_KEPT if any(f"{split}_{b}/{k}_mean" in r for r in rows)]
    if not cols:
        return ""
    lines = [
        "| strategy | " + " | ".join(f"{split} {b.replace('_', ' ')} {k}" for b, k in cols) + " |",
        "|" + "---|" * (len(cols) + 1),
    ]

    def cell(r: dict, b: str, k: str) -> str:
        v = num(r.get(f"{split}_{b}/{k}_mean"))
        return fmtnum(v, ".2f") if b == "rounds" or v is None else fmtnum(100 * v, ".1f")  # rounds: a count

    for r in rows:
        cells = [cell(r, b, k) for b, k in cols]
        lines.append(f"| {r.get('label') or r['strategy']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def eval_cost_table(rows: Sequence[dict], splits: Sequence[str]) -> str:
    """Per split: seconds and eval FLOPs per question, eval batch size, questions whose predict
    failed; "" when no row has any of them."""
    cols = [(s, k) for s in splits for k in EVAL_COST if any(num(r.get(f"{s}_{k}_mean")) is not None for r in rows)]
    if not cols:
        return ""
    lines = [
        "| strategy | " + " | ".join(f"{s} {EVAL_COST[k][0]}" for s, k in cols) + " |",
        "|" + "---|" * (len(cols) + 1),
    ]
    for r in rows:
        lines.append(
            f"| {r.get('label') or r['strategy']} | "
            + " | ".join(fmtnum(r.get(f"{s}_{k}_mean"), EVAL_COST[k][1]) for s, k in cols)
            + " |"
        )
    return "\n".join(lines)


def flops_table(rows: Sequence[dict]) -> str:
    kinds = list(FLOP_KINDS)
    lines = ["| strategy | " + " | ".join(kinds) + " | grid total_train | device |", "|" + "---|" * (len(kinds) + 3)]
    for r in rows:
        lines.append(
            f"| {r.get('label') or r['strategy']} | "
            + " | ".join(fmtnum(r.get(f"flops_{k}")) for k in kinds)
            + f" | {fmtnum(r.get('grid_flops_total_train'))} | {r.get('device') or '–'} |"
        )
    return "\n".join(lines)


def write_leaderboard(
    out: Path,
    rows: List[dict],
    name: str,
    splits: Sequence[str],
    select_metric: str,
    seeds: Sequence[int],
    boot: dict,
    launcher: str,
    higher_is_better: Optional[bool] = None,
) -> None:
    """leaderboard.csv + leaderboard.md for an experiment (`higher_is_better`: of `select_metric`,
    by default from ragtune.metrics)."""
    if higher_is_better is None:
        higher_is_better = get_metric(select_metric).higher_is_better
    rows = sort_rows(rows, select_metric, higher=higher_is_better)
    write_csv(out / "leaderboard.csv", rows)
    higher = "higher" if higher_is_better else "lower"
    norms = sorted({r["normalization"] for r in rows if r.get("normalization")}) or [NORMALIZATION]
    device = devices([{"device": str(r.get("device") or "")} for r in rows])
    failed = [r for r in rows if r.get("status") != "ok"]
    md = [
        f"# Leaderboard: {name}",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M %Z')} · machine {platform.node()} · device {device or 'unknown'}"
        f" · launcher {launcher}",
        "",
        f"- Answers scored by exact match and token F1 after **{' / '.join(norms)}** answer normalisation "
        "(lower-case, ASCII punctuation and articles removed, whitespace collapsed); numbers in %.",
        f"- One row per strategy at the grid point selected on **dev {select_metric}** ({higher} is better), "
        f"averaged over seeds {list(seeds)}. Grid runs evaluate dev only (`eval.splits=[dev]`); test is "
        "evaluated afterwards for the selected runs only, so test never influences selection.",
        f"- Scores: mean ± std over seeds [95% bootstrap CI over questions of the seed-averaged "
        f"per-question score, {boot['samples']} resamples, seed {boot['seed']}].",
        f"- FLOPs are analytic training FLOPs (`total_train` = {' + '.join(FLOP_KINDS[:-1])}; evaluation "
        "excluded) of the selected run, including the phase-1 run it started from; grid FLOPs sum every run "
        "of the search once, failed runs included when they recorded a cost.",
        "",
        markdown_table(rows, splits),
        "",
        "## Training FLOPs of the selected run by kind",
        "",
        flops_table(rows),
    ]
    evals = eval_cost_table(rows, splits)
    if evals:
        md += ["", "## Evaluation cost per question", "", evals]
    multi = multi_hop_table(rows, splits[-1])
    if multi:
        md += ["", f"## Multi-hop questions ({splits[-1]}): EM, supporting-passage recall (%), rounds", "", multi]
    if any(r.get("search") for r in rows):
        md += ["", "## Search per strategy", ""] + [
            f"- {r['strategy']}: {r['search']}; runs: {r['n_runs']}, failed or diverged: {r['n_failed']}"
            for r in rows
            if r.get("search")
        ]
    if failed:
        md += ["", "## Strategies without a result", ""] + [
            f"- {r['strategy']}: {r['status']}: {r.get('reason', '')}" for r in failed
        ]
    fileio.write_text(out / "leaderboard.md", "\n".join(md) + "\n")
