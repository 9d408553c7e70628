"""Multi-turn rollouts on token ids: model turn, observation, model turn, ... for a batch of prompts.

A generic primitive for readers that act between turns (search-then-read, tool calls); it knows
nothing about tags or tools: the caller's `respond` decides, from the text of each model turn,
whether the rollout is done (None) or which observation text comes next. What a policy-gradient
loss needs is exact by construction: the generated ids are kept as sampled (never re-tokenised
from their text), each with the log-prob it was sampled with, and the loss mask is 1 on model
tokens only (observations and forced text are 0), so `Generator.token_logprobs(prompt_ids, ids,
loss_mask)` scores exactly the sampled tokens.

A turn that ends with the model's end-of-sequence token ends its rollout ("eos") without a
`respond` call (as Search-R1 / RAG-R1 do: nothing is searched after the model stopped).
Per turn, one batched `Generator.sample_ids` call over the still-active rollouts (context =
prompt + ids so far), then ONE `respond(indices, turn_texts)` call for all of them (one batched
retrieval per turn). After `max_turns` model turns without "done", `final_text` (if any) is
appended as forced tokens and one last model turn is generated without a `respond` call; the
rollout ends "forced" either way. Context budget: `generator.context_limit()` tokens of prompt +
ids (max_context_length, at most the model's positions); a model turn is cut where the budget
ends, and an observation or forced text that would not leave room for one more model token is
not appended: the rollout then ends "length".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

Respond = Callable[[List[int], List[str]], List[Optional[str]]]


@dataclass
class Trajectory:
    prompt_ids: List[int]
    ids: List[int] = field(default_factory=list)  # everything after the prompt: model turns, observations, forced text
    loss_mask: List[int] = field(default_factory=list)  # 1 on model-generated tokens, 0 on observation / forced tokens
    logprobs: List[float] = field(default_factory=list)  # sampling log-prob of each model token, 0.0 elsewhere
    turns: List[str] = field(default_factory=list)  # text of each model turn
    observations: List[str] = field(default_factory=list)  # text of each observation appended
    finish: str = ""  # "done" | "eos" (the model ended its output: no respond call) | "forced" | "length"

    def context(self) -> List[int]:
        return self.prompt_ids + self.ids

    def append(self, ids: List[int], logprobs: Optional[List[float]] = None) -> None:
        """Model tokens (with their sampling log-probs) or, without logprobs, observed / forced ones."""
        self.ids += ids
        self.loss_mask += [1 if logprobs is not None else 0] * len(ids)
        self.logprobs += list(logprobs) if logprobs is not None else [0.0] * len(ids)


def rollout(
    generator,
    prompt_ids: List[List[int]],
    respond: Respond,
    max_turns: int,
    stop: Sequence[str] = (),
    final_text: str = "",
    max_new_tokens: Optional[int] = None,
    do_sample: bool = True,
    temperature: Optional[float] = None,
) -> List[Trajectory]:
    """Roll out every prompt for up to `max_turns` model turns (see the module docstring).

    `stop`: stop strings of every model turn (besides generator.stop); `max_new_tokens`: per turn
    (None = generator.max_new_tokens); `temperature` None = generator.temperature."""
    limit = generator.context_limit()
    max_new = int(max_new_tokens or generator.cfg.max_new_tokens)
    trajs = [Trajectory(list(p)) for p in prompt_ids]
    active = []
    for i, t in enumerate(trajs):
        if len(t.prompt_ids) < limit:
            active.append(i)
        else:
            t.finish = "length"

    def turn(idx: List[int]) -> List[int]:
        """One batched model turn of rollouts idx; those whose context is not full yet."""
        rooms = [limit - len(trajs[i].context()) for i in idx]
        budgets = [min(max_new, r) for r in rooms]
        out = generator.sample_ids(
            [trajs[i].context() for i in idx], budgets, do_sample=do_sample, temperature=temperature, stop=list(stop)
        )
        kept = []
        for j, i in enumerate(idx):
            trajs[i].append(out.ids[j], out.logprobs[j])
            trajs[i].turns.append(out.texts[j])
            if out.finish[j] == "length" and budgets[j] == rooms[j]:
                trajs[i].finish = "length"
            elif out.finish[j] == "eos":  # the model ended its output: nothing to respond to
                trajs[i].finish = "eos"
            else:
                kept.append(i)
        return kept

    def fits(i: int, ids: List[int]) -> bool:
        """Whether `ids` can be appended to rollout i leaving room for a model token; else it ends."""
        if len(trajs[i].context()) + len(ids) < limit:
            return True
        trajs[i].finish = "length"
        return False

    for _ in range(max_turns):
        if not active:
            break
        active = turn(active)
        if not active:
            break
        obs = respond(list(active), [trajs[i].turns[-1] for i in active])
        if len(obs) != len(active):
            raise ValueError(f"respond returned {len(obs)} observations for {len(active)} rollouts")
        still = []
        for i, o in zip(active, obs):
            if o is None:
                trajs[i].finish = "done"
                continue
            ids = generator.encode_text(o)
            if fits(i, ids):
                trajs[i].append(ids)
                trajs[i].observations.append(o)
                still.append(i)
        active = still
    if final_text and active:
        forced = generator.encode_text(final_text)
        active = [i for i in active if fits(i, forced)]
        for i in active:
            trajs[i].append(forced)
        active = turn(active) if active else []
    for i in active:
        trajs[i].finish = "forced"
    return trajs
