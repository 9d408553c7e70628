"""Pronounceable invented names built from syllables, unique and seed-deterministic.

Words have at least two syllables (so they never collide with English words the
templates use).  When a length keeps colliding the generator permanently grows
its syllable count, so asking for millions of unique names always terminates.
"""

from __future__ import annotations

import random

ONSETS = (
    "b",
    "br",
    "d",
    "dr",
    "f",
    "g",
    "gr",
    "h",
    "k",
    "kr",
    "l",
    "m",
    "n",
    "p",
    "pr",
    "r",
    "s",
    "st",
    "t",
    "tr",
    "v",
    "z",
    "th",
    "sh",
    "j",
    "qu",
)
VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ai", "ei")
SIMPLE_ONSETS = tuple(o for o in ONSETS if len(o) == 1)
CODAS = ("", "", "", "", "n", "r", "l", "s", "k", "m", "sk", "nd", "rn", "lt")
SIMPLE_CODAS = ("", "", "", "n", "r", "l", "s", "m")  # inside words: keep clusters short


class NameGen:
    """Unique capitalised words; `used` is shared between generators that must not clash."""

    def __init__(self, rng: random.Random, used: set[str], min_syllables: int = 2, max_tries: int = 30):
        self.rng, self.used = rng, used
        self.n_syl = min_syllables
        self.max_tries = max_tries
        self.stems: list[str] = []  # first syllables handed out so far

    def syllable(self, after_consonant: bool = False, final: bool = False) -> str:
        r = self.rng
        onset = r.choice(SIMPLE_ONSETS if after_consonant else ONSETS)
        return onset + r.choice(VOWELS) + r.choice(CODAS if final else SIMPLE_CODAS)

    def _compose(self, first: str) -> str:
        w = first
        for k in range(1, self.n_syl):
            w += self.syllable(w[-1] not in "aeiou", final=k == self.n_syl - 1)
        return w.capitalize()

    def word(self, share_stem: float = 0.0) -> str:
        """A new unique word; with prob. share_stem it reuses an earlier first
        syllable, giving look-alike names (hard negatives for retrievers)."""
        while True:
            for _ in range(self.max_tries):
                reuse = self.stems and self.rng.random() < share_stem
                first = self.rng.choice(self.stems) if reuse else self.syllable()
                w = self._compose(first)
                if w.lower() not in self.used:
                    self.used.add(w.lower())
                    if not reuse:
                        self.stems.append(first)
                    return w
            self.n_syl += 1  # this length is crowded: grow, never loop forever
