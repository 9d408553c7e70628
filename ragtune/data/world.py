"""The invented world behind the synthetic benchmark and its rendering into passages.

Entities (people, cities, companies, universities, countries) get unique
syllable names; every relation fact becomes its own passage, worded with one of
several paraphrase templates.  People share family names and places share name
stems, so look-alike entities exist.  Everything is O(n) and driven only by the
random.Random instances passed in, hence deterministic for a seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .names import NameGen
from .schema import Passage
from .templates import (
    COMPANY_SUFFIXES,
    HOBBIES,
    LANDMARKS,
    PASSAGE_TEMPLATES,
    PRODUCTS,
    PROFESSIONS,
    RELATIONS,
    UNIVERSITY_SUFFIXES,
)

ENTITY_TYPES = ("person", "city", "company", "university", "country")


@dataclass
class World:
    names: dict[str, list[str]]  # entity type -> names by index
    facts: dict[str, list]  # relation -> object value by subject index
    family: list[int]  # person -> family (last name) index
    families: list[list[int]]  # family index -> people
    pids: dict[str, list[str]] | None = None  # relation -> passage id by subject index

    def obj_text(self, rel: str, subj: int) -> str:
        value = self.facts[rel][subj]
        otype = RELATIONS[rel][1]
        if otype in self.names:
            return self.names[otype][value]
        return str(value)

    def subject_name(self, rel: str, subj: int) -> str:
        return self.names[RELATIONS[rel][0]][subj]

    def relations_of(self, etype: str) -> list[str]:
        return [r for r, (s, _, _) in RELATIONS.items() if s == etype]


def _people(n: int, rng: random.Random, used: set) -> tuple[list[str], list[int], list[list[int]]]:
    firsts_gen, lasts_gen = NameGen(rng, used), NameGen(rng, used)
    firsts = [firsts_gen.word() for _ in range(max(4, n // 2))]
    lasts = [lasts_gen.word(share_stem=0.2) for _ in range(max(2, n // 3))]
    full, names, family = set(), [], []
    while len(names) < n:
        for _ in range(30):
            f, li = rng.choice(firsts), rng.randrange(len(lasts))
            name = f"{f} {lasts[li]}"
            if name not in full:
                break
        else:  # crowded: a fresh first name is always unique
            f = firsts_gen.word()
            firsts.append(f)
            name = f"{f} {lasts[li]}"
        full.add(name)
        names.append(name)
        family.append(li)
    families: list[list[int]] = [[] for _ in lasts]
    for i, li in enumerate(family):
        families[li].append(i)
    return names, family, families


def build_world(
    n_people: int, n_cities: int, n_companies: int, n_universities: int, n_countries: int, rng: random.Random
) -> World:
    used: set[str] = set()
    people, family, families = _people(n_people, rng, used)
    place = NameGen(rng, used)
    countries = [place.word() for _ in range(n_countries)]
    cities = [place.word(share_stem=0.3) for _ in range(n_cities)]
    org = NameGen(rng, used)
    companies = [f"{org.word(share_stem=0.3)} {rng.choice(COMPANY_SUFFIXES)}" for _ in range(n_companies)]
    universities = [f"{org.word()} {rng.choice(UNIVERSITY_SUFFIXES)}" for _ in range(n_universities)]
    names = {"person": people, "city": cities, "company": companies, "university": universities, "country": countries}
    ri, rc = rng.randrange, rng.choice
    P, C, Y, U = range(n_people), range(n_companies), range(n_cities), range(n_universities)
    facts = {
        "born_in": [ri(n_cities) for _ in P],
        "lives_in": [ri(n_cities) for _ in P],
        "works_for": [ri(n_companies) for _ in P],
        "birth_year": [rng.randint(1920, 2004) for _ in P],
        "profession": [rc(PROFESSIONS) for _ in P],
        "studied_at": [ri(n_universities) for _ in P],
        "hobby": [rc(HOBBIES) for _ in P],
        "headquartered_in": [ri(n_cities) for _ in C],
        "company_founded": [rng.randint(1850, 2015) for _ in C],
        "founded_by": [ri(n_people) for _ in C],
        "product": [rc(PRODUCTS) for _ in C],
        "located_in": [ri(n_countries) for _ in Y],
        "landmark": [rc(LANDMARKS) for _ in Y],
        "campus_in": [ri(n_cities) for _ in U],
        "univ_founded": [rng.randint(1600, 1990) for _ in U],
        "language": [f"{c}ish" for c in countries],
    }
    return World(names, facts, family, families)


def render_passages(world: World, rng: random.Random, n_templates: int | None = None) -> list[Passage]:
    """One passage per fact, shuffled; fills world.pids. Ids are p00000, p00001, ..."""
    texts: list[tuple[str, str]] = []
    slots: list[tuple[str, int]] = []
    rand = rng.random  # faster than rng.choice, equally deterministic
    for rel, (stype, otype, _) in RELATIONS.items():
        tpls = PASSAGE_TEMPLATES[rel][: n_templates or None]
        k = len(tpls)
        onames = world.names.get(otype)
        for i, (s, v) in enumerate(zip(world.names[stype], world.facts[rel])):
            o = onames[v] if onames is not None else str(v)
            texts.append((s, tpls[int(rand() * k)].format(s=s, o=o)))
            slots.append((rel, i))
    order = list(range(len(texts)))
    rng.shuffle(order)  # order[position] = fact index
    width = max(5, len(str(len(texts))))
    pids = {rel: [""] * len(world.names[RELATIONS[rel][0]]) for rel in RELATIONS}
    passages = []
    for pos, k in enumerate(order):
        pid = f"p{pos:0{width}d}"
        rel, i = slots[k]
        pids[rel][i] = pid
        passages.append(Passage(pid, *texts[k]))
    world.pids = pids
    return passages
