"""The strategy contract, checked for every registered strategy (and the out-of-tree toy).

A new strategy gets these checks for free: a finite scalar loss with float logs in every phase;
exactly the declared trainable components change in a step, and hook-updated parts change only
through their hook; the index refreshes if and only if the passage side trains; registry key ==
module name == configs/strategies/<name>.yaml; the core never names a registered strategy.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from ragtune import run
from ragtune.ledger import ACTIVITIES as KINDS
from ragtune.ledger import TRAINING_KINDS
from ragtune.strategies import REGISTRY
from ragtune.strategy import LossSum, Strategy

from helpers import ROOT, build, changed_components, load_json, make_trainer, snapshot, step_ctx, tiny_cfg

TOY = "toy_strategy:PolyakToy"
CASES = [(n, ()) for n in sorted(REGISTRY)] + [(TOY, ())]
CASES += [("joint", ("strategy.train_doc_encoder=true",)), ("independent", ("strategy.train_doc_encoder=true",))]


def _ids(v):
    return "+".join(x.split("=")[0].split(".")[-1] for x in v) or "-" if isinstance(v, tuple) else v.split(":")[-1]


@pytest.mark.parametrize("name, extra", CASES, ids=_ids)
def test_loss_is_finite_scalar_with_float_logs_in_every_phase(tmp_path, name, extra):
    data, m, _ = build(tiny_cfg(tmp_path, f"strategy.name={name}", *extra))
    for phase in m.strategy.phases():
        m.set_modes(phase.trains)
        ctx, batch = step_ctx(m, phase.name), data.train[:4]
        if phase.collect:  # as the trainer does: experience first (no grad), then the loss on it
            with m.scoring():
                batch, _ = m.strategy.collect(batch, m, ctx)
        out, logs = m.strategy.loss(list(batch), m, ctx)
        loss = out.total if isinstance(out, LossSum) else out
        assert loss.dim() == 0 and torch.isfinite(loss), phase.name
        assert all(isinstance(v, float) for v in logs.values()), logs


@pytest.mark.parametrize("name, extra", CASES, ids=_ids)
def test_exactly_declared_parts_change_and_index_refreshes_iff_passage_side_trains(tmp_path, name, extra):
    cfg = tiny_cfg(tmp_path, f"strategy.name={name}", "train.steps=2", *extra)
    data, m, _ = build(cfg)
    s = m.strategy
    trained = set(s.trained_components())
    hooked = {p.name for p in s.parts() if not p.trainable}
    version = m.index.version
    before = snapshot(m)
    make_trainer(cfg, data, m).fit()
    changed = changed_components(before, snapshot(m))
    for comp, names in changed.items():
        if comp in trained or comp in hooked:
            assert names or not before[comp], f"{comp} is declared trained/hook-updated but did not change"
        else:
            assert not names, f"{comp} changed but is not declared trained: {names[:3]}"
    assert all(not p.requires_grad for c in hooked for p in s.part_module(c).parameters())
    passage_side = "doc_encoder" in trained
    assert (m.index.version > version) == passage_side


def test_hook_updated_parts_change_only_through_their_hook(tmp_path, monkeypatch):
    """With `on_step_end` disabled, frozen parts stay bit-identical (they never hold optimizer state)."""
    cfg = tiny_cfg(tmp_path, f"strategy.name={TOY}", "train.steps=2")
    data, m, _ = build(cfg)
    monkeypatch.setattr(type(m.strategy), "on_step_end", Strategy.on_step_end)
    before = snapshot(m)
    make_trainer(cfg, data, m).fit()
    changed = changed_components(before, snapshot(m))
    assert changed["posterior"] and changed["generator"]
    assert not changed["target"]


def test_registry_module_and_config_names_agree():
    strategies_dir = ROOT / "strategies"
    for key, cls in REGISTRY.items():
        assert cls.name == key
        assert cls.__module__ == f"ragtune.strategies.{key}", cls.__module__
        assert (strategies_dir / f"{key}.py").is_file()
        assert (ROOT / "configs" / "strategies" / f"{key}.yaml").is_file(), key
        assert cls.paper or key == "none", f"{key}: cite the paper"


def test_core_names_no_strategy():
    names = [n for n in REGISTRY if n != "none"]
    pattern = re.compile("|".join(rf"['\"]{re.escape(n)}['\"]" for n in names))
    hits = [
        f"{p.relative_to(ROOT)}: {m.group(0)}"
        for p in Path(ROOT / "ragtune").rglob("*.py")
        for m in [pattern.search(p.read_text())]
        if m
    ]
    assert not hits, hits


@pytest.mark.parametrize("name", sorted(REGISTRY) + [TOY])
def test_declaration_is_cheap_and_consistent(name):
    """Built from options alone: no modules, the phases name known components."""
    from ragtune.strategies import get_strategy

    s = get_strategy(name)()
    s.check_declaration()
    assert not list(s.parameters())  # nothing is built before setup


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_strategy_trains_and_evaluates(tmp_path, name):
    res = run.train_and_evaluate(tiny_cfg(tmp_path, f"strategy.name={name}", "train.steps=2"))
    assert res["status"] == "ok" and res["reason"] == "" and res["strategy"] == name
    assert load_json(tmp_path / "result.json")["status"] == "ok"
    for split in ("dev", "test"):
        s = res[split]
        for key in ("em", "f1", "recall@1", "recall@2"):
            assert 0.0 <= float(s[key]) <= 1.0, (split, key)
        assert s["n"] == 16  # tiny.yaml: 16 dev and 16 test questions
        assert float(s["recall@1"]) <= float(s["recall@2"])
    flops = res["cost"]["flops"]
    assert set(KINDS) <= set(flops)
    assert flops["total_train"] == sum(flops[k] for k in TRAINING_KINDS)
    assert flops["total"] == flops["total_train"] + flops["eval"]
    assert flops["eval"] > 0 and flops["index"] > 0  # evaluation ran; the index was built
    by_comp = res["cost"]["flops_by_component"]
    phases = REGISTRY[name]().phases()
    trained = {c for p in phases for c in p.trains}
    if name == "none":
        assert flops["train"] == 0 and res["steps"] == 0 and not phases
    else:
        assert flops["train"] > 0 and res["steps"] == 2
        assert (tmp_path / "final.pt").exists()
    for comp in ("query_encoder", "doc_encoder", "generator"):
        charged_train = by_comp.get(comp, {}).get("train", 0)
        assert (charged_train > 0) == (comp in trained), comp
