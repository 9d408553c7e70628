"""The multi-turn rollout primitive (ragtune.rollout) on a tiny decoder built here: one respond
call per turn with every active rollout, observation tokens masked with log-prob 0, model tokens'
log-probs equal to token_logprobs of the final sequences (ids never re-tokenised), the forced
final turn, the context-length cutoff and determinism under a fixed seed."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from ragtune import modelzoo
from ragtune.config import GeneratorConfig, TinyModel
from ragtune.generator import Generator
from ragtune.ledger import Ledger
from ragtune.rollout import rollout

TEXTS = [f"Person{i % 9} searched for Town{i % 5} and found City{i % 4} in {1900 + i}." for i in range(40)]
T = 0.8  # sampling temperature of the tests


@pytest.fixture(scope="module")
def gen() -> Generator:
    cfg = OmegaConf.structured(
        GeneratorConfig(
            tiny=TinyModel(hidden=32, layers=1, heads=2, intermediate=64, vocab_size=300, max_position=128),
            max_new_tokens=5,
            max_context_length=100,
        )
    )
    tok = modelzoo.train_bpe(TEXTS, cfg.tiny.vocab_size)
    model = modelzoo.tiny_decoder(cfg.tiny, tok, 0)
    model.eval()
    model.requires_grad_(False)
    return Generator(model, tok, cfg, Ledger("test"))


def _prompts(gen, n=4):
    return [gen.encode_text(f"Question {i}: where is Person{i}? Search:") for i in range(n)]


class Responder:
    """Rollout i is done after turn i + 1 (never, for i >= `never`); records every call."""

    def __init__(self, never=99):
        self.calls, self.turn, self.never = [], 0, never

    def __call__(self, indices, texts):
        self.turn += 1
        self.calls.append((list(indices), list(texts)))
        return [
            None if i + 1 <= self.turn and i < self.never else f" Result {self.turn}.{i}: Town{i}." for i in indices
        ]


def _check_scores(gen, trajs):
    """Model tokens: recorded log-probs == token_logprobs of the final sequences; the rest 0."""
    tok_lp, mask = gen.token_logprobs(
        [t.prompt_ids for t in trajs], [t.ids for t in trajs], loss_mask=[t.loss_mask for t in trajs], temperature=T
    )
    for i, t in enumerate(trajs):
        n = len(t.ids)
        assert len(t.loss_mask) == len(t.logprobs) == n
        assert mask[i, :n].tolist() == [float(m) for m in t.loss_mask]
        model_pos = torch.tensor(t.loss_mask, dtype=torch.bool)
        rec = torch.tensor(t.logprobs)
        assert torch.allclose(rec[model_pos], tok_lp[i, :n][model_pos], atol=1e-5, rtol=0), i
        assert (rec[~model_pos] == 0).all()


def test_respond_once_per_turn_with_all_active_rollouts_and_exact_scores(gen):
    prompts = _prompts(gen)
    responder = Responder()
    torch.manual_seed(0)
    trajs = rollout(gen, prompts, responder, max_turns=3, temperature=T)
    # turn k: every rollout not done yet, in order, with the text of its last model turn
    assert [c[0] for c in responder.calls] == [[0, 1, 2, 3], [1, 2, 3], [2, 3]]
    for turn, (indices, texts) in enumerate(responder.calls):
        assert texts == [trajs[i].turns[turn] for i in indices]
    assert [t.finish for t in trajs] == ["done", "done", "done", "forced"]
    assert [len(t.turns) for t in trajs] == [1, 2, 3, 3] and [len(t.observations) for t in trajs] == [0, 1, 2, 3]
    for i, t in enumerate(trajs):
        assert t.prompt_ids == prompts[i]
        # ids = model turn, observation, model turn, ...; observations are their own tokenisation, mask 0
        pos, turn_ids = 0, []
        for k, text in enumerate(t.turns):
            n = next(j for j in range(pos, len(t.ids) + 1) if j == len(t.ids) or t.loss_mask[j] == 0) - pos
            turn_ids.append(t.ids[pos : pos + n])
            assert t.loss_mask[pos : pos + n] == [1] * n and gen.decode_ids(turn_ids[-1]) == text
            pos += n
            if k < len(t.observations):
                obs = gen.encode_text(t.observations[k])
                assert t.ids[pos : pos + len(obs)] == obs and t.loss_mask[pos : pos + len(obs)] == [0] * len(obs)
                pos += len(obs)
        assert pos == len(t.ids)
    _check_scores(gen, trajs)


def _seed_without_eos(gen, prompts, **kw) -> int:
    """A torch seed under which no turn of these rollouts samples the end-of-sequence token (an eos
    ends a rollout early, which the tests of the other endings must not run into)."""
    for seed in range(100):
        torch.manual_seed(seed)
        if not any(t.finish == "eos" for t in rollout(gen, prompts, Responder(never=0), temperature=T, **kw)):
            return seed
    raise AssertionError("every seed sampled an eos")


def test_the_forced_final_turn(gen):
    prompts = _prompts(gen, 3)
    responder = Responder(never=0)  # never done
    seed = _seed_without_eos(gen, prompts, max_turns=2, final_text=" Final answer:")
    torch.manual_seed(seed)
    trajs = rollout(gen, prompts, responder, max_turns=2, final_text=" Final answer:", temperature=T)
    assert len(responder.calls) == 2  # the forced turn is not passed to respond
    forced = gen.encode_text(" Final answer:")
    for t in trajs:
        assert t.finish == "forced" and len(t.turns) == 3 and len(t.observations) == 2
        tail_mask = t.loss_mask[::-1]
        n_last = tail_mask.index(0)  # the last model turn runs to the end
        start = len(t.ids) - n_last - len(forced)
        assert t.ids[start : start + len(forced)] == forced and t.loss_mask[start : start + len(forced)] == [0] * len(
            forced
        )
        assert gen.decode_ids(t.ids[len(t.ids) - n_last :]) == t.turns[-1]
    _check_scores(gen, trajs)
    # without a final text: ends "forced" after the max_turns model turns, nothing appended
    torch.manual_seed(_seed_without_eos(gen, prompts, max_turns=2))
    plain = rollout(gen, prompts, Responder(never=0), max_turns=2, temperature=T)
    assert [t.finish for t in plain] == ["forced"] * 3 and all(len(t.turns) == 2 for t in plain)
    assert all(t.ids[-len(forced) :] != forced for t in plain)


def test_a_turn_ending_with_eos_ends_its_rollout_without_respond(gen, monkeypatch):
    """The model's end-of-sequence ends its rollout ("eos"): no respond call, no observation."""
    real = gen.sample_ids
    calls = []

    def eos_in_row_0_of_turn_1(contexts, *a, **kw):
        out = real(contexts, *a, **kw)
        calls.append(len(contexts))
        if len(calls) == 1:
            out.finish[0] = "eos"
        return out

    prompts = _prompts(gen, 3)
    seed = _seed_without_eos(gen, prompts, max_turns=2)
    monkeypatch.setattr(gen, "sample_ids", eos_in_row_0_of_turn_1)
    responder = Responder(never=0)
    torch.manual_seed(seed)
    trajs = rollout(gen, prompts, responder, max_turns=2, temperature=T)
    assert trajs[0].finish == "eos" and len(trajs[0].turns) == 1 and not trajs[0].observations
    assert [c[0] for c in responder.calls] == [[1, 2], [1, 2]] and calls == [3, 2]
    assert [t.finish for t in trajs[1:]] == ["forced", "forced"]


def test_a_rollout_stops_at_the_context_length(gen):
    prompts = [gen.encode_text("Where?"), gen.encode_text("Question: where is Person3 born, and which town? Search:")]
    limit = len(prompts[1]) + 8  # room for one model turn of 5 tokens; never for turn + observation + turn
    gen.cfg.max_context_length = limit
    try:
        responder = Responder(never=0)
        torch.manual_seed(2)
        trajs = rollout(gen, prompts, responder, max_turns=4, final_text=" Answer:", temperature=T)
    finally:
        gen.cfg.max_context_length = 100
    assert trajs[1].finish == "length" and len(prompts[1]) + len(trajs[1].ids) <= limit
    assert all(len(t.prompt_ids) + len(t.ids) <= limit for t in trajs)
    assert trajs[0].finish == "length"  # the short prompt runs out later, still before the forced turn
    assert 1 in responder.calls[0][0] and all(1 not in c[0] for c in responder.calls[1:])
    # a prompt with no room at all never reaches the model
    gen.cfg.max_context_length = len(prompts[1])
    try:
        t = rollout(gen, prompts[1:], Responder(), max_turns=2)[0]
    finally:
        gen.cfg.max_context_length = 100
    assert t.finish == "length" and t.ids == [] and t.turns == []


def test_rollouts_are_deterministic_under_a_fixed_seed(gen):
    prompts = _prompts(gen, 3)
    runs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        runs.append(rollout(gen, prompts, Responder(never=0), max_turns=2, final_text=" Answer:", temperature=T))
    assert runs[0] == runs[1]
    assert [t.ids for t in runs[0]] != [t.ids for t in runs[2]]


def test_respond_must_answer_every_active_rollout(gen):
    with pytest.raises(ValueError, match="1 observations for 2 rollouts"):
        rollout(gen, _prompts(gen, 2), lambda idx, texts: [None], max_turns=1)
