"""Core benchmarks: index search backends, synthetic-benchmark scaling, encoder/generator throughput.

Run: `make bench` (or `python bench/bench_core.py [--quick]`). Prints numbers and ratios; the
results we measured are recorded in docs/benchmarks.md with the machine and date.
"""

from __future__ import annotations

import argparse
import time

import torch


def timeit(fn, repeat: int = 3) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench_index(sizes, dim=384, n_queries=256, k=10):
    from omegaconf import OmegaConf

    from ragtune.config import IndexConfig
    from ragtune.index import DenseIndex

    print(f"## index search: {n_queries} queries, dim {dim}, k {k} (best of 3)")
    for n in sizes:
        g = torch.Generator().manual_seed(0)
        emb = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=-1)
        q = torch.nn.functional.normalize(torch.randn(n_queries, dim, generator=g), dim=-1)
        times, exact_rows = {}, None
        backends = (
            ("exact", "faiss_flat", "faiss_hnsw", "faiss_ivf") if n <= 100_000 else ("exact", "faiss_flat", "faiss_ivf")
        )
        for backend in backends:
            idx = DenseIndex(OmegaConf.structured(IndexConfig(backend=backend)))
            t_build = timeit(lambda idx=idx, emb=emb: idx.build(emb), repeat=1)
            times[backend] = timeit(lambda idx=idx, q=q: idx.search(q, k))
            rows = idx.search(q, k)[1]
            if exact_rows is None:
                exact_rows = rows
            overlap = sum(len(set(a) & set(b)) for a, b in zip(rows.tolist(), exact_rows.tolist())) / exact_rows.numel()
            print(
                f"N={n:>8} {backend:<11} build {t_build * 1e3:8.1f} ms  search {times[backend] * 1e3:8.2f} ms "
                f"({times[backend] / n_queries * 1e6:7.1f} us/query)  recall@{k} vs exact {overlap:.3f}  "
                f"time ratio vs exact {times[backend] / times['exact']:.2f}"
            )


def bench_synth(people):
    from ragtune.data.synth import SynthConfig, generate

    print("## synthetic benchmark generation")
    for n in people:
        t0 = time.perf_counter()
        data = generate(SynthConfig(n_people=n, n_train=1000, n_dev=100, n_test=100))
        dt = time.perf_counter() - t0
        print(f"people={n:>7} passages={len(data.corpus):>9} {dt:6.2f} s  ({len(data.corpus) / dt:,.0f} passages/s)")


def bench_models():
    from ragtune.config import load_config
    from ragtune.ledger import Ledger
    from ragtune.run import build_pipeline, load_data

    print("## default pipeline throughput (configs/default.yaml)")
    cfg = load_config(["configs/default.yaml"], ["run_dir=/tmp/ragtune-bench"])
    data = load_data(cfg.data)
    ledger = Ledger()
    t0 = time.perf_counter()
    m = build_pipeline(cfg, data, ledger)
    dt = time.perf_counter() - t0
    n = len(data.corpus)
    rate = n / ledger.totals()["forward_seconds"]["index"]
    print(f"build incl. corpus embedding: {dt:.1f} s for {n} passages ({rate:.0f} passages/s in the encoder)")
    qs = data.train[:16]
    ret = m.retrieve([q.question for q in qs], cfg.train.k)
    for p in m.generator.model.parameters():
        p.requires_grad_(True)

    def step():
        tok_lp, mask = m.generator.answer_logprobs([q.question for q in qs], ret.texts, [q.answers[0] for q in qs])
        (-(tok_lp.sum())).backward()

    t = timeit(step)
    print(
        f"generator forward+backward, 16 questions x K={cfg.train.k}: {t * 1e3:.0f} ms "
        f"({16 * cfg.train.k / t:.0f} sequences/s)"
    )
    with torch.no_grad():
        t = timeit(lambda: m.generator.generate([q.question for q in qs], [r[0] for r in ret.texts]))
    print(f"greedy generation, 16 prompts: {t * 1e3:.0f} ms")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(2)
    bench_index([10_000] if a.quick else [10_000, 100_000, 1_000_000])
    bench_synth([1_000] if a.quick else [1_000, 20_000, 120_000])
    if not a.quick:
        bench_models()


if __name__ == "__main__":
    main()
