"""Train/eval modes per component, dropout-free index refreshes, and input guards."""

import dataclasses

import pytest
import torch

from ragtune import run
from ragtune.config import ConfigError
from ragtune.ledger import Ledger

from helpers import build, tiny_cfg


def _enable_dropout(module, p=0.5):
    for mod in module.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = p


def test_frozen_components_run_in_eval_mode(tmp_path):
    _, m, _ = build(tiny_cfg(tmp_path))
    m.set_modes({"generator"})
    assert m.generator.training and m.generator.model.training
    assert not m.retriever.query_encoder.training and not m.retriever.doc_encoder.training
    m.set_modes({"query_encoder"})
    assert m.retriever.query_encoder.training and not m.generator.training


def test_refresh_index_ignores_dropout_and_keeps_mode(tmp_path):
    _, m, _ = build(tiny_cfg(tmp_path))
    _enable_dropout(m.retriever.doc_encoder)
    m.retriever.doc_encoder.train()
    m.refresh_index()
    assert m.retriever.doc_encoder.training  # mode restored
    m.retriever.doc_encoder.eval()
    with torch.no_grad():
        expected = m.retriever.encode_passages(m.passage_texts)  # (N, H), no dropout
    torch.testing.assert_close(m.index.emb, expected)
    m.retriever.doc_encoder.train()
    with torch.no_grad():
        noisy = m.retriever.encode_passages(m.passage_texts)
    assert not torch.allclose(noisy, expected)  # the dropout really is active in train mode


def test_evaluate_restores_per_module_modes(tmp_path):
    from ragtune.evaluate import evaluate

    data, m, _ = build(tiny_cfg(tmp_path))
    m.set_modes({"generator"})
    evaluate(m, data.dev[:4], 2, [1], 4)
    assert m.generator.training and not m.retriever.query_encoder.training


def test_fp16_is_refused_with_the_key(tmp_path):
    with pytest.raises(ConfigError, match="train.precision"):
        tiny_cfg(tmp_path, "train.precision=fp16")


@pytest.mark.parametrize(
    "key", ["generator.max_prompt_length=0", "generator.max_answer_length=0", "retriever.max_query_length=-1"]
)
def test_non_positive_lengths_refused(tmp_path, key):
    with pytest.raises(ConfigError, match=key.split("=")[0]):
        tiny_cfg(tmp_path, key)


def test_label_strategy_needs_labels_on_every_question(tmp_path):
    cfg = tiny_cfg(tmp_path, "strategy.name=independent")
    data = run.load_data(cfg.data)
    data.train[3] = dataclasses.replace(data.train[3], gold_passage_ids=[])
    with pytest.raises(ConfigError, match=data.train[3].id):
        run.build_pipeline(cfg, data, Ledger("cpu"))


def test_concurrent_merge_adds_device_time_not_wall_time():
    a, b = Ledger("cpu"), Ledger("cpu")
    for led, secs in ((a, 2.0), (b, 3.0)):
        led.charge("generator", "train", tokens=10, flops=100)
        led.load_state_dict(
            {**led.state_dict(), "wall_seconds": {"train": secs}, "wall_total": secs, "device_seconds": secs}
        )
    seq = a.copy().merge(b)
    conc = a.copy().merge(b, concurrent=True)
    assert seq.totals()["flops"]["train"] == conc.totals()["flops"]["train"] == 200
    assert seq.totals()["wall_seconds"]["train"] == 5.0
    assert conc.totals()["wall_seconds"]["train"] == 3.0
    assert conc.totals()["device_hours"] == seq.totals()["device_hours"] == pytest.approx(5.0 / 3600)
