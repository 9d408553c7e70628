"""Configuration: typed schema <- YAML <- overrides; every error is a ConfigError naming its key."""
from __future__ import annotations

import shutil

import pytest
from omegaconf import OmegaConf

from helpers import TINY, assert_same_tensors, final_weights, pinned_tokenizers, tiny_cfg  # noqa: F401 (fixture)
from ragtune import run
from ragtune.config import COMPONENTS, ConfigError, load_config, strategy_options
from ragtune.cost import Ledger
from ragtune.strategies import REGISTRY, get_strategy


def _err(files, overrides) -> str:
    with pytest.raises(ConfigError) as ei:
        load_config(files, overrides)
    return str(ei.value)


def test_tiny_config_loads_with_overrides(tmp_path):
    cfg = tiny_cfg(tmp_path, "train.steps=3", "strategy.name=joint", "train.lr.generator=0.5")
    assert cfg.train.steps == 3 and cfg.strategy.name == "joint" and cfg.train.lr.generator == 0.5
    assert cfg.run_dir == str(tmp_path)
    assert cfg.train.batch_size == 4  # from tiny.yaml, not the schema default (8)


@pytest.mark.parametrize("yaml_text, key", [
    ("run_dir: x\ntrain:\n  stepz: 3\n", "train.stepz"),
    ("run_dir: x\nbogus: 1\n", "bogus"),
    ("run_dir: x\nretriever:\n  tiny:\n    hiddn: 3\n", "retriever.tiny.hiddn"),
])
def test_unknown_key_in_yaml_names_dotted_key(tmp_path, yaml_text, key):
    f = tmp_path / "bad.yaml"
    f.write_text(yaml_text)
    msg = _err([TINY, str(f)], [])
    assert f"'{key}'" in msg and str(f) in msg


@pytest.mark.parametrize("override, key", [
    ("train.stepz=3", "train.stepz"),
    ("bogus=1", "bogus"),
    ("generator.lora.rank=4", "generator.lora.rank"),
])
def test_unknown_key_in_override_names_dotted_key(override, key):
    msg = _err([TINY], [override])
    assert f"'{key}'" in msg


@pytest.mark.parametrize("override, key", [
    ("train.steps=abc", "train.steps"),
    ("train.steps=1.5", "train.steps"),
    ("train.progress=maybe", "train.progress"),
    ("retriever.temperature=hot", "retriever.temperature"),
])
def test_wrong_type_names_key(override, key):
    assert f"'{key}'" in _err([TINY], [override])


def test_wrong_type_in_yaml_names_key(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  batch_size: [1, 2]\n")
    assert "'train.batch_size'" in _err([TINY, str(f)], ["run_dir=x"])


def test_missing_run_dir(tmp_path):
    f = tmp_path / "no_run_dir.yaml"
    f.write_text("train:\n  steps: 2\n")
    assert "'run_dir'" in _err([str(f)], [])
    assert "'run_dir'" in _err([], [])


def test_missing_file_and_malformed_override(tmp_path):
    assert "not found" in _err([str(tmp_path / "nope.yaml")], [])
    assert "train.steps" in _err([TINY], ["train.steps"])


@pytest.mark.parametrize("comp", COMPONENTS)
@pytest.mark.parametrize("value", ["0", "-1e-3"])
def test_non_positive_lr_per_component(comp, value):
    assert f"'train.lr.{comp}'" in _err([TINY], [f"train.lr.{comp}={value}"])


@pytest.mark.parametrize("override, key", [
    ("train.steps=0", "train.steps"),
    ("train.batch_size=-2", "train.batch_size"),
    ("train.k=0", "train.k"),
    ("train.grad_accum=0", "train.grad_accum"),
    ("train.warmup_steps=-1", "train.warmup_steps"),
    ("index.backend=annoy", "index.backend"),
    ("train.schedule=step", "train.schedule"),
])
def test_bad_values_name_key(override, key):
    assert f"'{key}'" in _err([TINY], [override])


def test_k_larger_than_corpus(tmp_path):
    cfg = tiny_cfg(tmp_path, "train.k=100000")
    data = run.load_data(cfg.data)
    with pytest.raises(ConfigError, match=r"'train\.k'"):
        run.build_pipeline(cfg, data, Ledger("test"))
    # the largest legal k is the corpus size: that one builds
    cfg = tiny_cfg(tmp_path, f"train.k={len(data.corpus)}")
    run.build_pipeline(cfg, data, Ledger("test"))


def test_unknown_strategy_name(tmp_path):
    with pytest.raises(ConfigError, match=r"'strategy\.name'.*nonesuch"):
        get_strategy("nonesuch")
    cfg = tiny_cfg(tmp_path, "strategy.name=nonesuch")
    with pytest.raises(ConfigError, match=r"'strategy\.name'"):
        run.build_pipeline(cfg, run.load_data(cfg.data), Ledger("test"))


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_unknown_strategy_option_names_key(tmp_path, name):
    cfg = tiny_cfg(tmp_path, f"strategy.name={name}", "strategy.foo=1")
    with pytest.raises(ConfigError, match=r"'strategy\.foo'"):
        strategy_options(cfg, get_strategy(name).Options)


@pytest.mark.parametrize("name, override, key", [
    ("joint", "strategy.retriever_loss=bogus", "strategy.retriever_loss"),
    ("joint", "strategy.gen_temperature=0", "strategy.gen_temperature"),
    ("joint", "strategy.gen_temperature=abc", "strategy.gen_temperature"),
    ("joint", "strategy.marginal=both", "strategy.marginal"),
    ("two_phase", "strategy.generator_fraction=1.5", "strategy.generator_fraction"),
    ("independent", "strategy.hard_negatives=-1", "strategy.hard_negatives"),
    ("independent", "strategy.generator_context=oracle", "strategy.generator_context"),
])
def test_strategy_option_bad_value(tmp_path, name, override, key):
    cfg = tiny_cfg(tmp_path, f"strategy.name={name}", override)
    with pytest.raises(ConfigError, match=f"'{key}'"):
        strategy_options(cfg, get_strategy(name).Options)
    with pytest.raises(ConfigError, match=f"'{key}'"):  # the same check guards run building
        run.build_pipeline(cfg, run.load_data(cfg.data), Ledger("test"))


def test_strategy_options_typed(tmp_path):
    cfg = tiny_cfg(tmp_path, "strategy.name=joint", "strategy.gen_temperature=2", "strategy.retriever_loss=pdist")
    opts = strategy_options(cfg, get_strategy("joint").Options)
    assert opts.gen_temperature == 2.0 and isinstance(opts.gen_temperature, float)
    assert opts.retriever_loss == "pdist" and opts.marginal == "token"


def test_saved_config_reloads_identical(tmp_path, pinned_tokenizers):
    cfg = tiny_cfg(tmp_path / "a", "strategy.name=joint", "train.steps=2", "eval.splits=[test]",
                   "train.lr.generator=0.002", "strategy.gen_temperature=0.5")
    run.train(cfg)
    saved = tmp_path / "a" / "config.yaml"
    again = load_config([str(saved)], [])
    assert OmegaConf.to_container(again) == OmegaConf.to_container(cfg)
    moved = load_config([str(saved)], [f"run_dir={tmp_path / 'b'}"])
    expected = OmegaConf.to_container(cfg)
    expected["run_dir"] = str(tmp_path / "b")
    assert OmegaConf.to_container(moved) == expected


def _reproduce(tmp_path):
    cfg = tiny_cfg(tmp_path / "a", "strategy.name=joint", "train.steps=2", "eval.splits=[test]")
    a = run.train(cfg)
    b = run.train(load_config([str(tmp_path / "a" / "config.yaml")], [f"run_dir={tmp_path / 'b'}"]))
    assert a["status"] == b["status"] == "ok"
    assert_same_tensors(final_weights(tmp_path / "a"), final_weights(tmp_path / "b"))
    assert a["test"] == b["test"]
    assert (tmp_path / "a" / "predictions.jsonl").read_text() == (tmp_path / "b" / "predictions.jsonl").read_text()


def test_train_from_saved_config_reproduces_same_tokenizer(tmp_path, pinned_tokenizers):
    """With the retriever tokenizer pinned, a run from RUN_DIR/config.yaml is bit-identical."""
    _reproduce(tmp_path)


def test_train_from_saved_config_reproduces(tmp_path):
    for _ in range(2):  # two tries: a lucky identical vocabulary must not make this pass
        _reproduce(tmp_path)
        shutil.rmtree(tmp_path / "a")
        shutil.rmtree(tmp_path / "b")
