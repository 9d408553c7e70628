"""The latent-passage strategies side by side: step time, generator sequences per step, and the
variance of their gradients on the same fixed batches (the JSA paper's claim, arXiv 2508.18168).

Run: `python bench/bench_latent.py [--config configs/default.yaml] [--steps 8] [--draws 16]`.
For each of topk_marginal, vrag and jsa (same config, same K, same batch size, same batches), the
script trains `--steps` optimizer steps (loss + backward + fused AdamW; the first one untimed),
counts the generator sequences each step scores (no-grad for the sampler, with grad for the
loss), then measures with `ragtune.diagnostics.gradient_variance` the spread of each trained
component's gradient over `--draws` draws on each of `--batches` fixed training batches, plus the
variance of the gradient norm across the timed steps' *different* batches. It prints one table
and the ratios jsa / topk_marginal and vrag / topk_marginal. Numbers: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ragtune.config import load_config
from ragtune.diagnostics import gradient_variance
from ragtune.ledger import Ledger
from ragtune.run import build_pipeline, load_data, seed_everything
from ragtune.strategy import StepContext
from ragtune.trainer import grad_norms

STRATEGIES = ("topk_marginal", "vrag", "jsa")


def measure(name: str, args) -> dict:
    cfg = load_config([args.config], [f"strategy.name={name}", "run_dir=/tmp/ragtune-bench-latent", *args.set])
    seed_everything(cfg.train.seed, cfg.train.threads)
    data = load_data(cfg.data)
    rag = build_pipeline(cfg, data, Ledger())
    phase = rag.strategy.phases()[0]
    groups = rag.component_params()
    for p in rag.parameters():
        p.requires_grad_(False)
    params = [p for c in sorted(phase.trains) for p in groups[c]]
    for p in params:
        p.requires_grad_(True)
    pgroups = [{"params": groups[c], "name": c} for c in sorted(phase.trains) if groups[c]]
    opt = torch.optim.AdamW(pgroups, lr=args.lr, fused=True)
    rag.set_modes(phase.trains)
    B, k = cfg.train.batch_size, cfg.train.k
    seqs = {"score": 0, "train": 0}
    orig = rag.generator.score_pairs

    def counting(q, p, a):
        seqs["train" if torch.is_grad_enabled() else "score"] += len(q)
        return orig(q, p, a)

    rag.generator.score_pairs = counting
    times, norms = [], {c: [] for c in phase.trains}
    for i in range(args.steps):
        ctx = StepContext(phase, i, i, args.steps, {}, k)
        batch = data.train[B * (i + args.batches) : B * (i + args.batches + 1)]  # never a fixed batch
        if i == 1:
            seqs = {"score": 0, "train": 0}
        t0 = time.perf_counter()
        loss, _ = rag.strategy.loss(batch, rag, ctx)
        loss.backward()
        _, per = grad_norms(opt)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i > 0:  # the first step warms caches up
            times.append(time.perf_counter() - t0)
            for c in norms:
                norms[c].append(per[c])
    rag.generator.score_pairs = orig  # count training steps only
    fixed = [data.train[B * j : B * (j + 1)] for j in range(args.batches)]
    ctx = StepContext(phase, args.steps, args.steps, args.steps, {}, k)
    gv = gradient_variance(rag, fixed, ctx, draws=args.draws)
    n = max(args.steps - 1, 1)
    return {
        "step_s": statistics.mean(times),
        "score_seqs": seqs["score"] / n,
        "train_seqs": seqs["train"] / n,
        "gv": gv["components"],
        "across": {c: statistics.pvariance(v) for c, v in norms.items() if len(v) > 1},
        "draws": gv["draws"],
        "batches": gv["batches"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--draws", type=int, default=16)
    ap.add_argument("--batches", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--set", nargs="*", default=[], help="extra key=value config overrides")
    ap.add_argument("--only", nargs="*", default=list(STRATEGIES))
    args = ap.parse_args()
    res = {name: measure(name, args) for name in args.only}
    print(f"config {args.config}; {args.steps - 1} timed steps; {args.draws} draws x {args.batches} fixed batches")
    print(f"{'strategy':<14} {'s/step':>7} {'seqs no-grad':>12} {'seqs grad':>9}  gradient spread per component")
    for name, r in res.items():
        spread = "; ".join(
            f"{c}: Var|g| {s['var_norm']:.3g}, E|g| {s['norm_mean']:.3g}, tr Cov {s['cov_trace']:.3g}, "
            f"rel {s['rel_var']:.3g}, Var|g| across batches {r['across'].get(c, float('nan')):.3g}"
            for c, s in sorted(r["gv"].items())
        )
        print(f"{name:<14} {r['step_s']:>7.3f} {r['score_seqs']:>12.1f} {r['train_seqs']:>9.1f}  {spread}")
    base = res.get("topk_marginal")
    if base:
        for name in (n for n in res if n != "topk_marginal"):
            r = res[name]
            rel = {
                c: r["gv"][c]["var_norm"] / base["gv"][c]["var_norm"] if base["gv"][c]["var_norm"] else float("inf")
                for c in base["gv"]
                if c in r["gv"]
            }
            print(
                f"ratio {name}/topk_marginal: step time {r['step_s'] / base['step_s']:.2f}x, sequences "
                f"{(r['score_seqs'] + r['train_seqs']) / base['train_seqs']:.2f}x, fixed-batch Var|g| "
                + ", ".join(f"{c} {v:.3g}x" for c, v in sorted(rel.items()))
            )


if __name__ == "__main__":
    main()
