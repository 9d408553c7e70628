"""A strategy with an example phase and a collect-then-learn phase (loaded by import path).

Phase `sft` (examples=True) iterates over one (question, top-1 passage, answer) item per training
question, built with one batched index search. Phase `rl` (collect=True, `updates` optimizer steps
per collection) collects, without grad, each question's top-1 passage and a random weight (a draw
from torch's RNG, so an exact resume must restore the RNG at collection boundaries) and learns
from weighted answer log-likelihoods. Both losses are `LossSum`s, so accumulation is exact.
`calls` records what the trainer called, for the tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ragtune.config import positive
from ragtune.strategy import LossSum, Phase, Strategy


@dataclass
class Options:
    updates: int = positive(2)
    copies: int = positive(1)  # experience items per question


class CollectToy(Strategy):
    name = "collect_toy"
    summary = "test strategy: examples phase + collect-then-learn phase"
    Options = Options
    calls: list = []

    def phases(self):
        return [
            Phase("sft", frozenset({"generator"}), 0.5, examples=True),
            Phase("rl", frozenset({"generator"}), 0.5, collect=True, updates=self.opts.updates),
        ]

    def build_examples(self, phase, questions, rag):
        self.calls.append(("build", len(questions), torch.is_grad_enabled()))
        q = rag.encode_questions([x.question for x in questions])  # (N, H)
        rows = rag.search(q, 1)[:, 0].tolist()  # (N,)
        return [(x.question, rag.passage_texts[r], x.answers[0]) for x, r in zip(questions, rows)]

    def collect(self, batch, rag, ctx):
        self.calls.append(("collect", ctx.phase_step, len(batch), torch.is_grad_enabled()))
        q = rag.encode_questions([x.question for x in batch])  # (B, H)
        rows = rag.search(q, 1)[:, 0].tolist()
        w = torch.rand(len(batch) * self.opts.copies).tolist()  # RNG: resume must restore it
        items = [
            (x.question, rag.passage_texts[r], x.answers[0], w[i * self.opts.copies + c])
            for i, (x, r) in enumerate(zip(batch, rows))
            for c in range(self.opts.copies)
        ]
        return items, {"weight": sum(w) / len(w)}

    def loss(self, items, rag, ctx):
        self.calls.append(("loss", ctx.phase.name, ctx.phase_step, len(items)))
        qs, ps, ans = (list(t) for t in list(zip(*items))[:3])
        tok, mask = rag.generator.score_pairs(qs, ps, ans)  # (N, T)
        seq = (tok * mask).sum(-1)  # (N,)
        w = torch.tensor([it[3] for it in items]) if ctx.phase.collect else torch.ones(len(items))
        return LossSum(-(w.to(seq.device) * seq).sum(), float(len(items))), {}
