"""Statistics over per-question scores: seeded bootstrap CIs and a paired significance test.

What: `bootstrap_ci` (percentile 95% interval of the mean, resampling questions) and
`paired_permutation_test` (two-sided sign-flip test of the mean paired difference, exact when
there are few non-zero differences, Monte Carlo otherwise). Why: differences between fine-tuning
strategies on a few hundred questions are often within noise; both numbers are deterministic
(seeded) so a leaderboard is reproducible bit for bit.
"""

from __future__ import annotations

import itertools
from typing import Dict, List, Sequence, Tuple

import numpy as np

from ragtune import rundir


def bootstrap_ci(
    values: Sequence[float], samples: int = 1000, seed: int = 0, level: float = 0.95
) -> Tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (NaNs if empty)."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(samples, x.size))].mean(axis=1)
    a = (1 - level) / 2
    return float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def paired_permutation_test(a: Sequence[float], b: Sequence[float], samples: int = 10000, seed: int = 0) -> float:
    """Two-sided p-value for mean(a - b) = 0 under random sign flips of the paired differences.
    Exact (all 2^n flips) for n <= 16 non-zero differences; else `samples` seeded flips (+1 smoothing)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.ndim != 1 or a.shape != b.shape:  # never broadcast a 1-element list against a longer one
        raise ValueError(f"paired test needs two equally long 1-D score lists, got {a.shape} and {b.shape}")
    d = a - b
    d = d[d != 0]
    if d.size == 0:
        return 1.0
    obs = abs(d.sum()) - 1e-12
    if d.size <= 16:
        signs = np.array(list(itertools.product((1, -1), repeat=d.size)))
        return float(np.mean(np.abs(signs @ d) >= obs))
    rng = np.random.default_rng(seed)
    signs = rng.choice((-1.0, 1.0), size=(samples, d.size))
    return float((1 + np.sum(np.abs(signs @ d) >= obs)) / (samples + 1))


def per_question(run_dirs: Sequence[str], split: str, metric: str, kinds: Sequence[str] = ()) -> Dict[str, float]:
    """question id -> metric averaged over the given runs (seeds), from their per-question
    predictions of `split`; only ids every run scored are kept, and with `kinds` only questions of
    those kinds (`meta.kind`: single, bridge, comparison). A question whose metric is undefined
    (None: e.g. supporting-passage recall without gold ids) is left out."""
    tables: List[Dict[str, float]] = []
    for d in run_dirs:
        rows = rundir.read_predictions(d, split)
        if rows is None:
            return {}
        tables.append(
            {
                str(r["id"]): float(r[metric])
                for r in rows
                if r.get(metric) is not None and (not kinds or r.get("kind") in kinds)
            }
        )
    if not tables:
        return {}
    ids = [i for i in tables[0] if all(i in t for t in tables)]
    return {i: float(np.mean([t[i] for t in tables])) for i in ids}
