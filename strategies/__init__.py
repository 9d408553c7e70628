"""Strategy registry: one line per strategy. Installed as `ragtune.strategies`."""

from __future__ import annotations

import importlib
from typing import Dict, Type

from ragtune.config import ConfigError
from ragtune.strategy import Strategy

from .independent import Independent
from .joint import Joint
from .jsa import JSA
from .none import NoFineTuning
from .rag_r1 import RAGR1
from .rl_retriever import RLRetriever
from .topk_marginal import TopKMarginal
from .two_phase import TwoPhase
from .vrag import VRAG

REGISTRY: Dict[str, Type[Strategy]] = {
    cls.name: cls for cls in (NoFineTuning, Independent, TwoPhase, Joint, TopKMarginal, VRAG, JSA, RLRetriever, RAGR1)
}


def get_strategy(name: str) -> Type[Strategy]:
    """A registered name, or an import path `package.module:ClassName` (a strategy outside ragtune)."""
    if ":" in name:
        return _import_strategy(name)
    if name not in REGISTRY:
        raise ConfigError(
            f"config key 'strategy.name': unknown strategy '{name}' "
            f"(registered: {', '.join(sorted(REGISTRY))}, or an import path module:Class)"
        )
    return REGISTRY[name]


def _import_strategy(path: str) -> Type[Strategy]:
    module, _, attr = path.partition(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"config key 'strategy.name': cannot import '{path}': {e}") from e
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise ConfigError(f"config key 'strategy.name': '{path}' is not a ragtune.strategy.Strategy subclass")
    return cls
