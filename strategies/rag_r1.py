"""`rag_r1`: the generator learns to search (RAG-R1, Tan et al. 2025, arXiv 2507.02962), trained
by supervised fine-tuning on gold search chains, then by GRPO (Shao et al. 2024, "DeepSeekMath",
arXiv 2402.03300) or PPO with a critic (`algorithm=ppo`, `strategies/rag_r1_ppo.py`) with an
exact-match reward.

The turn format, the prompt and all parsing are in `strategies/search_format.py` (pure functions):
model turns "<think> ... </think> <search> q1 | q2 </search>" or "<think> ... </think> <answer>
... </answer>", retrieved text returned as "<information> (1) ... (2) ... </information>", up to
`max_turns` search turns, then the forced text "<answer>" and one last model turn. Rollouts are
`ragtune.rollout.rollout` (token ids as sampled, with their sampling log-probs; loss mask 1 on
model tokens only); per turn ONE `respond` call parses every active rollout's turn and runs ONE
`rag.encode_questions` + ONE `rag.search` (top `search_k` per query) for all queries of all
rollouts (none when no rollout searched); an empty search gets an empty information block.

Modes (`queries`): `multi` (the paper's multi-query parallelism) issues up to `max_queries`
queries in one search turn, separated by the reserved "|"; `single` issues one query per turn
and "|" is ordinary text at inference (the whole search text is one query).

Stage 1, phase `sft` (`Phase(examples=True)`, `sft_fraction` of the steps): one trajectory per
training question from its gold chain (`Question.sub_queries` / `sub_answers`; a question
without a chain searches with the question itself): comparison questions
(`Question.parallel_hops`) issue their sub-queries together (multi mode, `max_queries` per turn)
or in consecutive turns (single mode); bridge questions always search in order, the second
sub-query naming the first hop's answer, which the think of that turn states ("found X"). Thinks
are templated ("search" before anything is found, then "found a, b"). Observations hold, per
sub-query, the top `search_k` passages of the production retriever (one batched
`encode_questions` + `search` per turn index over up to 256 questions at a time; deterministic),
each cut to `generator.max_passage_tokens` tokens, duplicates within a block dropped.
`sft_context=gold` (default) puts each hop's gold passage first in its sub-query's block,
padded with retrieved ones; `retrieved` keeps only trajectories whose blocks contain every hop's
gold passage (the kept share is printed; a question without gold ids is kept). A chain needing
more than `max_turns` search turns is skipped; one of exactly `max_turns` ends, as rollouts do,
with the forced "<answer>" (not learned) and the model's answer. The loss is the summed NLL of
the model tokens (observations and forced text have loss mask 0 and get exactly zero gradient)
as `LossSum(total, count=model tokens)`, so accumulation equals one large batch. A trajectory
longer than min(`generator.max_context_length`, the model's positions) or with a model turn
over `max_turn_tokens` is skipped, counted and printed, never truncated.

Stage 2, phase `rl` (`Phase(collect=True, updates=updates)`): `collect` samples `group_size`
rollouts per question at `temperature`; reward = `ragtune.metrics.exact_match` (the evaluator's
EM) of the extracted answer + `format_reward` x [the trajectory is well formed]; advantages by
`losses.group_advantages` (std-scaled unless `scale_rewards=false`; a group of equal rewards
gets exactly 0); old log-probs = the rollout's sampling log-probs; reference log-probs from the
frozen `reference` part under no grad (charged as `score` under "reference"; skipped when
`beta=0`). A rollout with no generated token (its prompt alone fills the context) is left out of
the experience. `loss` scores the sampled ids with grad (`token_logprobs` at the sampling
temperature) and applies `losses.grpo_loss` (clip `eps_low` / `eps_high`, k3 KL to the stage-1
model weighted by `beta`); retrieved and forced tokens have loss mask 0: out of the policy loss
and the KL. Logged per collection: reward, em, format_rate, turns, rounds, queries_per_round,
zero_std_groups, truncated (rollouts ended by the context budget).

Reductions (`reduction`), as `LossSum(total, count)` over any split into micro-batches / ranks:
- `sequence` (default, TRL "grpo"): per-sequence mean over its model tokens, mean over sequences;
  total = sum of per-sequence means, count = sequences: exact.
- `token` (TRL "bnpo"): total = summed per-token loss, count = model tokens: exact.
- `constant` (Dr. GRPO): summed per-token loss / (sequences x L), L = (max_turns + 1) x
  max_turn_tokens (the most model tokens a rollout can have); total = sum / L, count = sequences:
  exact.
- `sum`: a plain sum over the step's tokens cannot be a LossSum independent of the split (its
  count would have to be 1 per optimizer step); here it is the per-sequence token sum averaged
  over sequences (the repository's "sum" convention), i.e. masked_reduce("sum") / sequences per
  step, a constant factor away from the plain sum.

Reference model: a frozen `Part("reference")`, the `Generator` wrapper built by
`rag.generator.copy_as("reference")` in `setup` (a full copy, its parameters at
`strategy.reference.model.*`; under LoRA a second, frozen adapter in the generator's own peft
model, only its adapter weights at `strategy.reference.adapter.*`, the base shared; checkpointed,
never optimised, and its calls are charged under "reference", never as the production generator).
It is snapshotted from the generator (`snapshot_`) in `on_phase_start` of the rl phase when the
phase is not resumed (so the KL is to the SFT result), never when resumed (the checkpoint restored
it).

Algorithm (`algorithm`): `grpo` (default, above) or `ppo`, the paper's choice: a trainable
`critic` part (the generator's decoder plus a value head, its trunk copied from the generator when
the rl phase starts, like the reference), per-token values, the reward on the last model token,
GAE over the model tokens only (observations are skipped, the next model token's value
bootstraps across them), whitened advantages, the clipped surrogate plus `vf_coef` x the clipped
value loss in one LossSum; options `gamma`, `lam`, `vf_coef`, `cliprange_value`,
`whiten_advantages`, `kl_in_reward` (all in `strategies/rag_r1_ppo.py`'s docstring). Under `grpo`
no critic exists; a ppo-only option set under grpo (or `scale_rewards` under ppo) is an error.

Evaluation (`predict`): greedy rollouts; the prediction is the extracted answer ("" when none:
never an exception), `retrieved_ids` every passage retrieved, in retrieval order without
duplicates (also those of a last observation the context had no room for), `rounds` = search
turns that issued at least one query (an empty search is neither a round nor a query),
`queries` = queries issued; reported `format_ok` (well-formed trajectory) and `answered` (a
non-empty answer).

Context budget: rollouts run with min(`generator.max_context_length`, the model's positions)
tokens (a thin view of the generator handed to `rollout`), since sampling past the positions is
refused; SFT trajectories are checked against the same number. The rl phase trains at
`train.lr.generator` unless `train.phase.rl.lr.generator` is set; policy-gradient updates usually
want a smaller rate than SFT.

Where the reference code is wrong and we are not: it split queries on commas ("Paris, Texas"
became two queries; here only the reserved separator splits); its answer extractor needed a
second `<answer>` match because the prompt held an example answer (here the prompt has none and
the extractor reads only the model's own turns); its evaluation crashed when no answer was
produced (here that is an empty prediction).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ragtune import losses, metrics
from ragtune import prompts as prompting
from ragtune.config import ConfigError, choice, nonneg, positive
from ragtune.data import Question
from ragtune.rollout import Trajectory, rollout
from ragtune.strategy import LossSum, Part, Phase, Strategy

from . import rag_r1_ppo as ppo
from . import search_format as fmt

RETRIEVAL_CHUNK = 256  # questions per batched retrieval call when building SFT trajectories


@dataclass
class Options:
    sft_fraction: float = 0.5  # share of train.steps for stage 1 (0 = RL only)
    sft_context: str = choice("gold", "gold", "retrieved")  # gold passage first | retrieved only (filtered)
    queries: str = choice("multi", "multi", "single")  # parallel queries per search turn | one
    max_turns: int = positive(3)  # search turns before the forced answer
    max_queries: int = positive(3)  # queries per search turn (multi mode)
    search_k: int = positive(2)  # passages returned per query
    max_turn_tokens: int = positive(64)  # new tokens per model turn
    algorithm: str = choice("grpo", "grpo", "ppo")  # ppo: a critic and GAE (strategies/rag_r1_ppo.py)
    group_size: int = positive(4)  # rollouts per question (grpo: >= 2)
    temperature: float = positive(1.0)  # sampling temperature of the rollouts (and of their log-probs)
    beta: float = nonneg(0.04)  # weight of the k3 KL to the stage-1 model
    eps_low: float = positive(0.2)
    eps_high: float = positive(0.2)
    reduction: str = choice("sequence", *losses.RL_REDUCTIONS)
    scale_rewards: bool = True  # divide group-centred rewards by the group's std (False: Dr. GRPO)
    format_reward: float = nonneg(0.0)  # reward weight of a well-formed trajectory
    updates: int = positive(1)  # optimizer steps per collection
    # algorithm=ppo only
    gamma: float = nonneg(1.0)  # discount per model token, in [0, 1]
    lam: float = nonneg(1.0)  # GAE lambda, in [0, 1]
    vf_coef: float = positive(0.1)  # weight of the value loss
    cliprange_value: float = nonneg(0.2)  # value clipping around the collection-time values (0: off)
    whiten_advantages: bool = True  # whiten the advantages over the collection's model tokens
    kl_in_reward: bool = False  # beta x k1 KL as a per-token reward penalty instead of the k3 loss term

    def validate(self) -> None:
        def bad(key: str, what: str, val) -> ConfigError:
            return ConfigError(f"config key 'strategy.{key}': must be {what}, got {val}")

        if not 0 <= self.sft_fraction < 1:
            raise bad("sft_fraction", "in [0, 1)", self.sft_fraction)
        if self.group_size < 2 and self.algorithm == "grpo":
            raise bad("group_size", ">= 2 (a group of one has no group-relative advantage)", self.group_size)
        if self.eps_low >= 1:
            raise bad("eps_low", "in (0, 1)", self.eps_low)
        for key in ("gamma", "lam"):
            if not 0 <= getattr(self, key) <= 1:
                raise bad(key, "in [0, 1]", getattr(self, key))
        only = {"grpo": ("scale_rewards",), "ppo": PPO_KEYS}
        defaults = {f.name: f.default for f in fields(self)}
        for algo, keys in only.items():
            for key in keys:
                if algo != self.algorithm and getattr(self, key) != defaults[key]:
                    raise ConfigError(
                        f"config key 'strategy.{key}': used only by strategy.algorithm={algo} "
                        f"(algorithm is {self.algorithm})"
                    )


PPO_KEYS = ("gamma", "lam", "vf_coef", "cliprange_value", "whiten_advantages", "kl_in_reward")


@dataclass
class Example:
    """One SFT trajectory: prompt ids, then model turns (mask 1) and observations (mask 0)."""

    qid: str
    prompt_ids: List[int]
    ids: List[int]
    loss_mask: List[int]


@dataclass
class Experience:
    """One collected rollout, ready for the policy loss."""

    qid: str
    prompt_ids: List[int]
    ids: List[int]
    loss_mask: List[int]
    old_logprobs: List[float]  # sampling log-probs (0 off the model tokens)
    ref_logprobs: Optional[List[float]]  # the frozen reference's (None when beta = 0)
    advantage: float
    reward: float


@dataclass
class Episode:
    """Search bookkeeping of one rollout."""

    retrieved: List[str] = field(default_factory=list)  # passage ids, retrieval order, no duplicates
    rounds: int = 0  # search turns that issued at least one query
    queries: int = 0  # queries issued
    searches: int = 0  # search turns, empty ones included

    def add(self, ids: Sequence[str]) -> None:
        seen = set(self.retrieved)
        for i in ids:
            if i not in seen:
                seen.add(i)
                self.retrieved.append(i)


@dataclass
class _Plan:
    """A gold chain as turns: (model text, queries, gold passage ids of each query) per search."""

    searches: List[Tuple[str, List[str], List[List[str]]]]
    answer: str  # the model text of the final turn (after FINAL_TEXT when forced)
    forced: bool  # the chain uses all max_turns searches: the answer follows the forced text


def sft_nll(tok_lp: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, float]:
    """(summed NLL over the tokens where mask != 0, their number). Masked-out entries are selected
    away, so they get exactly zero gradient whatever they hold.

    tok_lp (N, T), mask (N, T) -> (scalar, float)
    """
    keep = mask != 0
    total = -torch.where(keep, tok_lp, torch.zeros((), dtype=tok_lp.dtype, device=tok_lp.device)).sum()
    return total, float(keep.sum())


def policy_loss_sum(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: Optional[torch.Tensor],
    adv: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    eps_low: float,
    eps_high: float,
    reduction: str,
    max_len: int,
) -> Tuple[torch.Tensor, float, Dict[str, float]]:
    """`losses.grpo_loss` as (total, count, stats) such that sum(total) / sum(count) over any split
    of the sequences equals the chosen reduction over all of them (see the module docstring).

    logp, old_logp, ref_logp (N, T), adv (N,), mask (N, T) -> (scalar, float, dict)
    """
    n = float(logp.shape[0])
    if reduction == "sequence":
        loss, stats = losses.grpo_loss(logp, old_logp, ref_logp, adv, mask, beta, eps_low, eps_high, "sequence")
        return loss * n, n, stats
    total, stats = losses.grpo_loss(logp, old_logp, ref_logp, adv, mask, beta, eps_low, eps_high, "sum")
    if reduction == "token":
        return total, float((mask != 0).sum()), stats
    if reduction == "constant":
        return total / max_len, n, stats
    if reduction == "sum":
        return total, n, stats
    raise ValueError(f"reduction must be one of {losses.RL_REDUCTIONS}, got {reduction!r}")


class RAGR1(Strategy):
    name = "rag_r1"
    summary = "the generator learns to search: SFT on gold search chains, then GRPO (or PPO) with an EM reward"
    paper = "Tan et al. 2025, arXiv 2507.02962; Shao et al. 2024, arXiv 2402.03300; PPO: arXiv 1707.06347"
    Options = Options
    reports = {
        "format_ok": "the trajectory is well formed (closed thinks and searches, a closed final answer)",
        "answered": "the trajectory produced a non-empty answer",
    }

    # ---- declaration ------------------------------------------------------------------------
    def phases(self):
        f = self.opts.sft_fraction
        trains = {"generator", ppo.CRITIC} if self.opts.algorithm == "ppo" else {"generator"}
        rl = Phase("rl", frozenset(trains), 1.0 - f, collect=True, updates=self.opts.updates)
        return ([Phase("sft", frozenset({"generator"}), f, examples=True)] if f > 0 else []) + [rl]

    def parts(self):
        critic = [Part(ppo.CRITIC, lr_like="generator")] if self.opts.algorithm == "ppo" else []
        return [Part("reference", trainable=False)] + critic

    # ---- lifecycle ----------------------------------------------------------------------------
    def setup(self, rag) -> None:
        # the critic's trunk copies the generator's model before the reference joins it (under LoRA
        # the reference is an adapter inside that model); registered after it, as before
        critic = ppo.build_critic(rag) if self.opts.algorithm == "ppo" else None
        self.reference = rag.generator.copy_as("reference")
        if critic is not None:
            self.critic = critic
        self._cut: Dict[int, str] = {}  # corpus row -> passage text cut to generator.max_passage_tokens
        self.sft_stats: Dict[str, int] = {}

    def on_phase_start(self, rag, ctx, resumed: bool) -> None:
        if ctx.phase is not None and ctx.phase.collect and not resumed:
            self.snapshot_reference(rag)
            if self.opts.algorithm == "ppo":
                self.critic.load_trunk_(rag.generator)  # the critic's trunk starts from the SFT result

    @torch.no_grad()
    def snapshot_reference(self, rag) -> None:
        """The reference becomes a copy of the current generator (the stage-1 result)."""
        self.reference.snapshot_(rag.generator)

    # ---- shared helpers -----------------------------------------------------------------------

    def search_k(self, rag) -> int:
        """Passages per query: `search_k`, at most the corpus."""
        return min(self.opts.search_k, len(rag.corpus))

    def prompt_ids(self, rag, question: str) -> List[int]:
        gen = rag.generator
        text = prompting.wrap(gen.tokenizer, gen.cfg, fmt.prompt_text(question, self.opts.queries))
        return gen.encode_text(text)

    def passage(self, rag, row: int) -> str:
        """The corpus passage of `row` as observations show it: cut to generator.max_passage_tokens."""
        if row not in self._cut:
            gen, text = rag.generator, rag.passage_texts[row]
            self._cut[row] = prompting.cut(gen.tokenizer, text, gen.encode_text(text), int(gen.cfg.max_passage_tokens))
        return self._cut[row]

    def _forced(self, traj: Trajectory) -> bool:
        """Whether the last turn continued the forced FINAL_TEXT (only that turn exceeds max_turns)."""
        return len(traj.turns) > self.opts.max_turns

    def _answer(self, traj: Trajectory) -> Tuple[str, bool]:
        o = self.opts
        forced = self._forced(traj)
        ans = fmt.extract_answer(traj.turns, forced, o.queries, o.max_queries)
        return ans, fmt.well_formed(traj.turns, forced, o.queries, o.max_queries)

    def rollouts(self, rag, prompt_ids: List[List[int]], do_sample: bool) -> Tuple[List[Trajectory], List[Episode]]:
        """Multi-turn rollouts of `prompt_ids`, one batched retrieval per turn (see the module docstring)."""
        o = self.opts
        episodes = [Episode() for _ in prompt_ids]

        def respond(idx: List[int], texts: List[str]) -> List[Optional[str]]:
            parsed = [fmt.parse_turn(t, o.queries, o.max_queries) for t in texts]
            flat = [(j, q) for j, p in enumerate(parsed) if p.action == "search" for q in p.queries]
            per: List[List[int]] = [[] for _ in idx]
            if flat:
                q = rag.encode_questions([text for _, text in flat])  # (Q, H): every query of this turn
                for (j, _), rows in zip(flat, rag.search(q, self.search_k(rag)).tolist()):
                    per[j] += rows
            out: List[Optional[str]] = []
            for j, (i, p) in enumerate(zip(idx, parsed)):
                if p.action != "search":  # an answer, or no action at all: the rollout ends
                    out.append(None)
                    continue
                ep = episodes[i]
                ep.searches += 1
                if p.queries:
                    ep.rounds += 1
                    ep.queries += len(p.queries)
                block = list(dict.fromkeys(per[j]))  # duplicates within a block dropped
                ep.add([rag.corpus[r].id for r in block])
                out.append(fmt.observation([self.passage(rag, r) for r in block]))
            return out

        trajs = rollout(
            rag.generator,
            prompt_ids,
            respond,
            o.max_turns,
            stop=fmt.STOP,
            final_text=fmt.FINAL_TEXT,
            max_new_tokens=o.max_turn_tokens,
            do_sample=do_sample,
            temperature=o.temperature if do_sample else None,
        )
        return trajs, episodes

    # ---- stage 1: SFT trajectories ------------------------------------------------------------
    def plan(self, q: Question) -> Optional[_Plan]:
        """The turns of q's gold chain, or None when it needs more than max_turns searches. Raises
        ValueError (multi mode) when a sub-query contains the reserved separator."""
        o = self.opts
        if q.sub_queries:
            hops = list(q.sub_queries)
            gold = [[g] for g in q.gold_passage_ids[: len(hops)]]
            gold += [[] for _ in range(len(hops) - len(gold))]
            found = list(q.sub_answers)
        else:
            hops, gold, found = [q.question], [list(q.gold_passage_ids)], []
        if o.queries == "multi" and q.parallel_hops:
            groups = [list(range(i, min(i + o.max_queries, len(hops)))) for i in range(0, len(hops), o.max_queries)]
        else:
            groups = [[i] for i in range(len(hops))]
        if len(groups) > o.max_turns:
            return None
        searches = []
        for g in groups:
            queries = [hops[i] for i in g]
            try:
                text = fmt.search_turn(fmt.think_text(found[: g[0]]), queries, o.queries)
            except ValueError as e:
                raise ValueError(f"question {q.id!r}: {e}") from None
            searches.append((text, queries, [gold[i] for i in g]))
        answer = q.answers[0]
        forced = len(groups) == o.max_turns
        final = fmt.forced_answer_turn(answer) if forced else fmt.answer_turn(fmt.think_text(found or [answer]), answer)
        return _Plan(searches, final, forced)

    def build_examples(self, phase, questions: Sequence[Question], rag) -> List[Example]:
        o = self.opts
        gen = rag.generator
        limit, k = rag.generator.context_limit(), self.search_k(rag)
        plans = [self.plan(q) for q in questions]
        # the top search_k rows of every sub-query: one batched call per turn index and chunk
        retrieved: Dict[Tuple[int, int], List[List[int]]] = {}
        for start in range(0, len(questions), RETRIEVAL_CHUNK):
            chunk = [i for i in range(start, min(start + RETRIEVAL_CHUNK, len(questions))) if plans[i] is not None]
            depth = max((len(plans[i].searches) for i in chunk), default=0)
            for t in range(depth):
                keys = [i for i in chunk if t < len(plans[i].searches)]
                texts = [qt for i in keys for qt in plans[i].searches[t][1]]
                rows = rag.search(rag.encode_questions(texts), k).tolist()
                pos = 0
                for i in keys:
                    n = len(plans[i].searches[t][1])
                    retrieved[(i, t)], pos = rows[pos : pos + n], pos + n
        stats = {"questions": len(questions), "turns": 0, "retrieval": 0, "context": 0, "turn_tokens": 0}
        out: List[Example] = []
        for i, (q, p) in enumerate(zip(questions, plans)):
            if p is None:
                stats["turns"] += 1
                continue
            ids: List[int] = []
            mask: List[int] = []
            too_long_turn = False
            missing = False  # a hop's gold passage is not in its turn's block (sft_context=retrieved)
            for t, (text, _, golds) in enumerate(p.searches):
                block: List[int] = []
                gold_rows: List[int] = []
                for rows, gold_ids in zip(retrieved[(i, t)], golds):
                    g = rag.rows_of(gold_ids)
                    gold_rows += g
                    if o.sft_context == "gold":
                        g = g[:k]
                        block += g + [r for r in rows if r not in g][: k - len(g)]
                    else:
                        block += rows
                block = list(dict.fromkeys(block))
                missing = missing or any(r not in block for r in gold_rows)
                turn = gen.encode_text(text)
                too_long_turn = too_long_turn or len(turn) > o.max_turn_tokens
                obs = gen.encode_text(fmt.observation([self.passage(rag, r) for r in block]))
                ids += turn + obs
                mask += [1] * len(turn) + [0] * len(obs)
            if p.forced:
                forced = gen.encode_text(fmt.FINAL_TEXT)
                ids += forced
                mask += [0] * len(forced)
            final = gen.encode_text(p.answer)
            too_long_turn = too_long_turn or len(final) > o.max_turn_tokens
            ids += final
            mask += [1] * len(final)
            prompt = self.prompt_ids(rag, q.question)
            if o.sft_context == "retrieved" and missing:
                stats["retrieval"] += 1
            elif len(prompt) + len(ids) > limit:
                stats["context"] += 1
            elif too_long_turn:
                stats["turn_tokens"] += 1
            else:
                out.append(Example(q.id, prompt, ids, mask))
        stats["built"] = len(out)
        self.sft_stats = stats
        n = max(len(questions), 1)
        msg = (
            f"rag_r1 sft: {len(out)} trajectories from {len(questions)} questions ({len(out) / n:.1%} kept); "
            f"skipped {stats['context']} longer than {limit} tokens, {stats['turn_tokens']} with a turn over "
            f"max_turn_tokens={o.max_turn_tokens}, {stats['turns']} needing more than max_turns={o.max_turns} searches"
        )
        if o.sft_context == "retrieved":
            m = len(questions) - stats["turns"]
            msg += f"; sft_context=retrieved kept {m - stats['retrieval']}/{m} chains whose retrieval found every hop"
        print(msg, flush=True)
        return out

    def _sft_loss(self, items: List[Example], rag):
        tok_lp, mask = rag.generator.token_logprobs(
            [e.prompt_ids for e in items], [e.ids for e in items], [e.loss_mask for e in items]
        )
        total, count = sft_nll(tok_lp, mask)
        logs = {"nll_per_token": float(total.detach()) / max(count, 1.0), "model_tokens": count / len(items)}
        return LossSum(total, count), logs

    # ---- stage 2: GRPO (PPO: rag_r1_ppo) ------------------------------------------------------
    def collect(self, batch: Sequence[Question], rag, ctx):
        o = self.opts
        G = o.group_size
        prompts = [self.prompt_ids(rag, q.question) for q in batch for _ in range(G)]
        trajs, episodes = self.rollouts(rag, prompts, do_sample=True)
        rewards, ems, oks = [], [], []
        for j, t in enumerate(trajs):
            ans, ok = self._answer(t)
            em = metrics.exact_match(ans, batch[j // G].answers)
            ems.append(em)
            oks.append(float(ok))
            rewards.append(em + o.format_reward * float(ok))
        r = torch.tensor(rewards, dtype=torch.float32)
        keep = [j for j, t in enumerate(trajs) if t.ids]
        ref: Dict[int, List[float]] = {}
        if o.beta > 0 and keep:
            lp, _ = self.reference.token_logprobs(
                [trajs[j].prompt_ids for j in keep],
                [trajs[j].ids for j in keep],
                [trajs[j].loss_mask for j in keep],
                temperature=o.temperature,
            )
            lp = lp.float().cpu()
            ref = {j: lp[n, : len(trajs[j].ids)].tolist() for n, j in enumerate(keep)}
        rounds = sum(e.rounds for e in episodes)
        logs = {
            "reward": float(r.mean()),
            "em": sum(ems) / len(ems),
            "format_rate": sum(oks) / len(oks),
            "turns": sum(len(t.turns) for t in trajs) / len(trajs),
            "rounds": rounds / len(trajs),
            "queries_per_round": sum(e.queries for e in episodes) / rounds if rounds else 0.0,
        }
        if o.algorithm == "ppo":
            items, extra = ppo.experience(self, rag, batch, trajs, keep, rewards, ref)
            logs.update(extra)
            logs["truncated"] = sum(t.finish == "length" for t in trajs) / len(trajs)
            return items, logs
        adv = losses.group_advantages(r, G, scale=o.scale_rewards)
        flat = (r.view(-1, G).amax(1) == r.view(-1, G).amin(1)).float()
        items = [
            Experience(
                batch[j // G].id,
                trajs[j].prompt_ids,
                trajs[j].ids,
                trajs[j].loss_mask,
                trajs[j].logprobs,
                ref.get(j),
                float(adv[j]),
                rewards[j],
            )
            for j in keep
        ]
        logs["zero_std_groups"] = float(flat.mean())
        logs["truncated"] = sum(t.finish == "length" for t in trajs) / len(trajs)
        return items, logs

    def _rl_loss(self, items: List[Experience], rag):
        o = self.opts
        if o.algorithm == "ppo":
            return ppo.loss(self, items, rag)
        logp, mask = rag.generator.token_logprobs(
            [e.prompt_ids for e in items],
            [e.ids for e in items],
            [e.loss_mask for e in items],
            temperature=o.temperature,
        )
        N, T = logp.shape

        def padded(rows: List[List[float]]) -> torch.Tensor:
            out = torch.zeros((N, T), dtype=torch.float32)
            for n, row in enumerate(rows):
                out[n, : len(row)] = torch.tensor(row, dtype=torch.float32)
            return out.to(device=logp.device, dtype=logp.dtype)

        # one update per collection: the old policy is the current one, so the ratio is exactly 1
        # (TRL's num_iterations=1); the sampling log-probs agree only to float noise (KV cache,
        # padding) and are kept for later updates of the same collection
        old = logp.detach() if o.updates == 1 else padded([e.old_logprobs for e in items])
        ref = padded([e.ref_logprobs for e in items]) if o.beta > 0 else None
        adv = torch.tensor([e.advantage for e in items], dtype=logp.dtype, device=logp.device)
        max_len = (o.max_turns + 1) * o.max_turn_tokens
        total, count, stats = policy_loss_sum(
            logp, old, ref, adv, mask, o.beta, o.eps_low, o.eps_high, o.reduction, max_len
        )
        logs = {**stats, "model_tokens": float((mask != 0).sum()) / N}
        return LossSum(total, count), logs

    # ---- the trainer's entry point ------------------------------------------------------------
    def loss(self, batch, rag, ctx):
        """SFT examples or collected experience; plain questions (a direct call) are turned into
        those first (examples built / rollouts collected without grad)."""
        items = list(batch)
        if items and isinstance(items[0], Question):
            with rag.scoring():
                if ctx.phase.collect:
                    items, _ = self.collect(items, rag, ctx)
                else:
                    items = self.build_examples(ctx.phase, items, rag)
            if not items:
                raise ValueError("rag_r1: no trajectory of this batch fits the context")
        if ctx.phase.collect:
            return self._rl_loss(items, rag)
        return self._sft_loss(items, rag)

    # ---- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, batch, rag, ctx):
        trajs, episodes = self.rollouts(rag, [self.prompt_ids(rag, q.question) for q in batch], do_sample=False)
        out = []
        for t, ep in zip(trajs, episodes):
            ans, ok = self._answer(t)
            out.append(
                {
                    "prediction": ans,
                    "retrieved_ids": list(ep.retrieved),
                    "rounds": ep.rounds,
                    "queries": ep.queries,
                    "metrics": {"format_ok": float(ok), "answered": float(bool(ans))},
                }
            )
        return out
