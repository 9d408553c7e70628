"""Every shipped config (and each strategy config layered on the default) loads and validates."""

import pytest

from ragtune.config import load_config, strategy_options
from ragtune.strategies import REGISTRY, get_strategy

from helpers import ROOT


@pytest.mark.parametrize("base", ["configs/tiny.yaml", "configs/default.yaml"])
@pytest.mark.parametrize("strategy_file", sorted(p.name for p in (ROOT / "configs/strategies").glob("*.yaml")))
def test_strategy_configs_validate(base, strategy_file):
    cfg = load_config([str(ROOT / base), str(ROOT / "configs/strategies" / strategy_file)], ["run_dir=/tmp/unused"])
    cls = get_strategy(cfg.strategy.name)
    assert cfg.strategy.name == strategy_file[:-5]
    strategy_options(cfg, cls.Options)  # raises on an unknown or bad option


def test_every_registered_strategy_has_a_config():
    shipped = {p.stem for p in (ROOT / "configs/strategies").glob("*.yaml")}
    assert set(REGISTRY) <= shipped, f"missing configs/strategies/*.yaml for {set(REGISTRY) - shipped}"
