"""`none`: no fine-tuning; the baseline row that shows what every other strategy gains."""

from __future__ import annotations

from ragtune.strategy import Strategy


class NoFineTuning(Strategy):
    name = "none"
    summary = "no training: the pretrained retriever and generator as they are"

    def phases(self):
        return []
