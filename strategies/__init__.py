"""Strategy registry: one line per strategy. Installed as `ragtune.strategies`."""
from __future__ import annotations

from typing import Dict, Type

from ragtune.config import ConfigError
from ragtune.strategy import Strategy

from .independent import Independent
from .joint import Joint
from .none import NoFineTuning
from .two_phase import TwoPhase

REGISTRY: Dict[str, Type[Strategy]] = {cls.name: cls for cls in (NoFineTuning, Independent, TwoPhase, Joint)}


def get_strategy(name: str) -> Type[Strategy]:
    if name not in REGISTRY:
        raise ConfigError(f"config key 'strategy.name': unknown strategy '{name}' "
                          f"(registered: {', '.join(sorted(REGISTRY))})")
    return REGISTRY[name]
