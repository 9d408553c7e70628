"""`rl_retriever`: multi-step retrieval as a Markov decision process, trained with soft Q(lambda)
(Q-RAG; Sorokin et al., ICLR 2026, "Q-RAG", arXiv 2511.07328). The generator stays frozen while
the retriever learns; it only reads the selected passages at the end.

The MDP, per training question (an episode):
- state s_t: the text "question [SEP] p_1 [SEP] ... [SEP] p_t" of the passages selected so far, in
  selection order (s_0 is the question alone), encoded by the query tower (the state tower) with
  its own `state_max_length`;
- actions: a pool of passages not selected yet. `pool=index` (default): at every step the top
  `pool_size` rows of the global index for the current state's embedding, minus the selected
  ones, so a bridge question's second hop becomes findable once the first one is read;
  `pool=candidates`: the question's own `candidate_passage_ids` (HotpotQA's distractor setting);
- `towers=both` (the paper) trains both towers; `towers=state` only the state tower, against the
  stored passage embeddings (no re-embedding, no index refresh: the CPU default experiment's choice);
- Q(s, a) = q_scale * E_state(s) . E_action(a), the action tower being the passage tower
  (`rag.passage_embeddings`: stored index embeddings, re-encoded with grad while it trains);
  both towers L2-normalise, so |Q| <= q_scale. `twin=true` (the paper's twin critic) splits the
  vectors in two halves: Q_i = 2 q_scale E_state(s)_i . E_action(a)_i, acting with their mean
  (equal to the single Q above), regressing each head on the target, and taking min(Q_1, Q_2) in
  the target (clipped double Q; free: the same two encodes);
- reward `coverage` (default): 1.0 at the step where the selected set first covers all gold
  passages of the question; the episode ends there (done). `reward=answer_em`: the exact match of
  the frozen generator reading all selected passages in one prompt (`generate_multi`), at the
  last step. `step_penalty` is subtracted at every step taken. The horizon (`horizon`, 0 = K, the
  number of passages the single-step strategies read) is a terminal step too: nothing is gained
  after it, the reader then reads what was selected. A question with fewer candidates than the
  horizon ends when its pool is empty.

Learning (on-policy, no replay buffer), per optimizer step: the rl phase is a collecting phase
(`Phase.collect`, one update per collection): `collect` runs steps 1-2 for the step's questions
(all `grad_accum` micro-batches at once), `loss` step 3 on each micro-batch of their episodes.
1. collection, no grad, eval mode (`rag.scoring()`, charged as `score`), with the online towers:
   one state encode and one index search per step for all questions still running; the action
   is drawn from the Boltzmann policy softmax(Q / alpha) over the `explore_top` best actions;
2. targets: frozen parts `target_query` / `target_doc` (Polyak-averaged copies of the towers,
   rate `tau`, in `on_step_end` of the rl phase) give V(s_{t+1}) = alpha * logsumexp(Q_target /
   alpha) over the next step's valid actions (`losses.soft_value`), and the episode-gated
   lambda-returns G_t = r_t + gamma (1 - d_t) [(1 - lam) V(s_{t+1}) + lam G_{t+1}]
   (`losses.lambda_returns`; G_t = r_t at a terminal step, nothing leaks across episode ends);
3. loss: MSE(Q(s_t, a_t), sg(G_t)) over the valid steps, Q recomputed with grad through both
   online towers, as a `LossSum` over steps (exact under gradient accumulation and ranks).
Episodes end at different steps, so ranks make different numbers of tower calls while collecting:
the trainer collects with ZeRO-3's parameters gathered, and the learning step makes the same calls
on every rank (one state encode, one passage encode while that tower trains). Collected phases
cannot replay fixed batches, so `diagnostics.grad_variance_every` is refused for the rl phase.
The targets are set equal to the online towers when the rl phase starts fresh, never when it
resumes (the checkpoint restored them).

An optional first phase `reader` (`reader_fraction`, 0 = none) trains the generator to answer
from the gold passages of each question read together in one prompt (`score_multi`;
`reader_context=padded` fills up to the horizon with the best retrieved non-gold passages, as
the frozen reader of the rl phase will see them): the embedded generator has never read several
passages at once. `reduction=sum`: the summed answer NLL over the batch's answer tokens as a
`LossSum` counted in answer tokens; `mean`: length-normalised per question, averaged.

An optional phase `imitate` (`imitate_fraction`, 0 = none, between the reader and rl phases)
warm-starts the towers by supervised imitation of the gold chains, as multi-hop dense retrieval
does (MDR; Xiong et al., ICLR 2021, arXiv 2009.12756): each state along a question's gold chain in
hop order (s_0 = the question, s_1 = question [SEP] gold_1, ...) is trained by InfoNCE (the
retriever's temperature) toward its next gold passage, against the batch's positives and
`imitate_negatives` mined index rows; a state's other gold passages are neither negatives nor
actions. This is not in Q-RAG, which starts from a strong pretrained embedder (e5/GTE): with an
embedder that was never trained for the data, the greedy multi-step policy reads worse than a
single-step search of the same tower (the state drifts toward the passage just read), and RL
from it alone learns too little in a CPU budget. `fact_reward` (the reference's per-fact
reward; 0 = the paper's single completion reward) adds a reward at each step that selects a
gold passage.

`predict`: greedy (argmax Q, no exploration) selection for `horizon` steps from the same kind of
pool, then the frozen generator reads all selected passages together, in selection order. Each
question reports `rounds` and `queries` (both the number of steps; one state query per step).
A question whose multi-passage prompt cannot fit the generator's limits is left out of the reader
loss (logged as `reader_skipped`), gets reward 0 under `answer_em`, and in `predict` keeps its
retrieval with an empty answer and an `error` (counted by the evaluator), never failing its batch.
During collection each distinct pooled passage is embedded once per batch (the towers are fixed
there), however many steps and questions pool it.

The reference code: an older version of its return computation bootstrapped from the wrong step
at one position of the return window (an off-by-one); we use the episode-gated lambda-return
above, tested against hand-computed returns with a terminal step inside the window. Its newer
version regresses the two halves on the target and sums them in the target value; the target
here takes their minimum. Its alpha was annealed with the learning rate; here it is constant.
Reference settings: gamma .99, lambda .5-.65, alpha .005-.05, tau .02-.1, lr 5e-6 to 5e-5.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ragtune import losses, metrics
from ragtune.candidates import SOURCES, Candidates
from ragtune.config import ConfigError, choice, nonneg, positive
from ragtune.data import Question
from ragtune.strategy import LossSum, Part, Phase, Strategy

SEP = " [SEP] "


@dataclass
class Options:
    reader_fraction: float = 0.3  # share of train.steps for the reader phase (0 = no such phase)
    imitate_fraction: float = 0.0  # share of train.steps imitating the gold chains before RL (0 = none)
    imitate_negatives: int = nonneg(8)  # imitate: hard negatives mined from the index per state
    # imitate: chain = each state's target is the next gold passage (gold_passage_ids in hop order:
    # the synthetic benchmark, MuSiQue); any = every gold passage not selected yet (HotpotQA, 2Wiki)
    imitate_order: str = choice("chain", "chain", "any")
    reader_context: str = choice("gold", "gold", "padded")  # padded: + retrieved non-gold up to the horizon
    reduction: str = choice("sum", *losses.REDUCTIONS)  # of the reader phase's answer NLL
    pool: str = choice("index", "index", "candidates")  # actions: the index's top rows | own candidates
    pool_size: int = positive(16)  # pool=index: actions per step
    horizon: int = nonneg(0)  # steps per episode (0 = K, train.k / eval.k)
    state_max_length: int = positive(128)  # tokens of "question [SEP] passages so far"
    q_scale: float = positive(1.0)  # Q = q_scale * cosine of the two towers' embeddings
    twin: bool = True  # the paper's twin critic: two halves, min of the two in the target
    explore_top: int = positive(4)  # Boltzmann exploration over this many best actions
    alpha: float = positive(0.02)  # temperature of the Boltzmann policy and the soft value
    gamma: float = 0.99  # discount
    lam: float = 0.5  # lambda of the lambda-returns
    tau: float = 0.05  # Polyak rate of the target towers
    reward: str = choice("coverage", "coverage", "answer_em")
    fact_reward: float = nonneg(0.0)  # + this at each step that selects a gold passage not selected before
    # both: Q-RAG's two towers train (the passages are re-embedded with grad, the index refreshed);
    # state: only the state (query) tower trains against the stored passage embeddings, and the
    # action side of the target is the index itself (about 5x cheaper a step on CPU)
    towers: str = choice("both", "both", "state")
    step_penalty: float = nonneg(0.0)  # subtracted from the reward at every step

    def validate(self) -> None:
        def bad(key: str, what: str, val) -> ConfigError:
            return ConfigError(f"config key 'strategy.{key}': must be {what}, got {val}")

        if not 0 <= self.reader_fraction < 1:
            raise bad("reader_fraction", "in [0, 1)", self.reader_fraction)
        if not 0 <= self.imitate_fraction < 1 or self.reader_fraction + self.imitate_fraction >= 1:
            raise bad(
                "imitate_fraction", "in [0, 1) with reader_fraction + imitate_fraction < 1", self.imitate_fraction
            )
        if not 0 < self.gamma <= 1:
            raise bad("gamma", "in (0, 1]", self.gamma)
        if not 0 <= self.lam <= 1:
            raise bad("lam", "in [0, 1]", self.lam)
        if not 0 < self.tau <= 1:
            raise bad("tau", "in (0, 1]", self.tau)


@dataclass
class Episodes:
    """The episodes of one batch: per question, the states visited and the rows selected (in
    order), and per step the action pool of the questions still running."""

    states: List[List[str]]  # (B, n_b) state texts s_0 .. s_{n_b - 1}
    selected: List[List[int]]  # (B, n_b) corpus rows chosen at each step
    pools: List[Tuple[List[int], Candidates]]  # per step t: (batch positions running, their pool (n_t, P))
    covered_at: List[int]  # (B,) step at which the selection first covered the gold set, -1 = never

    def steps(self) -> List[int]:
        return [len(s) for s in self.selected]


@dataclass
class Transitions:
    """One question's episode as the rl phase learns from it (`collect` -> `loss`): the states
    visited and the rows taken, in step order, and the lambda-returns G_t of those steps."""

    states: List[str]  # (n,) s_0 .. s_{n-1}
    actions: List[int]  # (n,) the corpus row taken at each step
    returns: torch.Tensor  # (n,) G_t, no grad


class RLRetriever(Strategy):
    name = "rl_retriever"
    needs_labels = True  # the coverage reward and the reader phase read gold passages
    summary = "Q-RAG: multi-step retrieval as an MDP, soft Q(lambda) on the two towers, frozen reader"
    paper = "Sorokin et al., ICLR 2026, arXiv 2511.07328"
    Options = Options

    # ---- declaration ------------------------------------------------------------------------
    def phases(self):
        f, g = self.opts.reader_fraction, self.opts.imitate_fraction
        trains = frozenset({"query_encoder", "doc_encoder"} if self.opts.towers == "both" else {"query_encoder"})
        return (
            ([Phase("reader", frozenset({"generator"}), f)] if f > 0 else [])
            + ([Phase("imitate", trains, g)] if g > 0 else [])
            + [Phase("rl", trains, 1.0 - f - g, collect=True)]
        )

    def parts(self):
        targets = ["target_query", "target_doc"] if self.opts.towers == "both" else ["target_query"]
        return [Part(name, trainable=False) for name in targets]

    def _targets(self, rag) -> List[Tuple[torch.nn.Module, torch.nn.Module]]:
        """(target, online) tower pairs."""
        pairs = [(self.target_query, rag.retriever.query_encoder)]
        if self.opts.towers == "both":
            pairs.append((self.target_doc, rag.retriever.doc_encoder))
        return pairs

    # ---- lifecycle ----------------------------------------------------------------------------
    def setup(self, rag) -> None:
        if self.opts.towers == "state" and rag.retriever.shared:
            raise ConfigError(
                "config key 'strategy.towers': 'state' trains the state tower only, but with "
                "retriever.shared_towers=true it is the passage tower too; use towers=both"
            )
        self.target_query = copy.deepcopy(rag.retriever.query_encoder)
        if self.opts.towers == "both":
            self.target_doc = copy.deepcopy(rag.retriever.doc_encoder)

    def on_phase_start(self, rag, ctx, resumed: bool) -> None:
        if ctx.phase is not None and ctx.phase.name == "rl" and not resumed:
            for target, online in self._targets(rag):
                target.load_state_dict(online.state_dict())

    def on_step_end(self, rag, ctx) -> None:
        if ctx.phase is not None and ctx.phase.name == "rl":
            for target, online in self._targets(rag):
                losses.polyak_update_(target, online, self.opts.tau)

    def loss(self, batch, rag, ctx):
        if ctx.phase.name == "reader":
            return self._reader_loss(batch, rag, ctx)
        if ctx.phase.name == "imitate":
            return self._imitate_loss(batch, rag)
        return self._rl_loss(batch, rag)  # the rl phase's micro-batch of `Transitions` (collect)

    # ---- phase 1: the reader ------------------------------------------------------------------
    def _reader_loss(self, batch, rag, ctx):
        if self.opts.reader_context == "padded":
            with torch.no_grad():
                rows = rag.gold_first_rows(batch, self._horizon(ctx)).tolist()
        else:
            rows = [rag.rows_of(x.gold_passage_ids) for x in batch]
        passages = [[rag.passage_texts[r] for r in row] for row in rows]
        keep = self._fitting(rag, batch, passages)  # a prompt that cannot fit the generator is left out
        if not keep:
            raise ValueError(f"reader phase: no prompt of this batch fits the generator ({batch[0].id!r} first)")
        qs, ps, ans = (
            [v[i] for i in keep] for v in ([x.question for x in batch], passages, [x.answers[0] for x in batch])
        )
        tok_lp, mask = rag.generator.score_multi(qs, ps, ans)  # (N, T)
        logs = {
            "answer_tokens": float(mask.sum()),
            "reader_passages": float(sum(map(len, ps)) / len(ps)),
            "reader_skipped": float(len(batch) - len(keep)),
        }
        if self.opts.reduction == "sum":
            return LossSum(-losses.masked_reduce(tok_lp, mask, "sum"), float(mask.sum())), logs
        return -losses.masked_reduce(tok_lp, mask, "sequence"), logs

    # ---- phase 2 (optional): imitating the gold chains -----------------------------------------
    def _imitate_loss(self, batch, rag):
        """InfoNCE of each state along a question's gold chain on its next gold passage: s_0 = the
        question -> gold_1, s_1 = question [SEP] gold_1 -> gold_2, ... (hop order; `imitate_order=
        any`: on each gold passage not selected yet), logits = cosine / the retriever's temperature.
        Candidates: the batch's positives plus `imitate_negatives` index rows mined per state; a
        state's other gold passages are not negatives (a comparison question may take its hops in
        either order) and its selected ones are not actions (masked out)."""
        chains = [list(dict.fromkeys(rag.rows_of(x.gold_passage_ids))) for x in batch]  # a repeated id: once
        if not all(chains):
            raise ValueError("strategy.imitate_fraction needs gold_passage_ids on every training question")
        # (P,) pairs (question b, state t, target row): `chain` the chain's next gold passage, `any`
        # every gold passage not selected yet (data whose gold order is not hop order)
        span = len if self.opts.imitate_order == "any" else (lambda g: 1)
        pairs = [(b, t, r) for b, g in enumerate(chains) for t in range(len(g)) for r in g[t : t + span(g)]]
        texts = [self.state_text(rag, batch[b].question, chains[b][:t]) for b, t, _ in pairs]
        s = self.encode_states(rag, texts)  # (P, H)
        dev = s.device
        uniq, pos = torch.tensor([r for _, _, r in pairs], device=dev).unique(return_inverse=True)  # (N,), (P,)
        d = rag.passage_embeddings(uniq).to(s.dtype)  # (N, H)
        own = [set(chains[b]) for b, _, _ in pairs]  # every gold row of the state's question: never a negative
        mask_out = torch.tensor([[r in g for r in uniq.tolist()] for g in own], device=dev)  # (P, N)
        hard = None
        if self.opts.imitate_negatives:
            with torch.no_grad():
                n = self.opts.imitate_negatives
                top = rag.search(s.detach(), min(len(rag.index), n + len(set(uniq.tolist())) + max(map(len, own))))
            skip = set(uniq.tolist())
            rows = [[r for r in row if r not in g and r not in skip][:n] for row, g in zip(top.tolist(), own)]
            # equal per state and over the ranks (a tiny index may leave fewer than n, or none: then
            # no rank makes the passage-tower call, which ZeRO-3 needs to be the same on every rank)
            m = min(rag.gather(min(map(len, rows))))
            if m:
                idx = torch.tensor([r[:m] for r in rows], dtype=torch.long, device=dev)
                hard = rag.passage_embeddings(idx).to(s.dtype)  # (P, M, H)
        loss = losses.contrastive_loss(s, d, pos, rag.retriever.temperature, hard_negatives=hard, mask_out=mask_out)
        return LossSum(loss * len(pairs), float(len(pairs))), {"imitate_states": float(len(pairs))}

    # ---- phase 3: soft Q(lambda) on the towers ------------------------------------------------
    def collect(self, batch, rag, ctx):
        """The rl phase's experience: the batch's episodes with the online towers (exploring), their
        rewards and the lambda-returns G_t from the target towers, one `Transitions` per question;
        no grad. The trainer runs this without grad and, under ZeRO-3, with the full parameters
        gathered: episodes end at different steps, so the ranks make different numbers of tower
        calls here, which a partitioned forward could not take; the learning step (`loss`) makes
        one call per tower on every rank."""
        gold = [set(rag.rows_of(x.gold_passage_ids)) for x in batch]
        if (self.opts.reward == "coverage" or self.opts.fact_reward) and not all(gold):
            raise ValueError("reward=coverage and fact_reward need gold_passage_ids on every training question")
        with rag.scoring():  # no grad, dropout off, charged as score
            stop_at = gold if self.opts.reward == "coverage" else None  # answer_em: the whole horizon
            ep = self._rollout(rag, batch, self._horizon(ctx), explore=True, gold=stop_at)
        rewards, dones, valid = self._rewards(rag, batch, ep, gold)  # (B, T) each
        next_values = self._next_values(rag, ep, rewards.shape)  # (B, T), V(s_{t+1}), 0 where not needed
        returns = losses.lambda_returns(rewards, next_values, dones, self.opts.gamma, self.opts.lam, valid)
        items = [Transitions(ep.states[b], ep.selected[b], returns[b, :n]) for b, n in enumerate(ep.steps())]
        n_gold = [len(x) for x in gold]
        pool0 = ep.pools[0][1] if ep.pools else None
        logs = {
            "episode_return": float(rewards.sum(-1).mean()),
            "episode_steps": float(valid.sum(-1).float().mean()),
            "coverage_rate": _mean([float(g_ <= set(sel)) for g_, sel in zip(gold, ep.selected) if g_]),
            "target_mean": float(returns[valid].mean()),
            "pool_recall": _mean(
                [
                    len(gold[b] & set(pool0.rows[i][pool0.mask[i]].tolist())) / n_gold[b]
                    for i, b in enumerate(ep.pools[0][0])
                    if n_gold[b]
                ]
                if pool0 is not None
                else []
            ),
        }
        return items, logs

    def _rl_loss(self, items: Sequence[Transitions], rag):
        """MSE(Q(s_t, a_t), sg(G_t)) over the micro-batch's steps, Q with grad through the online
        towers (one state encode, one passage encode while that tower trains), as a `LossSum`."""
        pairs = [(x, t) for x in items for t in range(len(x.actions))]
        s = self.encode_states(rag, [x.states[t] for x, t in pairs])  # (N, H), with grad
        taken = torch.tensor([x.actions[t] for x, t in pairs], dtype=torch.long, device=s.device)
        a = rag.passage_embeddings(taken).to(s.dtype)  # (N, H), with grad while the passage tower trains
        heads = self._heads(s, a)  # (h, N)
        g = torch.cat([x.returns for x in items]).to(heads.device, heads.dtype)  # (N,)
        total = ((heads - g) ** 2).mean(0).sum()  # each head regressed on sg(G_t)
        q = heads.detach().mean(0)  # (N,) the acting Q
        logs = {"td_error": float((q - g).abs().mean()), "q_mean": float(q.mean())}
        return LossSum(total, float(len(pairs))), logs

    def _rewards(self, rag, batch, ep: Episodes, gold: List[set]):
        """rewards, dones, valid (B, T): the reward at first coverage (or the answer EM at the
        last step), plus `fact_reward` at each step selecting a gold passage (the selection never
        repeats a row, so each gold passage pays once), minus the step penalty; the last step of
        every episode is terminal."""
        steps = ep.steps()
        B, T = len(steps), max(steps)
        dev = _device(rag)
        rewards = torch.zeros((B, T), device=dev)
        dones = torch.zeros((B, T), dtype=torch.bool, device=dev)
        valid = torch.zeros((B, T), dtype=torch.bool, device=dev)
        for b, n in enumerate(steps):
            valid[b, :n] = True
            dones[b, n - 1] = True
            rewards[b, :n] -= self.opts.step_penalty
            for t, r in enumerate(ep.selected[b]):
                if r in gold[b]:
                    rewards[b, t] += self.opts.fact_reward
            if self.opts.reward == "coverage" and ep.covered_at[b] >= 0:
                rewards[b, ep.covered_at[b]] += 1.0
        if self.opts.reward == "answer_em":
            with rag.scoring():
                answers, _ = self._read(rag, batch, [[rag.passage_texts[r] for r in sel] for sel in ep.selected])
            for b, (x, a) in enumerate(zip(batch, answers)):  # an unreadable prompt answers "": EM 0
                rewards[b, steps[b] - 1] += metrics.exact_match(a, x.answers)
        return rewards, dones, valid

    def _next_values(self, rag, ep: Episodes, shape) -> torch.Tensor:
        """(B, T): V(s_{t+1}) = soft value of the target towers' Q over the valid actions of step
        t+1, for every non-terminal step (one state encode, one passage encode); 0 elsewhere."""
        out = torch.zeros(shape, device=_device(rag))
        pairs = [(b, t) for b, n in enumerate(ep.steps()) for t in range(n - 1)]
        if not pairs:
            return out
        where = [{b: i for i, b in enumerate(which)} for which, _ in ep.pools]  # step -> {b: pool row}
        pool_rows = []
        for b, t in pairs:
            cands = ep.pools[t + 1][1]
            i = where[t + 1][b]
            pool_rows.append(cands.rows[i][cands.mask[i]].tolist())
        with rag.scoring():
            s = self.encode_states(rag, [ep.states[b][t + 1] for b, t in pairs], target=True)  # (N, H)
            nxt = Candidates.from_lists(pool_rows, [[SOURCES["pool"]] * len(r) for r in pool_rows], s.device)
            a = self._target_actions(rag, nxt)  # (N, P, H)
            q = self._heads(s.unsqueeze(1), a).min(0).values  # (N, P): min over the heads (one if not twin)
            v = losses.soft_value(q, self.opts.alpha, nxt.mask)  # (N,)
        idx = torch.tensor(pairs, device=out.device).T
        out[tuple(idx)] = v.to(out.device, out.dtype)
        return out

    def _target_actions(self, rag, cands: Candidates) -> torch.Tensor:
        """The target passage tower's embeddings of a pool (N, P, H), each distinct row encoded once
        (`towers=state`: the passage tower never trains, so its target is the stored index)."""
        if self.opts.towers == "state":  # the stored index (never re-encoded: the passage tower is fixed)
            emb = rag.index.lookup(cands.rows)  # (N, P, H)
            return emb * cands.mask.to(emb.device, emb.dtype).unsqueeze(-1)
        uniq, inverse = torch.unique(cands.rows[cands.mask], return_inverse=True)
        texts = [rag.retriever.passage_text(rag.passage_texts[r]) for r in uniq.tolist()]  # + passage prefix
        enc = rag.encode(texts, self.target_doc, "target_doc", rag.retriever.cfg.max_passage_length)  # (U, H)
        out = enc.new_zeros((*cands.rows.shape, enc.shape[-1]))
        out[cands.mask] = enc[inverse]
        return out

    # ---- evaluation ---------------------------------------------------------------------------
    def predict(self, batch, rag, ctx):
        """Greedy multi-step selection, then one multi-passage answer per question."""
        with rag.scoring():
            ep = self._rollout(rag, batch, self._horizon(ctx), explore=False)
            passages = [[rag.passage_texts[r] for r in sel] for sel in ep.selected]
            answers, errors = self._read(rag, batch, passages)
        return [
            {
                "prediction": a,
                "retrieved_ids": [rag.corpus[r].id for r in sel],
                "rounds": len(sel),
                "queries": len(sel),
                "metrics": {},
                **({"error": err} if err else {}),  # the retrieval still counts; the evaluator counts the error
            }
            for a, sel, err in zip(answers, ep.selected, errors)
        ]

    # ---- reading several passages --------------------------------------------------------------
    @staticmethod
    def _unfit(rag, question: str, passages: Sequence[str]) -> str:
        """Why this multi-passage prompt cannot be rendered within the generator's limits ("" if it can)."""
        try:
            rag.generator.render_prompt(question, passages)
        except ValueError as e:
            return str(e)
        return ""

    def _fitting(self, rag, batch: Sequence[Question], passages: List[List[str]]) -> List[int]:
        return [i for i, (x, ps) in enumerate(zip(batch, passages)) if not self._unfit(rag, x.question, ps)]

    def _read(self, rag, batch: Sequence[Question], passages: List[List[str]]) -> Tuple[List[str], List[str]]:
        """Greedy answers of the frozen generator reading each question's passages in one prompt (one
        batched call), and per question the reason it could not be read ("" when it was): a question
        whose prompt does not fit answers "" instead of failing its whole batch."""
        keep = self._fitting(rag, batch, passages)
        answers, errors = [""] * len(batch), [""] * len(batch)
        for i in set(range(len(batch))) - set(keep):
            errors[i] = "ValueError: " + self._unfit(rag, batch[i].question, passages[i])
        if keep:
            out = rag.generator.generate_multi([batch[i].question for i in keep], [passages[i] for i in keep])
            for i, a in zip(keep, out):
                answers[i] = a
        return answers, errors

    # ---- the episode --------------------------------------------------------------------------
    def _horizon(self, ctx) -> int:
        return self.opts.horizon or ctx.k

    def state_text(self, rag, question: str, rows: Sequence[int]) -> str:
        """s_t: the question, then the selected passages in selection order."""
        return SEP.join([question, *(rag.passage_texts[r] for r in rows)])

    def encode_states(self, rag, texts: Sequence[str], target: bool = False) -> torch.Tensor:
        """(N,) state texts -> (N, H) by the online state tower (the query tower) or its target, in
        one call, with the retriever's query prefix."""
        tower, name = (self.target_query, "target_query") if target else (rag.retriever.query_encoder, "query_encoder")
        return rag.encode([rag.retriever.query_text(t) for t in texts], tower, name, self.opts.state_max_length)

    def _rollout(
        self, rag, batch: Sequence[Question], horizon: int, explore: bool, gold: Optional[List[set]] = None
    ) -> Episodes:
        """Run every question's episode with the online towers (the caller holds `rag.scoring()`).
        Per step: one state encode and (pool=index) one search for all questions still running.
        With `gold`, an episode ends at the step that first covers its gold set."""
        B = len(batch)
        cand = self._candidate_rows(rag, batch) if self.opts.pool == "candidates" else None
        limit = [min(horizon, len(cand[b]) if cand is not None else len(rag.index)) for b in range(B)]
        ep = Episodes([[] for _ in range(B)], [[] for _ in range(B)], [], [-1] * B)
        running = [b for b in range(B) if limit[b] > 0]
        actions = _Embeddings()  # the online passage tower's embedding of each row, once per rollout
        step = 0
        while running:
            texts = [self.state_text(rag, batch[b].question, ep.selected[b]) for b in running]
            s = self.encode_states(rag, texts)  # (n, H)
            pool = self._pool(rag, s, running, ep.selected, cand)  # (n, P)
            a = actions.of(rag, pool).to(s.dtype)  # (n, P, H)
            q = self._heads(s.unsqueeze(1), a).mean(0).masked_fill(~pool.mask, float("-inf"))  # (n, P)
            pos = self._choose(q, pool.mask, pool.rows, explore, step, running)  # (n,)
            rows = pool.rows.gather(1, pos.view(-1, 1).to(pool.rows.device)).squeeze(1).tolist()
            ep.pools.append((list(running), pool))
            for b, text, r in zip(running, texts, rows):
                ep.states[b].append(text)
                ep.selected[b].append(int(r))
                if gold is not None and ep.covered_at[b] < 0 and gold[b] and gold[b] <= set(ep.selected[b]):
                    ep.covered_at[b] = step
            running = [b for b in running if len(ep.selected[b]) < limit[b] and ep.covered_at[b] < 0]
            step += 1
        return ep

    def _candidate_rows(self, rag, batch: Sequence[Question]) -> List[List[int]]:
        missing = [x.id for x in batch if not x.candidate_passage_ids]
        if missing:
            raise ValueError(f"strategy.pool=candidates: question {missing[0]!r} has no candidate_passage_ids")
        return [list(dict.fromkeys(rag.rows_of(x.candidate_passage_ids))) for x in batch]

    def _pool(self, rag, s: torch.Tensor, running: List[int], selected: List[List[int]], cand) -> Candidates:
        """The valid actions (n, P) of the running questions: unselected rows of the index's top
        for each state (one search for all of them), or of each question's own candidates."""
        if cand is None:
            k = min(self.opts.pool_size + max(len(selected[b]) for b in running), len(rag.index))
            top = rag.search(s, k).tolist()  # (n, k)
            lists = [
                [r for r in row if r not in set(selected[b])][: self.opts.pool_size] for row, b in zip(top, running)
            ]
        else:
            lists = [[r for r in cand[b] if r not in set(selected[b])] for b in running]
        return Candidates.from_lists(lists, [[SOURCES["pool"]] * len(r) for r in lists], s.device)

    def _heads(self, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Q heads (h, ...) of states s (..., H) and actions a (..., H): one head q_scale * s.a, or
        with `twin` two, 2 q_scale s_i.a_i over the vectors' halves (their mean is q_scale * s.a)."""
        if not self.opts.twin:
            return (self.opts.q_scale * (s * a).sum(-1)).unsqueeze(0)
        h = s.shape[-1] // 2
        q1 = (s[..., :h] * a[..., :h]).sum(-1)
        q2 = (s[..., h:] * a[..., h:]).sum(-1)
        return 2 * self.opts.q_scale * torch.stack([q1, q2])

    def _choose(
        self, q: torch.Tensor, valid: torch.Tensor, rows: torch.Tensor, explore: bool, step: int, running: List[int]
    ) -> torch.Tensor:
        """Pool positions (n,): argmax Q, or a draw from the Boltzmann policy over the
        `explore_top` best actions (the global CPU RNG: checkpointed, so a resume is identical)."""
        if not explore:
            return q.argmax(-1)
        if not bool((torch.isfinite(q) | ~valid).all()):
            # diverged towers: no policy to sample from; the loss is then non-finite and the trainer
            # stops the run as diverged
            return valid.float().argmax(-1)
        probs = losses.boltzmann_probs(q, self.opts.alpha, valid, top=self.opts.explore_top)  # (n, P)
        return torch.multinomial(probs.detach().float().cpu(), 1).squeeze(1)


class _Embeddings:
    """Action embeddings of the online passage tower during one rollout (no grad, eval mode, the
    tower fixed): each distinct row goes through `rag.passage_embeddings` once, however many
    steps and questions have it in their pool (pools of consecutive steps overlap)."""

    def __init__(self):
        self.pos: Dict[int, int] = {}
        self.emb: Optional[torch.Tensor] = None  # (U, H)

    def of(self, rag, cands: Candidates) -> torch.Tensor:
        """(n, P) pool -> (n, P, H), zeros at padding."""
        new = sorted(set(cands.rows[cands.mask].tolist()) - set(self.pos))
        if new:
            e = rag.passage_embeddings(torch.tensor(new, dtype=torch.long, device=cands.rows.device))  # (u, H)
            self.pos.update({r: len(self.pos) + i for i, r in enumerate(new)})
            self.emb = e if self.emb is None else torch.cat([self.emb, e.to(self.emb)])
        idx = torch.tensor([[self.pos.get(r, 0) for r in row] for row in cands.rows.tolist()], device=self.emb.device)
        return torch.where(cands.mask.to(self.emb.device).unsqueeze(-1), self.emb[idx], 0.0)


def _mean(values: List[float]) -> float:
    return float(sum(values) / len(values)) if values else 0.0


def _device(rag) -> torch.device:
    return next(rag.retriever.query_encoder.parameters()).device
