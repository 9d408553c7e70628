"""Configuration: typed schema <- YAML <- overrides; every error is a ConfigError naming its key."""

from __future__ import annotations

import shutil

import pytest
from omegaconf import OmegaConf

from ragtune import run
from ragtune.components import BUILTIN_COMPONENTS
from ragtune.config import ConfigError, load_config, strategy_options
from ragtune.ledger import Ledger
from ragtune.strategies import REGISTRY, get_strategy

from helpers import TINY, assert_same_tensors, final_weights, timeless, tiny_cfg  # noqa: F401 (fixture)


def _err(files, overrides) -> str:
    with pytest.raises(ConfigError) as ei:
        load_config(files, overrides)
    return str(ei.value)


def test_tiny_config_loads_with_overrides(tmp_path):
    cfg = tiny_cfg(tmp_path, "train.steps=3", "strategy.name=joint", "train.lr.generator=0.5")
    assert cfg.train.steps == 3 and cfg.strategy.name == "joint" and cfg.train.lr.generator == 0.5
    assert cfg.run_dir == str(tmp_path)
    assert cfg.train.batch_size == 4  # from tiny.yaml, not the schema default (8)


@pytest.mark.parametrize(
    "yaml_text, key",
    [
        ("run_dir: x\ntrain:\n  stepz: 3\n", "train.stepz"),
        ("run_dir: x\nbogus: 1\n", "bogus"),
        ("run_dir: x\nretriever:\n  tiny:\n    hiddn: 3\n", "retriever.tiny.hiddn"),
    ],
)
def test_unknown_key_in_yaml_names_dotted_key(tmp_path, yaml_text, key):
    f = tmp_path / "bad.yaml"
    f.write_text(yaml_text)
    msg = _err([TINY, str(f)], [])
    assert f"'{key}'" in msg and str(f) in msg


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.stepz=3", "train.stepz"),
        ("bogus=1", "bogus"),
        ("generator.lora.rank=4", "generator.lora.rank"),
    ],
)
def test_unknown_key_in_override_names_dotted_key(override, key):
    msg = _err([TINY], [override])
    assert f"'{key}'" in msg


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.steps=abc", "train.steps"),
        ("train.steps=1.5", "train.steps"),
        ("train.progress=maybe", "train.progress"),
        ("retriever.temperature=hot", "retriever.temperature"),
    ],
)
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


@pytest.mark.parametrize("comp", BUILTIN_COMPONENTS)
@pytest.mark.parametrize("value", ["0", "-1e-3", "inf", "nan"])
def test_non_positive_lr_per_component(comp, value):
    assert f"'train.lr.{comp}'" in _err([TINY], [f"train.lr.{comp}={value}"])


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.steps=0", "train.steps"),
        ("train.batch_size=-2", "train.batch_size"),
        ("train.k=0", "train.k"),
        ("train.grad_accum=0", "train.grad_accum"),
        ("train.warmup_steps=-1", "train.warmup_steps"),
        ("index.backend=annoy", "index.backend"),
        ("train.schedule=step", "train.schedule"),
        ("train.clip_norm=nan", "train.clip_norm"),
        ("train.weight_decay=nan", "train.weight_decay"),
        ("train.weight_decay=inf", "train.weight_decay"),
        ("train.betas=[0.9,1.5]", "train.betas"),
        ("train.eps=0", "train.eps"),
        ("train.adamw_impl=magic", "train.adamw_impl"),
        ("debug.stop_after=-1", "debug.stop_after"),
        ("generator.top_p=1.5", "generator.top_p"),
        ("generator.top_p=0", "generator.top_p"),
        ("generator.temperature=0", "generator.temperature"),
        ("generator.max_passage_tokens=0", "generator.max_passage_tokens"),
        ("train.lr.posterior=0.1", "train.lr.posterior"),  # not a component of the strategy
        ("strategy.name=two_phase train.phase.bogus.lr.generator=0.1", "train.phase.bogus"),
        ("strategy.name=two_phase train.phase.generator.lr.reader=0.1", "train.phase.generator.lr.reader"),
        ("strategy.name=two_phase train.phase.generator.schedule=step", "train.phase.generator.schedule"),
        ("strategy.name=two_phase train.phase.generator.lr.generator=inf", "train.phase.generator.lr.generator"),
    ],
)
def test_bad_values_name_key(override, key):
    assert f"'{key}'" in _err([TINY], ["run_dir=x", *override.split()])


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
    assert "'strategy.name'" in _err([TINY], ["run_dir=x", "strategy.name=nonesuch"])
    assert "'strategy.name'" in _err([TINY], ["run_dir=x", "strategy.name=no_such_module:Cls"])
    assert "not a ragtune.strategy.Strategy" in _err([TINY], ["run_dir=x", "strategy.name=os.path:join"])


def test_strategy_by_import_path(tmp_path):
    cfg = tiny_cfg(tmp_path, "strategy.name=toy_strategy:PolyakToy", "strategy.tau=0.25")
    cls = get_strategy(cfg.strategy.name)
    assert cls.__name__ == "PolyakToy" and strategy_options(cfg, cls.Options).tau == 0.25


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_unknown_strategy_option_names_key(tmp_path, name):
    assert "'strategy.foo'" in _err([TINY], ["run_dir=x", f"strategy.name={name}", "strategy.foo=1"])


@pytest.mark.parametrize(
    "name, override, key",
    [
        ("joint", "strategy.retriever_loss=bogus", "strategy.retriever_loss"),
        ("joint", "strategy.gen_temperature=0", "strategy.gen_temperature"),
        ("joint", "strategy.gen_temperature=abc", "strategy.gen_temperature"),
        ("joint", "strategy.marginal=both", "strategy.marginal"),
        ("two_phase", "strategy.generator_fraction=1.5", "strategy.generator_fraction"),
        ("independent", "strategy.hard_negatives=-1", "strategy.hard_negatives"),
        ("independent", "strategy.generator_context=oracle", "strategy.generator_context"),
        ("joint", "strategy.reduction=meen", "strategy.reduction"),
        ("two_phase", "strategy.reduction=median", "strategy.reduction"),
        ("independent", "strategy.reduction=meen", "strategy.reduction"),
    ],
)
def test_strategy_option_bad_value(tmp_path, name, override, key):
    """Checked when the config loads: before any data is read or model built."""
    assert f"'{key}'" in _err([TINY], ["run_dir=x", f"strategy.name={name}", override])


def test_strategy_options_typed(tmp_path):
    cfg = tiny_cfg(tmp_path, "strategy.name=joint", "strategy.gen_temperature=2", "strategy.retriever_loss=pdist")
    opts = strategy_options(cfg, get_strategy("joint").Options)
    assert opts.gen_temperature == 2.0 and isinstance(opts.gen_temperature, float)
    assert opts.retriever_loss == "pdist" and opts.marginal == "token"


def test_saved_config_reloads_identical(tmp_path, pinned_tokenizers):
    cfg = tiny_cfg(
        tmp_path / "a",
        "strategy.name=joint",
        "train.steps=2",
        "eval.splits=[test]",
        "train.lr.generator=0.002",
        "strategy.gen_temperature=0.5",
    )
    run.train_and_evaluate(cfg)
    saved = tmp_path / "a" / "config.yaml"
    again = load_config([str(saved)], [])
    assert OmegaConf.to_container(again) == OmegaConf.to_container(cfg)
    moved = load_config([str(saved)], [f"run_dir={tmp_path / 'b'}"])
    expected = OmegaConf.to_container(cfg)
    expected["run_dir"] = str(tmp_path / "b")
    assert OmegaConf.to_container(moved) == expected


def _reproduce(tmp_path):
    cfg = tiny_cfg(tmp_path / "a", "strategy.name=joint", "train.steps=2", "eval.splits=[test]")
    a = run.train_and_evaluate(cfg)
    b = run.train_and_evaluate(load_config([str(tmp_path / "a" / "config.yaml")], [f"run_dir={tmp_path / 'b'}"]))
    assert a["status"] == b["status"] == "ok"
    assert_same_tensors(final_weights(tmp_path / "a"), final_weights(tmp_path / "b"))
    assert timeless(a["test"]) == timeless(b["test"])
    assert (tmp_path / "a" / "predictions.jsonl").read_text() == (tmp_path / "b" / "predictions.jsonl").read_text()


def test_train_from_saved_config_reproduces_same_tokenizer(tmp_path, pinned_tokenizers):
    """With the retriever tokenizer pinned, a run from RUN_DIR/config.yaml is bit-identical."""
    _reproduce(tmp_path)


def test_train_from_saved_config_reproduces(tmp_path):
    for _ in range(2):  # two tries: a lucky identical vocabulary must not make this pass
        _reproduce(tmp_path)
        shutil.rmtree(tmp_path / "a")
        shutil.rmtree(tmp_path / "b")


@pytest.mark.parametrize(
    "content, fragment",
    [
        (b"train: [1, 2\n", "malformed YAML"),
        (b"- a\n- b\n", "top level must be a mapping"),
        (b"train:\n  steps: 3\nnote: caf\xe9\n", "not UTF-8"),
    ],
)
def test_unreadable_yaml_names_the_file(tmp_path, content, fragment):
    f = tmp_path / "bad.yaml"
    f.write_bytes(content)
    msg = _err([TINY, str(f)], ["run_dir=x"])
    assert fragment in msg and str(f) in msg


@pytest.mark.parametrize(
    "override, key",
    [
        ("eval.recall_k=[0]", "eval.recall_k[0]"),
        ("eval.splits=[bogus]", "eval.splits[0]"),
        ("eval.k=-1", "eval.k"),
        ("index.batch_size=0", "index.batch_size"),
        ("retriever.tiny.heads=3", "retriever.tiny.heads"),
        ("generator.tiny.hidden=0", "generator.tiny.hidden"),
        ("generator.prompt_template='{passage} {question} {title}'", "generator.prompt_template"),
        ("generator.prompt_template='{passage} only'", "generator.prompt_template"),
        ("data.field_map.bogus=x", "data.field_map.bogus"),
        ("train.threads=-1", "train.threads"),
    ],
)
def test_more_bad_values_name_key(override, key):
    assert f"'{key}'" in _err([TINY], ["run_dir=x", override])


def test_unparsable_override_and_run_dir_file(tmp_path):
    assert "overrides" in _err([TINY], ["run_dir=x", "train.steps=[1"])
    f = tmp_path / "afile"
    f.write_text("")
    assert "'run_dir'" in _err([TINY], [f"run_dir={f}"])
