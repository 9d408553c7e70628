"""`ragtune compare DIR... [--metric em] [--format md|csv] [--plot FILE.png]` (parsed in ragtune.cli).

What: reads experiment directories (leaderboard.csv + selected.json, written by `ragtune
experiment`) and single run directories (their result and later `ragtune eval` scores, read
through ragtune.rundir), prints one table sorted on `--metric` (plus the evaluation cost per
question when runs report it), runs a paired significance test between the top two rows (and
every `--pair A B`) on per-question scores (matched by question id), and optionally plots the metric against training
FLOPs with the quality/cost Pareto front.
Why a separate command: to compare runs from different experiments, machines or dates honestly.
Exits 1, naming the directory, when a directory is missing, unfinished or failed.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from ragtune import rundir
from ragtune.experiment.leaderboard import (
    cell,
    columns,
    eval_cost_table,
    markdown_table,
    num,
    read_csv,
    sort_rows,
    summarize,
)
from ragtune.experiment.records import chained_cost
from ragtune.experiment.stats import paired_permutation_test, per_question
from ragtune.metrics import get_metric


class CompareError(Exception):
    """A directory that cannot be compared; the message names it."""


def experiment_rows(d: Path) -> List[dict]:
    rows = read_csv(d / "leaderboard.csv")
    for r in rows:
        r["source"] = str(d)
        r["_dirs"] = [x for x in (r.get("run_dirs") or "").split(";") if x]
    return rows


def run_row(d: Path) -> dict:
    """A leaderboard row for one run directory (its cost includes the runs it was initialised from)."""
    try:
        res = rundir.read_result(d) or {}
    except ValueError as e:
        raise CompareError(str(e)) from e
    if res.get("status") != "ok":
        raise CompareError(f"{d}: run {res.get('status')}: {res.get('reason', '')}")
    scores = rundir.all_scores(d, res)
    cost = chained_cost(d)
    row = summarize(
        res.get("strategy", "?"),
        {},
        [{"dir": str(d), "scores": scores, "cost": cost}],
        [cost],
        1,
        0,
        [s for s in ("dev", "test") if scores.get(s)],
    )
    row.update(
        label=f"{row['strategy']} ({d.name})",
        lrs=" ".join(f"{c}={v:g}" for c, v in sorted((res.get("lr") or {}).items())),
        source=str(d),
        _dirs=[str(d)],
    )
    return row


def load_rows(d: Path) -> List[dict]:
    if not d.is_dir():
        raise CompareError(f"{d}: no such directory")
    if (d / "leaderboard.csv").exists():
        return experiment_rows(d)
    if rundir.result_path(d).exists():
        return [run_row(d)]
    if (d / "runs.csv").exists() or (d / "experiment.yaml").exists():
        raise CompareError(f"{d}: experiment has no leaderboard.csv yet (unfinished? re-run `ragtune experiment`)")
    if rundir.is_run_dir(d):
        raise CompareError(f"{d}: run has no {rundir.RESULT} (unfinished or killed; re-run `ragtune train` to resume)")
    raise CompareError(f"{d}: neither an experiment directory (leaderboard.csv) nor a run directory ({rundir.RESULT})")


def significance(rows: List[dict], split: str, metric: str, samples: int, seed: int, kinds: Sequence[str] = ()) -> str:
    """Paired sign-flip permutation test between the first two rows on per-question scores (each
    question's score averaged over a row's seeds), on the questions of `kinds` (all when empty)."""
    return paired(rows[0], rows[1], split, metric, samples, seed, kinds)


def named_pair(rows: List[dict], a: str, b: str) -> tuple:
    """The rows named `a` and `b` (a label or a strategy name); CompareError if one is missing."""
    by = {_name(r): r for r in rows}
    by.update({r["strategy"]: r for r in rows if r["strategy"] not in by})
    missing = [n for n in (a, b) if n not in by]
    if missing:
        raise CompareError(f"--pair: no finished row named {', '.join(missing)} (rows: {', '.join(sorted(by))})")
    return by[a], by[b]


def paired(a: dict, b: dict, split: str, metric: str, samples: int, seed: int, kinds: Sequence[str] = ()) -> str:
    pa, pb = per_question(a["_dirs"], split, metric, kinds), per_question(b["_dirs"], split, metric, kinds)
    ids = [i for i in pa if i in pb]
    what = f"{split} {metric}" + (f" on {'+'.join(kinds)} questions" if kinds else "")
    if not ids:
        return f"paired test skipped: no per-question {what} shared by {_name(a)} and {_name(b)}"
    xa, xb = [pa[i] for i in ids], [pb[i] for i in ids]
    p = paired_permutation_test(xa, xb, samples, seed)
    diff = (sum(xa) - sum(xb)) / len(ids)
    n_diff = sum(1 for x, y in zip(xa, xb) if x != y)
    how = "exact" if n_diff <= 16 else f"{samples} samples, seed {seed}"
    return (
        f"paired test ({what}, {_name(a)} vs {_name(b)}): mean difference {100 * diff:+.2f} points "
        f"over {len(ids)} questions matched by id ({n_diff} differ), p = {p:.4g} "
        f"(two-sided sign-flip permutation test, {how})"
    )


def _name(r: dict) -> str:
    return str(r.get("label") or r["strategy"])


def plot(rows: List[dict], split: str, metric: str, path: str) -> None:
    """Metric against training FLOPs (log x) per row, with the quality/cost Pareto front."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    higher = get_metric(metric).higher_is_better
    pts = [(num(r.get("flops_total_train")), num(r.get(f"{split}_{metric}_mean")), r) for r in rows]
    pts = [(x, y, r) for x, y, r in pts if x is not None and y is not None]
    if not pts:
        raise CompareError(f"nothing to plot: no row has FLOPs and {split} {metric}")
    floor = min([x for x, _, _ in pts if x > 0], default=1.0) / 10
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for x, y, r in pts:
        lo, hi = num(r.get(f"{split}_{metric}_ci_lo")), num(r.get(f"{split}_{metric}_ci_hi"))
        err = [[100 * (y - lo)], [100 * (hi - y)]] if lo is not None and hi is not None else None
        ax.errorbar([max(x, floor)], [100 * y], yerr=err, fmt="o", capsize=3, label=_name(r))
    front, best = [], None
    for x, y, _ in sorted(pts, key=lambda p: (p[0], -p[1] if higher else p[1])):
        if best is None or (y > best if higher else y < best):
            front.append((max(x, floor), 100 * y))
            best = y
    ax.step(
        [p[0] for p in front],
        [p[1] for p in front],
        where="post",
        color="grey",
        ls="--",
        marker="s",
        mfc="none",
        ms=12,
        label="Pareto front",
    )
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs of the selected run (total_train, log scale)")
    ax.set_ylabel(f"{split} {metric} (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare(
    dirs: Sequence[str],
    metric: str = "em",
    split: Optional[str] = None,
    fmt: str = "md",
    plot_path: Optional[str] = None,
    samples: int = 10000,
    seed: int = 0,
    pairs: Sequence[Sequence[str]] = (),
    kinds: Sequence[str] = (),
) -> int:
    """Print the comparison of `dirs`; returns the exit code (1 naming every bad directory or pair,
    2 for an unknown metric). `pairs`: extra paired tests [(row a, row b)] besides the top two;
    `kinds`: the paired tests use only questions of these kinds (e.g. bridge, comparison)."""
    try:
        get_metric(metric)
    except KeyError as e:
        print(f"compare: error: --metric: {e.args[0]}", file=sys.stderr)
        return 2
    rows, errors = [], []
    for d in dirs:
        try:
            got = load_rows(Path(d))
        except CompareError as e:
            errors.append(str(e))
            continue
        for r in got:
            if len(dirs) > 1 and not r.get("label"):
                r["label"] = f"{Path(d).name}/{r['strategy']}"
            if r.get("status", "ok") != "ok":
                errors.append(f"{d}: strategy {r['strategy']} {r['status']}: {r.get('reason', '')}")
        rows += got
    ok = [r for r in rows if r.get("status", "ok") == "ok"]
    split = split or ("test" if ok and all(num(r.get(f"test_{metric}_mean")) is not None for r in ok) else "dev")
    rows = sort_rows(rows, metric, (split,))
    if rows:
        if fmt == "csv":
            w = csv.DictWriter(
                sys.stdout,
                fieldnames=[c for c in columns(rows) if not c.startswith("_")],
                extrasaction="ignore",
                lineterminator="\n",
            )
            w.writeheader()
            for r in rows:
                w.writerow({k: cell(v) for k, v in r.items() if not k.startswith("_")})
        else:
            print(markdown_table(rows, ["dev", "test"]))
            evals = eval_cost_table(rows, ["dev", "test"])
            if evals:
                print("\nevaluation cost per question:\n" + evals)
            print(f"\nsorted on {split} {metric}")
    ok = [r for r in rows if r.get("status", "ok") == "ok"]
    if len(ok) >= 2:
        print(significance(ok, split, metric, samples, seed, kinds), file=sys.stderr if fmt == "csv" else sys.stdout)
    top = tuple(_name(r) for r in ok[:2]) if len(ok) >= 2 else ()
    for a, b in pairs:
        try:
            ra, rb = named_pair(ok, a, b)
            if (_name(ra), _name(rb)) == top:  # already printed: the test between the top two rows
                continue
            print(paired(ra, rb, split, metric, samples, seed, kinds), file=sys.stderr if fmt == "csv" else sys.stdout)
        except CompareError as e:
            errors.append(str(e))
    if plot_path and ok:
        try:
            plot(ok, split, metric, plot_path)
            print(f"plot written to {plot_path}", file=sys.stderr)
        except CompareError as e:
            errors.append(str(e))
    for e in errors:
        print(f"compare: error: {e}", file=sys.stderr)
    return 1 if errors else 0
