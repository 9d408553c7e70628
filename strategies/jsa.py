"""`jsa`: joint stochastic approximation for RAG (Cao et al. 2025, "JSA-RAG", arXiv 2508.18168;
the algorithm: Ou & Song 2020, arXiv 2005.14001).

Same prior p(z|x), generator p_G(y|x,z) and posterior tower q(z|x,y) as `vrag`. The model
p(z|x) p_G(y|x,z) is trained by maximum likelihood with samples from its true posterior
p(z|x,y), drawn by a Metropolis independence sampler (MIS) whose proposal is q; q is trained
towards the inclusive KL(p(z|x,y) || q). Per question:
- candidate set C = prior top-k U posterior top-k (U the cached sample); p and q renormalised on C;
- M proposals z' ~ q (drawn first: the proposal does not depend on the state), importance
  weights w(z) = p(z|x) p_G(y|x,z) / q(z|x,y), and z' replaces the state z with probability
  min(1, w(z')/w(z)) (`ragtune.losses.mis_chain`); everything in the sampler is no-grad, in eval
  mode (`rag.scoring()`, charged as `score`);
- the generator is scored once per *unique* passage of the chain (proposals and start state);
- loss (1/M) sum_m [ -log p_G(y|x,z_m) - log p(z_m|x) - log q(z_m|x,y) ] over the chain states
  (`ragtune.losses.jsa_loss`), the generator run with grad once per unique state.
- a persistent per-example cache (canonical JSA, absent from the published JSA-RAG code): the
  chain's last state is stored per question id with the step it was drawn at; after
  `cache_warmup` optimizer steps, the next chain over that question starts from it, re-weighted
  under the current parameters, instead of from a fresh proposal. Data-parallel ranks see
  different questions each epoch, so every rank's new entries are all-gathered after each
  optimizer step (`on_step_end`) and the newest entry per question wins: all ranks hold the same
  cache, which is checkpointed (`extra_state`), restored on resume and carried across
  `train.init_from` (via final.pt).
The sampler targets the posterior restricted to the candidate set C (the posterior of the
marginal over C), so the gradient is that of log sum_{z in C} p(z|x) p_G(y|x,z).
Logged: `acceptance_rate` (proposals taken, including proposals equal to the state), `move_rate`
(steps where the state changed), `unique_per_chain` (generator sequences scored per chain),
`unique_states`, `cache_hit_rate`. `reduction=mean` is refused: a length-normalised likelihood
would make the sampler target p(z|x) p_G(y|x,z)^(1/|y|), which is not the posterior.

Where the reference code differs, deliberately: it scored the generator on all M proposals
(at most ~20 of 50 distinct), had no cache, and assumed batch size 1 in places; its own RAG
baseline applied softmax twice (a near-uniform prior). Reference settings: M = 50, temperature
0.1, 10 passages, generator lr 2e-5, retriever lr 1e-5, LoRA r=8 on a 7B decoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch

from ragtune import losses
from ragtune.candidates import SOURCES, Candidates
from ragtune.config import ConfigError, nonneg, positive

from .latent import LatentOptions, LatentPassage


@dataclass
class Options(LatentOptions):
    mis_steps: int = positive(50)  # M, proposals per chain
    cache: bool = True  # start each chain from the question's cached sample
    cache_warmup: int = nonneg(20)  # optimizer steps before the cache is used (it is filled from the start)

    def validate(self) -> None:
        if self.reduction != "sum":
            raise ConfigError(
                "config key 'strategy.reduction': jsa needs 'sum' (a length-normalised likelihood makes "
                "the sampler target a tempered distribution, not the posterior p(z|x,y))"
            )


class JSA(LatentPassage):
    name = "jsa"
    summary = "joint stochastic approximation: MIS samples of p(z|x,y) with proposal q(z|x,y), per-example cache"
    paper = "Cao et al. 2025, arXiv 2508.18168; Ou & Song 2020"
    Options = Options

    def __init__(self, options=None):
        super().__init__(options)
        self.cache: Dict[str, Tuple[str, int]] = {}  # question id -> (passage id of the last state, step)
        self.pending: Dict[str, Tuple[str, int]] = {}  # this rank's entries since the last sync

    def loss(self, batch, rag, ctx):
        qp, qq = self.encode(rag, batch)  # (B, H) each
        cached = self._cached_rows(rag, batch, ctx)  # (B,) corpus rows, -1 = none
        have = [[r] if r >= 0 else [] for r in cached.tolist()]
        extra = Candidates.from_lists(have, [[SOURCES["cache"]] * len(h) for h in have], qp.device)
        lat = self.latent(rag, qp, qq, ctx.k, extra)  # (B, C)
        mask = lat.cands.mask
        if not (torch.isfinite(lat.log_q[mask]).all() and torch.isfinite(lat.log_prior[mask]).all()):
            # diverged towers: no distribution to sample from; a non-finite loss stops the run as diverged
            return lat.log_q[mask].sum() + lat.log_prior[mask].sum(), {}
        init = lat.cands.position(cached.to(mask.device))  # (B,) index into C, -1 = none
        gen = torch.default_generator  # the global CPU RNG: checkpointed, so a resume is bit-identical
        proposals = losses.mis_proposals(lat.log_q, mask, self.opts.mis_steps, gen)  # (B, M)
        visited = torch.zeros_like(mask).scatter_(1, proposals, True)  # (B, C) the chain's passages
        visited[init >= 0] |= torch.nn.functional.one_hot(init[init >= 0], mask.shape[1]).bool()
        with rag.scoring():  # no grad, dropout off, charged as score
            tok_ng, tmask, scored = rag.read_candidates(batch, lat.cands, select=visited)
        log_target = lat.log_prior.detach() + self.seq_logprobs(tok_ng, tmask, scored)  # (B, C)
        if not torch.isfinite(log_target[scored]).all():  # a diverged generator: stop as diverged
            return log_target[scored].sum() + lat.log_q[mask].sum(), {}
        log_target = log_target.masked_fill(~scored, float("nan"))  # never read outside the chain
        states, accepted = losses.mis_chain(log_target, lat.log_q, mask, self.opts.mis_steps, gen, init, proposals)
        in_states = torch.zeros_like(mask).scatter_(1, states, True)  # (B, C) unique states
        tok_lp, tmask, scored_g = rag.read_candidates(batch, lat.cands, select=in_states)  # with grad
        seq_lp = self.seq_logprobs(tok_lp, tmask, scored_g)  # (B, C), -inf off the states
        loss = losses.jsa_loss(lat.log_prior, lat.log_q, seq_lp, states)
        self._store(rag, batch, lat.cands, states[:, -1], ctx.step)
        prev = torch.cat([init.view(-1, 1), states[:, :-1]], 1)  # (B, M) the state before each step
        had_state = torch.ones_like(accepted)
        had_state[:, 0] = init >= 0  # a chain without a start state takes its first proposal unconditionally
        logs = {
            **self.latent_logs(lat),
            "acceptance_rate": float((accepted & had_state).sum() / had_state.sum().clamp_min(1)),
            "move_rate": float(((states != prev) & had_state).sum() / had_state.sum().clamp_min(1)),
            "unique_per_chain": float(visited.sum(-1).float().mean()),
            "unique_states": float(in_states.sum(-1).float().mean()),
            "cache_hit_rate": float((init >= 0).float().mean()),
        }
        return loss, logs

    # ---- the per-example cache ----------------------------------------------------------------
    def _cached_rows(self, rag, batch, ctx) -> torch.Tensor:
        """(B,) corpus row of each question's cached sample, -1 if none or before the warm-up."""
        use = self.opts.cache and ctx.step >= self.opts.cache_warmup
        rows: List[int] = []
        for q in batch:
            pid = self.cache[q.id][0] if use and q.id in self.cache else None
            rows.append(rag.corpus.row(pid) if pid is not None and pid in rag.corpus else -1)
        return torch.tensor(rows, dtype=torch.long)

    def _store(self, rag, batch, cands: Candidates, last: torch.Tensor, step: int) -> None:
        if not self.opts.cache:
            return
        rows = cands.rows.gather(1, last.view(-1, 1)).squeeze(1).tolist()  # (B,)
        for q, r in zip(batch, rows):
            self.cache[q.id] = self.pending[q.id] = (rag.corpus[r].id, int(step))

    def on_step_end(self, rag, ctx) -> None:
        """Share this step's new cache entries with every rank (a no-op in one process)."""
        shares = rag.gather(self.pending)
        if len(shares) > 1:
            self.cache = _newest([self.cache, *shares])
        self.pending = {}

    def extra_state(self) -> dict:
        return {"cache": dict(self.cache), "pending": dict(self.pending)}

    def load_extra_state(self, state: dict) -> None:
        self.cache = {q: (str(p), int(s)) for q, (p, s) in state.get("cache", {}).items()}
        self.pending = {q: (str(p), int(s)) for q, (p, s) in state.get("pending", {}).items()}

    def merge_extra_states(self, states: List[dict]) -> dict:
        """The ranks' caches (identical after each step's sync) merged entry by entry, the newest
        sample of a question winning (a tie: the later rank's)."""
        return {"cache": _newest([s.get("cache", {}) for s in states]), "pending": {}}


def _newest(caches: List[Dict[str, Tuple[str, int]]]) -> Dict[str, Tuple[str, int]]:
    out: Dict[str, Tuple[str, int]] = {}
    for cache in caches:
        for q, (pid, step) in cache.items():
            if q not in out or step >= out[q][1]:
                out[q] = (pid, step)
    return out
