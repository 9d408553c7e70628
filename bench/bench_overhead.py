"""Framework overhead: ragtune's training step against a hand-written torch loop doing the same work.

Run: `python bench/bench_overhead.py [--steps N] [--config configs/default.yaml]`. For each
strategy phase below, both loops start from the same weights, draw the same batches, run the
same models on the same passages with the same loss and the same AdamW (fused) and clipping; the
script checks that their losses agree step by step and prints seconds per step and the ratio
ragtune / hand-written. The target is a ratio <= 1.03 at the default scale (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ragtune import losses
from ragtune.config import load_config
from ragtune.ledger import Ledger
from ragtune.run import build_pipeline, load_data, seed_everything
from ragtune.sampler import BatchSampler
from ragtune.strategy import StepContext
from ragtune.trainer import Trainer, adamw, phase_settings

CASES = [("joint", "joint"), ("two_phase", "generator"), ("independent", "generator")]


def manual_loss(name: str, phase: str, rag, batch, k: int):
    """The strategy's loss written out by hand from the wrappers (no strategy or pipeline code)."""
    questions = [q.question for q in batch]
    answers = [q.answers[0] for q in batch]
    retr, gen = rag.retriever, rag.generator
    grad_q = name == "joint"
    with torch.set_grad_enabled(grad_q):
        q = retr.encode_queries(questions)  # (B, H)
        rows = rag.index.search(q, k)[1]  # (B, K)
        scores = torch.einsum("bh,bkh->bk", q, rag.index.lookup(rows)) / retr.temperature  # (B, K)
    texts = [[rag.passage_texts[r] for r in row] for row in rows.tolist()]
    tok_lp, mask = gen.answer_logprobs(questions, texts, answers)  # (B, K, T), (B, T)
    if name == "independent":
        return losses.nll_given_passages(tok_lp, mask)
    return losses.rag_token_nll(scores, tok_lp, mask)


def run_case(cfg_file: str, name: str, phase_name: str, steps: int, impl: str = "auto"):
    cfg = load_config(
        [cfg_file],
        [
            f"strategy.name={name}",
            "run_dir=/tmp/ragtune-bench-overhead",
            f"train.steps={steps}",
            "train.progress=false",
            "train.schedule=constant",
            "train.warmup_steps=0",
            f"train.adamw_impl={impl}",
        ],
    )
    seed_everything(cfg.train.seed, cfg.train.threads)
    data = load_data(cfg.data)
    rag = build_pipeline(cfg, data, Ledger())
    init = {k: v.clone() for k, v in rag.state_dict().items()}
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    from ragtune.run import _accelerator

    trainer = Trainer(cfg, rag, data.train, data.dev, Path(cfg.run_dir), _accelerator("no"))
    phase = next(p for p in rag.strategy.phases() if p.name == phase_name)

    def framework():
        rag.load_state_dict(init)
        torch.manual_seed(0)  # the same dropout masks in both loops
        trainer.sampler = BatchSampler(len(data.train), cfg.train.batch_size, cfg.train.seed)
        opt, sched, s = trainer._start_phase(phase, steps)
        rag.set_modes(phase.trains)
        out, t = [], 0.0
        for i in range(steps):
            t0 = time.perf_counter()
            logs = trainer._train_step(opt, sched, trainer._ctx(phase, i, steps, opt), s["clip_norm"])
            rag.strategy.on_step_end(rag, StepContext(phase, i + 1, i + 1, steps, {}, cfg.train.k))
            t += time.perf_counter() - t0 if i >= 2 else 0.0
            out.append(logs["loss"])
        return out, t / (steps - 2)

    def hand_written():
        rag.load_state_dict(init)
        torch.manual_seed(0)
        sampler = BatchSampler(len(data.train), cfg.train.batch_size, cfg.train.seed)
        for p in rag.parameters():
            p.requires_grad_(False)
        s = phase_settings(cfg.train, rag.strategy, phase)
        groups = []
        params_by = rag.component_params()
        for comp in sorted(phase.trains):
            for p in params_by[comp]:
                p.requires_grad_(True)
            groups.append({"params": params_by[comp], "lr": s["lr"][comp]})
        opt = adamw(groups, s, impl)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
        rag.set_modes(phase.trains)
        params = [p for g in groups for p in g["params"]]
        out, t = [], 0.0
        for i in range(steps):
            t0 = time.perf_counter()
            batch = [data.train[j] for j in sampler.next()]
            loss = manual_loss(name, phase_name, rag, batch, cfg.train.k)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, s["clip_norm"])
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            t += time.perf_counter() - t0 if i >= 2 else 0.0
            out.append(loss.item())
        return out, t / (steps - 2)

    results = {}
    for order in range(2):  # alternate the order so neither loop always runs on a warm cache
        for label, fn in (("ragtune", framework), ("torch", hand_written))[:: 1 if order == 0 else -1]:
            losses_, sec = fn()
            results.setdefault(label, []).append(sec)
            results[f"{label}_loss"] = losses_
    same = all(abs(a - b) <= 1e-5 * max(1.0, abs(b)) for a, b in zip(results["ragtune_loss"], results["torch_loss"]))
    fw, hw = min(results["ragtune"]), min(results["torch"])
    print(
        f"{name:<12} {phase_name:<10} adamw={impl:<8} ragtune {fw * 1e3:7.1f} ms/step  "
        f"torch {hw * 1e3:7.1f} ms/step  ratio {fw / hw:.3f}  identical losses: {same}",
        flush=True,
    )
    return fw, results["ragtune_loss"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--only", default="", help="run only this strategy's case (e.g. two_phase)")
    ap.add_argument("--no-adamw", action="store_true", help="skip the AdamW comparison")
    a = ap.parse_args()
    torch.set_num_threads(2)
    print(f"## framework overhead ({a.config}, {a.steps} steps, first 2 not timed, best of 2)")
    for name, phase in CASES:
        if not a.only or a.only == name:
            run_case(a.config, name, phase, a.steps)
    if a.no_adamw:
        return
    print("## AdamW implementation (joint): fused (the default) against the per-tensor loop")
    fused, lf = run_case(a.config, "joint", "joint", a.steps, "auto")
    loop, ll = run_case(a.config, "joint", "joint", a.steps, "for_loop")
    rel = max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(lf, ll))
    print(
        f"fused step {fused * 1e3:.1f} ms vs per-tensor {loop * 1e3:.1f} ms: {loop / fused:.2f}x faster; "
        f"max relative loss difference {rel:.1e}"
    )


if __name__ == "__main__":
    main()
