"""Scale on one machine: a ~1M-passage synthetic world trains a strategy with the tiny models.

Run: `python bench/bench_scale.py [--people 120000] [--steps 4] [--strategy independent]`
(`--people 120000` is about 1.04M passages: the synthetic generator makes ~8.7 passages per
person, so no filler passages are needed). What it does and prints:

1. `ragtune train configs/tiny.yaml` on that world in a child process (fresh cache: the synthetic
   data, the retriever's tokenizer, the generator's and the index are all built), with
   `index.backend=auto` (the default); prints the child's peak RSS (`getrusage` of the child, so
   nothing of this parent counts), the run's wall-clock phases from result.json, and the index
   info the run recorded (backend searched, build seconds, recall vs exact, tokenise/embed seconds,
   padding).
2. In this process, from the stored index (`<cache>/index`, referenced by final.pt) and the
   trained query tower: search ms per batch of 16 real question embeddings, exact (torch) vs the
   approximate index `auto` built, and the approximate index's recall@10 against exact on them.
3. With `--minilm-sort` (or `--only-minilm-sort`, nothing else): the default corpus
   (configs/default.yaml) with its retriever (MiniLM), file-order vs length-sorted batches:
   padding, embedding seconds in alternating passes, and how many rows differ.
4. With `--refresh`: two refreshes of the corpus with the initial passage tower, the first
   tokenising, the second from the cached token ids, then one in file order (no length sort):
   seconds each, and the largest difference between sorted and file-order embeddings.

Numbers we measured are in docs/benchmarks.md with the machine and date.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from ragtune.data.schema import ConcatTexts

ROOT = Path(__file__).resolve().parents[1]


def overrides(a) -> list:
    synth = f"{{n_people: {a.people}, n_train: {a.train}, n_dev: 16, n_test: 16, distractors_per_question: 4}}"
    return [
        f"strategy.name={a.strategy}",
        f"data.synth.options={synth}",
        f"data.cache_dir={a.out}/cache",
        f"run_dir={a.out}/run",
        f"train.steps={a.steps}",
        f"train.save_every={a.steps}",
        f"train.threads={a.threads}",
        "train.batch_size=16",
        "eval.splits=[dev]",
        "eval.batch_size=16",
        *a.override,
    ]


def train_child(a) -> dict:
    cmd = [sys.executable, "-m", "ragtune.cli", "train", str(ROOT / "configs" / "tiny.yaml"), *overrides(a)]
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    rc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}).returncode
    wall = time.perf_counter() - t0
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # Linux: KiB, largest child
    print(f"train child: exit {rc}, {wall:.0f} s wall, peak RSS {peak_kib / 2**20:.2f} GiB", flush=True)
    if rc != 0:
        raise SystemExit(rc)
    result = json.loads((Path(a.out) / "run" / "result.json").read_text())
    cost = result["cost"]
    print("wall seconds by phase:", {k: round(v, 1) for k, v in cost.get("wall_seconds", {}).items()})
    print("peak memory (ledger):", {k: f"{v / 2**30:.2f} GiB" for k, v in cost.get("peak_memory_bytes", {}).items()})
    info = result.get("index", {})
    print("index:", json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in info.items()}))
    if info.get("padded_tokens"):
        print(f"padding: {info['padded_tokens'] / info['real_tokens']:.3f}x the real tokens (length-sorted)")
    return {"peak_rss_gib": peak_kib / 2**20, "wall": wall, "result": result}


def load_parts(a):
    """The run's data, retriever (cached tokenizer, trained query tower) and stored index."""
    from omegaconf import OmegaConf  # noqa: F401

    from ragtune.config import load_config
    from ragtune.index_cache import store_of
    from ragtune.ledger import Ledger
    from ragtune.retriever import build_retriever
    from ragtune.run import load_data

    cfg = load_config([str(ROOT / "configs" / "tiny.yaml")], overrides(a))
    data = load_data(cfg.data)
    texts = ConcatTexts(data.corpus.model_texts, [q.question for q in data.train])  # as run.build_pipeline
    retriever = build_retriever(cfg.retriever, texts, Ledger("bench"), cfg.train.seed, cfg.data.cache_dir)
    del texts
    final = torch.load(Path(a.out) / "run" / "final.pt", map_location="cpu", weights_only=False)
    pre = "retriever.query_encoder."
    q_state = {k[len(pre) :]: v for k, v in final["weights"].items() if k.startswith(pre)}
    if q_state:
        retriever.query_encoder.load_state_dict(q_state)
    ref = final["index"]
    emb = store_of(cfg).get(ref["ref"], ref.get("digest"))["emb"] if "ref" in ref else ref["emb"]
    return cfg, data, retriever, emb


def bench_search(cfg, data, retriever, emb, k=10, batch=16):
    from omegaconf import OmegaConf

    from ragtune.index import DenseIndex

    questions = [q.question for q in data.train + data.dev + data.test]
    with torch.no_grad():
        q = torch.cat([retriever.encode_queries(questions[i : i + 64]) for i in range(0, len(questions), 64)])
    batches = [q[i : i + batch] for i in range(0, q.shape[0] - batch + 1, batch)]
    print(f"## search: {len(batches)} batches of {batch} real question embeddings, N={emb.shape[0]}, d={emb.shape[1]}")
    rows = {}
    for backend in ("exact", "auto"):
        icfg = OmegaConf.merge(cfg.index, {"backend": backend})
        idx = DenseIndex(icfg)
        idx.build(emb)
        t0 = time.perf_counter()
        plan = idx.prepare("cpu")
        build_s = time.perf_counter() - t0
        idx.search(batches[0], k)  # warm-up
        times = []
        for b in batches:
            t0 = time.perf_counter()
            idx.search(b, k)
            times.append(time.perf_counter() - t0)
        rows[backend] = torch.cat([idx.search(b, k)[1] for b in batches])
        times.sort()
        print(
            f"{backend:>5} -> {plan.backend} ({plan.where}, nlist {plan.ivf_nlist}, nprobe {plan.ivf_nprobe}): "
            f"prepare {build_s:.1f} s, search median {times[len(times) // 2] * 1e3:.1f} ms/batch, "
            f"min {times[0] * 1e3:.1f} ms"
            + (
                f"; recall@{idx.info['recall_k']} on passage embeddings {idx.info['recall']:.3f}"
                if plan.approximate
                else ""
            )
        )
    hits = sum(len(set(x) & set(y)) for x, y in zip(rows["auto"].tolist(), rows["exact"].tolist()))
    print(f"approximate recall@{k} vs exact on the real question embeddings: {hits / rows['exact'].numel():.3f}")


def bench_refresh(cfg, data, a):
    """Refresh twice (tokenising, then cached ids), then once in file order, with the initial tower."""
    from torch import nn

    from ragtune.index import DenseIndex
    from ragtune.ledger import Ledger
    from ragtune.pipeline import RAGPipeline
    from ragtune.retriever import build_retriever

    texts = ConcatTexts(data.corpus.model_texts, [q.question for q in data.train])  # as run.build_pipeline
    ledger = Ledger("bench")
    retriever = build_retriever(cfg.retriever, texts, ledger, cfg.train.seed, cfg.data.cache_dir)
    del texts
    rag = RAGPipeline(retriever, None, DenseIndex(cfg.index), data.corpus, ledger, nn.Module())
    bs = cfg.index.batch_size
    out = {}
    for name in ("first (tokenises)", "second (cached ids)"):
        t0 = time.perf_counter()
        rag.refresh_index(bs)
        out[name] = time.perf_counter() - t0
        info = rag.index.info
        print(
            f"refresh {name}: {out[name]:.1f} s (tokenise {info['refresh_tokenize_seconds']:.1f} s, "
            f"embed {info['refresh_embed_seconds']:.1f} s, index {info.get('build_seconds', 0):.1f} s)",
            flush=True,
        )
    sorted_emb, sorted_embed_s = rag.index.emb, rag.index.info["refresh_embed_seconds"]
    sorted_pad = rag.index.info["padded_tokens"] / rag.index.info["real_tokens"]
    rag.index.cfg.sort_by_length = False
    rag.refresh_index(bs)
    info = rag.index.info
    diff = (rag.index.emb - sorted_emb).abs().max().item()
    pad = info["padded_tokens"] / info["real_tokens"]
    print(
        f"file order: embed {info['refresh_embed_seconds']:.1f} s vs sorted {sorted_embed_s:.1f} s "
        f"({info['refresh_embed_seconds'] / sorted_embed_s:.2f}x); padding {pad:.3f}x "
        f"vs {sorted_pad:.3f}x; max |sorted - file order| = {diff:.2e}; "
        f"second refresh {out['first (tokenises)'] / out['second (cached ids)']:.2f}x faster than the first"
    )


def bench_minilm_sort(passes: int = 2):
    """configs/default.yaml's corpus and retriever: file order vs length-sorted embedding."""
    import numpy as np

    from ragtune.config import load_config
    from ragtune.ledger import Ledger
    from ragtune.retriever import build_retriever
    from ragtune.run import load_data

    cfg = load_config([str(ROOT / "configs" / "default.yaml")], ["run_dir=/tmp/ragtune-bench-sort"])
    data = load_data(cfg.data)
    texts = data.corpus.model_texts
    r = build_retriever(cfg.retriever, texts, Ledger("bench"), cfg.train.seed)
    tok = r.passage_tokens(texts)
    bs, lens, n = cfg.index.batch_size, tok.lengths, len(texts)
    print(f"## {cfg.retriever.model} on the default corpus: {n} passages, batches of {bs}")
    ref = None
    for name, order in [("file order", np.arange(n)), ("sorted", np.argsort(lens, kind="stable"))] * passes:
        padded = sum(int(lens[order[i : i + bs]].max()) * len(order[i : i + bs]) for i in range(0, n, bs))
        out = None
        t0 = time.perf_counter()
        with torch.no_grad():
            for i in range(0, n, bs):
                rows = order[i : i + bs]
                emb = r.encode_tokens(tok.batch(rows), r.doc_encoder, "doc_encoder", "index")
                out = torch.empty(n, emb.shape[-1]) if out is None else out
                out[torch.from_numpy(rows)] = emb
        dt = time.perf_counter() - t0
        ref = out if ref is None else ref
        differ = int(((out - ref).abs().max(1).values > 0).sum())
        print(
            f"{name:>10}: padding {padded / lens.sum():.3f}x, embed {dt:.1f} s, rows differing from file order {differ}"
        )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--people", type=int, default=120_000, help="120000: ~1.04M passages")
    ap.add_argument("--train", type=int, default=64, help="training questions")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--strategy", default="independent")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="/tmp/ragtune-bench-scale")
    ap.add_argument("--skip-train", action="store_true", help="reuse the run in --out")
    ap.add_argument("--refresh", action="store_true", help="also time refreshes (3 corpus embeddings)")
    ap.add_argument("--minilm-sort", action="store_true", help="also file order vs sorted on the default corpus")
    ap.add_argument("--only-minilm-sort", action="store_true")
    ap.add_argument("override", nargs="*", help="extra key=value overrides for the run")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(time.strftime("%Y-%m-%d %H:%M:%S"), f"torch {torch.__version__}, {os.cpu_count()} CPUs", flush=True)
    if a.only_minilm_sort:
        return bench_minilm_sort()
    if not a.skip_train:
        train_child(a)
    cfg, data, retriever, emb = load_parts(a)
    print(f"corpus: {len(data.corpus)} passages, {len(data.train)} training questions", flush=True)
    bench_search(cfg, data, retriever, emb)
    if a.refresh:
        del retriever, emb
        bench_refresh(cfg, data, a)
    if a.minilm_sort:
        bench_minilm_sort()


if __name__ == "__main__":
    main()
