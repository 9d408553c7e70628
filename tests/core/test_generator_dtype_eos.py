"""Generator loading choices for real models, on tiny decoders built here: `generator.eos_tokens`
(instruct models end turns with several tokens; each one ends a generation, nothing is inherited
from the model's generation_config) and `generator.dtype` (weights loaded in bf16/fp16, every
parameter training may update kept in float32 master weights)."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from test_generator_tokens import TEXTS, _rows, tiny_generator

from ragtune.config import ConfigError
from ragtune.generator import build_generator
from ragtune.ledger import Ledger


def test_an_extra_end_token_ends_a_row_like_eos():
    g = tiny_generator()
    ctx, _ = _rows(g, 4, seed=6)
    free = g.sample_ids(ctx, max_new_tokens=8, do_sample=False)
    assert free.finish == ["length"] * 4
    end = free.ids[0][2]  # row 0's third greedy token becomes an end token
    word = g.tokenizer.convert_ids_to_tokens(end)
    g2 = tiny_generator(eos_tokens=[word])
    g2.model.load_state_dict(g.model.state_dict())
    assert g2.eos_ids == {g.eos_id, end}
    out = g2.sample_ids(ctx, max_new_tokens=8, do_sample=False)
    assert out.finish[0] == "eos" and out.ids[0] == free.ids[0][:3]
    assert out.logprobs[0] == pytest.approx(free.logprobs[0][:3], abs=1e-6)
    for i in range(1, 4):  # every row ends at its first end token, if any
        j = next((j for j, t in enumerate(free.ids[i]) if t == end), None)
        assert out.ids[i] == (free.ids[i][: j + 1] if j is not None else free.ids[i])
        assert out.finish[i] == ("eos" if j is not None else "length")
    assert sorted(g2._generation_config(False, 8, 1.0).eos_token_id) == sorted({g.eos_id, end})
    g.model.generation_config.eos_token_id = [g.eos_id, end]  # the model's own list: not inherited
    assert g.sample_ids(ctx, max_new_tokens=8, do_sample=False).ids == free.ids


def test_an_end_token_outside_the_vocabulary_names_its_key():
    real = tiny_generator().tokenizer.convert_ids_to_tokens(5)
    with pytest.raises(ConfigError, match=r"generator\.eos_tokens\[1\]"):
        tiny_generator(eos_tokens=[real, "<|no such token|>"])


def _cfg(**over):
    cfg = OmegaConf.create(
        {
            "generator": {
                "model": "tiny",
                "tiny": {"hidden": 32, "layers": 1, "heads": 2, "intermediate": 64, "vocab_size": 300},
                "pretrain": {"steps": 0},
            }
        }
    )
    from ragtune.config import GeneratorConfig

    base = OmegaConf.merge(OmegaConf.structured(GeneratorConfig), cfg.generator)
    for k, v in over.items():
        OmegaConf.update(base, k, v)
    return base


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_bf16_weights_keep_float32_master_weights_for_what_trains(lora):
    over = {"dtype": "bfloat16", "lora.enabled": lora, "lora.target_modules": ["q_proj", "v_proj"]}
    g = build_generator(_cfg(**over), TEXTS, Ledger("test"), seed=0)
    trainable = {id(p) for p in g.trainable_parameters()}
    assert trainable and all(p.dtype == torch.float32 for p in g.trainable_parameters())
    frozen = [p for p in g.model.parameters() if id(p) not in trainable]
    if lora:  # the base stays in the loaded dtype: half the memory of float32
        assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    else:
        assert not frozen
    plain = build_generator(_cfg(**{**over, "dtype": "float32"}), TEXTS, Ledger("test"), seed=0)
    ctx, tgt = _rows(plain, 3, seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp, _ = g.token_logprobs(ctx, tgt)
    ref, _ = plain.token_logprobs(ctx, tgt)
    assert lp.dtype == torch.float32  # log-softmax in float32 whatever the compute dtype
    assert torch.allclose(lp, ref, atol=0.1) and not torch.equal(lp, ref)  # bf16 rounding, same model
