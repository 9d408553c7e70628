"""A strategy that lives outside ragtune (loaded as `strategy.name=toy_strategy:PolyakToy`).

It exercises every part of the contract a real latent-passage or RL strategy needs: a trainable
owned tower (a posterior-like encoder of "question [SEP] answer", learning rate like the query
encoder's), a frozen Polyak-averaged copy of it updated only in `on_step_end`, non-parameter
state (`extra_state`: a per-question cache and a counter), per-question `predict` metrics, and a
`LossSum` loss (summed over answer tokens, normalised by the trainer).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from ragtune.config import positive
from ragtune.strategy import LossSum, Part, Phase, Strategy


@dataclass
class Options:
    tau: float = positive(0.5)  # Polyak rate of the target tower
    max_length: int = positive(48)


class PolyakToy(Strategy):
    name = "polyak_toy"
    summary = "test strategy: owned posterior tower + Polyak target"
    Options = Options
    reports = {"toy_rounds": "retrieval rounds (always 1)"}

    def phases(self):
        return [Phase("main", frozenset({"posterior", "generator"}))]

    def parts(self):
        return [Part("posterior", trainable=True, lr_like="query_encoder"), Part("target", trainable=False)]

    def setup(self, rag):
        self.posterior = copy.deepcopy(rag.retriever.query_encoder)
        self.target = copy.deepcopy(self.posterior)
        self.cache = {}
        self.updates = 0

    def _post(self, rag, batch, tower, name):
        texts = [f"{q.question} [SEP] {q.answers[0]}" for q in batch]
        return rag.encode(texts, tower, name, self.opts.max_length)  # (B, H)

    def loss(self, batch, rag, ctx):
        questions = [q.question for q in batch]
        with torch.no_grad():
            rows = rag.search(rag.encode_questions(questions), ctx.k)  # (B, K)
        post = self._post(rag, batch, self.posterior, "posterior")  # (B, H)
        with rag.scoring():
            tgt = self._post(rag, batch, self.target, "target")  # (B, H), no grad
        weights = torch.softmax(rag.score_rows(post, rows), dim=-1)  # (B, K)
        ret = rag.make_retrieval(post.detach(), rows)
        tok_lp, mask = rag.generator.answer_logprobs(questions, ret.texts, [q.answers[0] for q in batch])
        total = -(weights.unsqueeze(-1) * tok_lp).sum() + ((post - tgt) ** 2).sum()
        for b, r in enumerate(weights.argmax(-1).tolist()):
            self.cache[batch[b].id] = int(rows[b, r])
        return LossSum(total, float(mask.sum())), {"cached": float(len(self.cache))}

    @torch.no_grad()
    def on_step_end(self, rag, ctx):
        for t, p in zip(self.target.parameters(), self.posterior.parameters()):
            t.mul_(1 - self.opts.tau).add_(p, alpha=self.opts.tau)
        self.updates += 1

    @torch.no_grad()
    def predict(self, batch, rag, ctx):
        ret = rag.retrieve([q.question for q in batch], ctx.k)
        answers = rag.generator.generate([q.question for q in batch], [t[0] for t in ret.texts])
        return [
            {"prediction": a, "retrieved_ids": ids, "metrics": {"toy_rounds": 1.0}} for a, ids in zip(answers, ret.ids)
        ]

    def extra_state(self):
        return {"cache": dict(self.cache), "updates": self.updates}

    def load_extra_state(self, state):
        self.cache = dict(state.get("cache", {}))
        self.updates = int(state.get("updates", 0))
