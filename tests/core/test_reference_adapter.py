"""`Generator.copy_as` under LoRA: a second, frozen adapter in the generator's own peft model.

The base weights are shared (only adapter-sized growth), the copy scores exactly like the policy
after a snapshot and keeps the snapshot's log-probs while the policy trains, scoring with it
leaves the policy adapter active (also after an exception), its weights never change in training
steps and are neither the generator's trainable parameters nor in the generator's state dicts,
and it is charged under its own name as a forward of base + one adapter, as a deep copy was."""

from __future__ import annotations

import copy

import pytest
import torch

from ragtune.generator import AdapterCopy, Generator

from helpers import build, tiny_cfg

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture
def lora(tmp_path):
    _, m, ledger = build(tiny_cfg(tmp_path, "strategy.name=none", "generator.lora.enabled=true"))
    return m, ledger


def _rows(gen):
    ctx = [gen.encode_text("Where was Ada born?"), gen.encode_text("Who founded it")]
    tgt = [gen.encode_text(" in Paris"), gen.encode_text(" nobody at all")]
    return ctx, tgt


def _lp(gen, rows):
    with torch.no_grad():
        return gen.token_logprobs(*rows)[0]


def _numel(params):
    return sum(p.numel() for p in params)


def _unique_params(module):
    return {id(p): p for p in module.parameters()}


def _train_policy(m, rows, steps=3):
    """A few AdamW steps of the policy adapter on the rows' NLL (the trainer's optimizer groups:
    `component_params()["generator"]`)."""
    params = m.component_params()["generator"]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=0.05)
    m.generator.train()
    for _ in range(steps):
        lp, mask = m.generator.token_logprobs(*rows)
        opt.zero_grad()
        (-(lp * mask).sum()).backward()
        opt.step()
    m.generator.eval()


def _charged(ledger, fn):
    """(result, {(component, activity): flops} charged by fn)."""
    before = ledger.deterministic_view()["flops_by_component"]
    out = fn()
    after = ledger.deterministic_view()["flops_by_component"]
    delta = {
        (c, a): v - before.get(c, {}).get(a, 0)
        for c, acts in after.items()
        for a, v in acts.items()
        if v != before.get(c, {}).get(a, 0)
    }
    return out, delta


def test_the_copy_shares_the_base_and_adds_only_an_adapter(lora):
    m, _ = lora
    gen = m.generator
    policy = gen.trainable_parameters()
    n_before = _numel(_unique_params(m).values())
    gen_keys, decoder_keys = gen.state_dict().keys(), gen.model.get_base_model().get_decoder().state_dict().keys()
    ref = gen.copy_as("reference")
    assert isinstance(ref, AdapterCopy) and ref.model is gen.model and ref.component == "reference"
    n_after = _numel({**_unique_params(m), **_unique_params(ref)}.values())
    assert n_after - n_before == _numel(policy) > 0  # one adapter more, no second base
    assert _numel(ref.parameters()) == _numel(policy)
    owned = {id(p) for p in ref.parameters()}
    assert owned <= set(_unique_params(gen.model))  # the copy's weights live in the generator's model ...
    assert not owned & {id(p) for p in gen.trainable_parameters()}  # ... but are never trained as its
    assert [id(p) for p in gen.trainable_parameters()] == [id(p) for p in policy]
    assert not any(p.requires_grad for p in ref.parameters())
    # its state dict: adapter weights only, under names without the adapter's; the generator's (at
    # every level of its model) are what they were before the copy existed
    keys = list(ref.state_dict())
    assert keys and all(k.startswith("adapter.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
    assert not any(".reference." in k or ".default." in k for k in keys)
    assert _numel(ref.state_dict().values()) == _numel(policy)
    assert gen.state_dict().keys() == gen_keys
    assert gen.model.get_base_model().get_decoder().state_dict().keys() == decoder_keys


def test_snapshot_scores_like_the_policy_and_keeps_its_log_probs_while_the_policy_trains(lora):
    m, _ = lora
    gen = m.generator
    rows = _rows(gen)
    _train_policy(m, rows, steps=2)  # the policy adapter is no longer peft's initial one
    ref = gen.copy_as("reference")
    snap = _lp(gen, rows)
    assert torch.equal(_lp(ref, rows), snap)  # created as a snapshot: exactly the policy's
    with torch.no_grad():
        greedy = gen.sample_ids(rows[0], 4, do_sample=False).ids
    assert ref.sample_ids(rows[0], 4, do_sample=False).ids == greedy
    before = {i: p.detach().clone() for i, p in _unique_params(m).items()}
    ref_before = [p.detach().clone() for p in ref.parameters()]
    _train_policy(m, rows)
    changed = {i for i, p in _unique_params(m).items() if not torch.equal(p, before[i])}
    assert changed == {id(p) for p in gen.trainable_parameters()}  # exactly the policy adapter moved
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), ref_before))  # the copy did not
    assert not any(p.requires_grad for p in ref.parameters())
    assert not torch.equal(_lp(gen, rows), snap)  # the policy moved away ...
    assert torch.equal(_lp(ref, rows), snap)  # ... the copy still scores as the snapshot
    ref.snapshot_(gen)
    assert torch.equal(_lp(ref, rows), _lp(gen, rows))
    with pytest.raises(ValueError, match="snapshots the generator"):
        ref.snapshot_(Generator(copy.deepcopy(gen.model), gen.tokenizer, gen.cfg, gen.ledger))


def test_scoring_with_the_copy_restores_the_policy_adapter_flags_and_modes(lora, monkeypatch):
    m, _ = lora
    gen = m.generator
    rows = _rows(gen)
    ref = gen.copy_as("reference")
    _train_policy(m, rows, steps=2)  # the copy and the policy now differ
    policy_lp = _lp(gen, rows)
    gen.train()
    frozen = gen.trainable_parameters()[:2]  # as in a phase that freezes them: peft's set_adapter would not
    for p in frozen:
        p.requires_grad_(False)
    flags = [p.requires_grad for p in gen.model.parameters()]
    modes = [mod.training for mod in gen.model.modules()]
    seen = []
    real = Generator._backbone

    def spy(self, *a):
        seen.append((self.model.active_adapter, torch.is_grad_enabled(), self.model.training))
        return real(self, *a)

    monkeypatch.setattr(Generator, "_backbone", spy)
    with torch.enable_grad():
        lp, _ = ref.token_logprobs(*rows)
    assert seen == [("reference", False, False)] and not lp.requires_grad  # no grad, no dropout
    ref.sample_ids(rows[0], 2)
    assert gen.model.active_adapter == "default"
    assert [p.requires_grad for p in gen.model.parameters()] == flags
    assert [mod.training for mod in gen.model.modules()] == modes

    def boom(self, *a):
        raise RuntimeError("inside the reference call")

    monkeypatch.setattr(Generator, "_backbone", boom)
    with pytest.raises(RuntimeError, match="inside the reference call"):
        ref.token_logprobs(*rows)
    monkeypatch.setattr(Generator, "_backbone", real)
    assert gen.model.active_adapter == "default"
    assert [p.requires_grad for p in gen.model.parameters()] == flags
    assert [mod.training for mod in gen.model.modules()] == modes
    gen.eval()
    assert torch.equal(_lp(gen, rows), policy_lp)  # the policy adapter is what scores again


def test_the_copy_is_charged_as_score_under_its_name_like_a_deep_copy(lora):
    m, ledger = lora
    gen = m.generator
    rows = _rows(gen)
    deep = Generator(copy.deepcopy(gen.model), gen.tokenizer, gen.cfg, ledger, "deep")  # what copy_as made
    deep.requires_grad_(False)
    with torch.no_grad():
        _, gen_score = _charged(ledger, lambda: gen.token_logprobs(*rows))
    _, gen_train = _charged(ledger, lambda: gen.token_logprobs(*rows))
    ref = gen.copy_as("reference")
    with torch.no_grad():
        _, deep_score = _charged(ledger, lambda: deep.token_logprobs(*rows))
    _, ref_score = _charged(ledger, lambda: ref.token_logprobs(*rows))  # under grad mode: still a score
    assert set(ref_score) == {("reference", "score")}
    assert ref_score[("reference", "score")] == deep_score[("deep", "score")] == gen_score[("generator", "score")]
    # the policy's own charges ignore the idle copy adapter
    with torch.no_grad():
        assert _charged(ledger, lambda: gen.token_logprobs(*rows))[1] == gen_score
    assert _charged(ledger, lambda: gen.token_logprobs(*rows))[1] == gen_train
    _, ref_gen = _charged(ledger, lambda: ref.sample_ids(rows[0], 3, do_sample=False))
    _, deep_gen = _charged(ledger, lambda: deep.sample_ids(rows[0], 3, do_sample=False))
    assert set(ref_gen) == {("reference", "generate")}
    assert ref_gen[("reference", "generate")] == deep_gen[("deep", "generate")]


def test_without_lora_the_copy_is_an_independent_deep_copy(tmp_path):
    _, m, _ = build(tiny_cfg(tmp_path, "strategy.name=none"))
    ref = m.generator.copy_as("reference")
    assert type(ref) is Generator and ref.model is not m.generator.model
    assert ref.state_dict().keys() == m.generator.state_dict().keys()
    with torch.no_grad():
        for p in m.generator.parameters():
            p.add_(0.01)
    ref.snapshot_(m.generator)
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), m.generator.parameters()))
