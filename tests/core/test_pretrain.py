"""The cached LM pre-training of the tiny generator (the embedded default's 'pretrained LLM')."""

import pytest
import torch
from omegaconf import OmegaConf

from ragtune import pretrain
from ragtune.config import GeneratorConfig, TinyModel

TEXTS = [f"Entity{i % 7}. Entity{i % 7} was born in Town{i % 5} in {1900 + i}." for i in range(60)]


def _cfg(steps=30, grouped=False):
    cfg = OmegaConf.structured(
        GeneratorConfig(tiny=TinyModel(hidden=32, layers=1, heads=2, intermediate=64, vocab_size=300))
    )
    cfg.pretrain.steps, cfg.pretrain.grouped, cfg.pretrain.batch_size = steps, grouped, 8
    return cfg


@pytest.mark.parametrize("grouped", [False, True])
def test_pretraining_lowers_the_lm_loss(grouped):
    from ragtune import modelzoo

    cfg = _cfg(steps=80, grouped=grouped)
    tok = modelzoo.train_bpe(TEXTS, cfg.tiny.vocab_size)
    model = modelzoo.tiny_decoder(cfg.tiny, tok, 0)
    losses = pretrain.lm_pretrain(model, tok, TEXTS, cfg.pretrain, block=16)
    assert len(losses) == cfg.pretrain.steps
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


def test_cached_once_then_loaded(tmp_path, monkeypatch):
    cfg = _cfg(steps=3)
    m1, _ = pretrain.pretrained_tiny_generator(cfg, TEXTS, str(tmp_path))
    monkeypatch.setattr(pretrain, "lm_pretrain", lambda *a, **k: pytest.fail("trained twice"))
    m2, tok2 = pretrain.pretrained_tiny_generator(cfg, TEXTS, str(tmp_path))
    for (n, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), n
    assert tok2.eos_token == "<eos>"


def test_cache_key_depends_on_config_and_corpus():
    base = pretrain._key(_cfg(), TEXTS)
    assert pretrain._key(_cfg(grouped=True), TEXTS) != base
    assert pretrain._key(_cfg(steps=4), TEXTS) != base
    assert pretrain._key(_cfg(), TEXTS[:-1]) != base
    assert pretrain._key(_cfg(), list(TEXTS)) == base
