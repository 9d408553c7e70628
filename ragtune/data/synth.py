"""Synthetic multi-hop RAG benchmark: the embedded, deterministic default dataset.

`generate(cfg)` builds an invented world (world.py), renders one passage per
fact and asks single-hop, bridge (two hops, intermediate entity hidden) and
comparison questions worded differently from the passages (templates.py).
Each question carries its gold passages in hop order and a shuffled candidate
pool of gold + distractors.  Same config -> identical output; O(n) in size.

Bridge and comparison questions also carry their chain: one sub-query per hop,
worded with the single-hop question templates, and its answer (Question
documents the fields).  Sub-query wording is picked by a sha256 of the question
text, never by the question rng, so everything else is exactly what generator
version 1 produced for the same config; version 2 only adds the chains.
"""

from __future__ import annotations

import bisect
import dataclasses
import gc
import hashlib
import json
import os
import random
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .loaders import load_rag_dir, save_jsonl
from .schema import Corpus, Question, RAGData
from .templates import BRIDGE_QUESTIONS, COMPARISONS, RELATIONS, SINGLE_QUESTIONS
from .world import World, build_world, render_passages

GENERATOR_VERSION = 2  # 2: sub_queries / sub_answers (cache folders of 1 lack them)
SPLITS = ("train", "dev", "test")
KINDS = ("single", "bridge", "comparison")


@dataclass(frozen=True)
class SynthConfig:
    seed: int = 0
    n_people: int = 300
    n_cities: int | None = None  # None: derived from n_people (see resolved)
    n_companies: int | None = None
    n_universities: int | None = None
    n_countries: int | None = None
    n_train: int = 2000
    n_dev: int = 300
    n_test: int = 300
    distractors_per_question: int = 8
    frac_single: float = 0.6
    frac_bridge: float = 0.2
    frac_comparison: float = 0.2
    n_passage_templates: int | None = None  # None: all paraphrases; 1: no paraphrasing
    n_question_templates: int | None = None

    def __post_init__(self):
        if self.n_people < 2:
            raise ValueError("n_people must be >= 2")
        for f in ("n_train", "n_dev", "n_test", "distractors_per_question"):
            if getattr(self, f) < 0:
                raise ValueError(f"{f} must be >= 0")
        for f in (
            "n_cities",
            "n_companies",
            "n_universities",
            "n_countries",
            "n_passage_templates",
            "n_question_templates",
        ):
            if getattr(self, f) is not None and getattr(self, f) < 1:
                raise ValueError(f"{f} must be >= 1 (or None)")
        fr = (self.frac_single, self.frac_bridge, self.frac_comparison)
        if min(fr) < 0 or abs(sum(fr) - 1) > 1e-6:
            raise ValueError(f"question mix fractions must be >= 0 and sum to 1, got {fr}")

    def resolved(self) -> SynthConfig:
        """Fill derived sizes; two configs generating the same data resolve equal."""
        n = self.n_people
        return dataclasses.replace(
            self,
            n_cities=self.n_cities or max(3, n // 4),
            n_companies=self.n_companies or max(3, n // 4),
            n_universities=self.n_universities or max(2, n // 10),
            n_countries=self.n_countries or max(2, min(200, n // 25)),
        )

    def split_sizes(self) -> dict[str, dict[str, int]]:
        out = {}
        for split in SPLITS:
            n = getattr(self, f"n_{split}")
            s, b = round(n * self.frac_single), round(n * self.frac_bridge)
            b = min(b, n - s)
            out[split] = {"single": s, "bridge": b, "comparison": n - s - b}
        return out


class _QuestionMaker:
    def __init__(self, world: World, cfg: SynthConfig, rng: random.Random):
        self.w, self.cfg, self.rng = world, cfg, rng
        self.k = cfg.n_question_templates
        self.rels = [r for r in RELATIONS if world.pids[r]]

    def _tpl(self, templates: list):
        t = self.rng.randrange(min(len(templates), self.k or len(templates)))
        return t, templates[t]

    def _n(self, rel: str) -> int:
        return len(self.w.names[RELATIONS[rel][0]])

    def _sample_space(self, segments: list[tuple], need: int, what: str) -> list[tuple]:
        """Draw `need` distinct (key, subject) pairs from the concatenated segments."""
        starts, total = [], 0
        for _, n in segments:
            starts.append(total)
            total += n
        if need > total:
            raise ValueError(
                f"world too small: {need} {what} questions requested but only "
                f"{total} distinct ones exist; raise n_people or lower n_train/dev/test"
            )
        out = []
        for j in self.rng.sample(range(total), need):
            s = bisect.bisect_right(starts, j) - 1
            out.append((segments[s][0], j - starts[s]))
        return out

    def singles(self, need: int) -> list[Question]:
        segs = [(r, self._n(r)) for r in SINGLE_QUESTIONS]
        out = []
        for rel, i in self._sample_space(segs, need, "single-hop"):
            t, tpl = self._tpl(SINGLE_QUESTIONS[rel])
            out.append(
                self._q(
                    tpl.format(s=self.w.subject_name(rel, i)),
                    [self.w.obj_text(rel, i)],
                    [(rel, i)],
                    {"kind": "single", "relation": rel, "template": t},
                )
            )
        return out

    def bridges(self, need: int) -> list[Question]:
        segs = [(chain, self._n(chain[0])) for chain in BRIDGE_QUESTIONS]
        out = []
        for (r1, r2), i in self._sample_space(segs, need, "bridge"):
            mid = self.w.facts[r1][i]
            t, tpl = self._tpl(BRIDGE_QUESTIONS[(r1, r2)])
            out.append(
                self._q(
                    tpl.format(s=self.w.subject_name(r1, i)),
                    [self.w.obj_text(r2, mid)],
                    [(r1, i), (r2, mid)],
                    {"kind": "bridge", "relation": f"{r1}>{r2}", "template": t},
                    chain=True,
                )
            )
        return out

    def comparisons(self, need: int) -> list[Question]:
        rng, w, out, seen = self.rng, self.w, [], set()
        groups = {}
        for name, (rel, _) in COMPARISONS.items():
            if COMPARISONS[name][1][0][1] == "same":
                g: dict = {}
                for i, v in enumerate(w.facts[rel]):
                    g.setdefault(v, []).append(i)
                groups[name] = g
        budget = 100 * need + 1000
        while len(out) < need:
            budget -= 1
            if budget < 0:
                raise ValueError(f"world too small for {need} distinct comparison questions; raise n_people")
            name = rng.choice(list(COMPARISONS))
            rel, tpls = COMPARISONS[name]
            vals, n = w.facts[rel], self._n(rel)
            a = rng.randrange(n)
            if name in groups and rng.random() < 0.5:  # aim for a "yes" pair
                group = groups[name][vals[a]]
                if len(group) < 2:
                    continue
                b = rng.choice(group)
            else:
                b = rng.randrange(n)
            if a == b or (name not in groups and vals[a] == vals[b]):
                continue
            key = (name, min(a, b), max(a, b))
            if key in seen:
                continue
            seen.add(key)
            t, (tpl, rule) = self._tpl(tpls)
            if rule == "same":
                ans = "yes" if vals[a] == vals[b] else "no"
            else:
                pick = min if rule == "min" else max
                ans = w.subject_name(rel, pick((a, b), key=lambda i: vals[i]))
            out.append(
                self._q(
                    tpl.format(a=w.subject_name(rel, a), b=w.subject_name(rel, b)),
                    [ans],
                    [(rel, a), (rel, b)],
                    {"kind": "comparison", "relation": name, "template": t},
                    chain=True,
                )
            )
        return out

    def _q(self, text, answers, gold_facts, meta, chain: bool = False) -> Question:
        gold = [self.w.pids[r][i] for r, i in gold_facts]
        pool = gold + self._distractors(gold_facts, set(gold))
        self.rng.shuffle(pool)
        q = Question("", text, answers, gold, pool, meta)
        if chain:  # one sub-query per gold fact, so sub_queries[i] finds gold[i]
            q.sub_queries = [self._sub_query(r, i, text) for r, i in gold_facts]
            q.sub_answers = [self.w.obj_text(r, i) for r, i in gold_facts]
        return q

    def _sub_query(self, rel: str, subj: int, key: str) -> str:
        """The single-hop question asking (rel, subj), for a chain.

        The template (among the first n_question_templates) is chosen by a sha256
        of key and rel, never by self.rng: drawing from it would change every
        question generated after this one.  The two hops of a comparison share a
        relation and hence a wording."""
        tpls = SINGLE_QUESTIONS[rel]
        n = min(len(tpls), self.k or len(tpls))
        digest = hashlib.sha256(f"{key}\x1f{rel}".encode()).digest()
        return tpls[int.from_bytes(digest[:8], "big") % n].format(s=self.w.subject_name(rel, subj))

    def _distractors(self, gold_facts, seen: set) -> list[str]:
        """Same-entity other facts, look-alike (same family) entities, same relation."""
        rng, w, d = self.rng, self.w, self.cfg.distractors_per_question
        out: list[str] = []

        def add(pid):
            if pid not in seen and len(out) < d:
                seen.add(pid)
                out.append(pid)

        same_entity = [w.pids[r][i] for rel, i in gold_facts for r in w.relations_of(RELATIONS[rel][0]) if r != rel]
        rng.shuffle(same_entity)
        for pid in same_entity[: (d + 1) // 2]:
            add(pid)
        for rel, i in gold_facts:
            if RELATIONS[rel][0] == "person":
                kin = w.families[w.family[i]]
                for m in rng.sample(kin, min(2, len(kin))):
                    add(w.pids[rel][m])
        for _ in range(8 * d):
            if len(out) >= d:
                break
            rel, _ = rng.choice(gold_facts)
            add(rng.choice(w.pids[rel]))
        for pid in same_entity:  # tiny worlds: fill from whatever is left
            add(pid)
        for _ in range(8 * d if len(out) < d else 0):
            rel = rng.choice(self.rels)
            add(rng.choice(w.pids[rel]))
        return out


def generate(cfg: SynthConfig | None = None) -> RAGData:
    gc_was_on = gc.isenabled()
    gc.disable()  # millions of small acyclic objects: cyclic GC passes only cost time
    try:
        return _generate((cfg or SynthConfig()).resolved())
    finally:
        if gc_was_on:
            gc.enable()


def _generate(cfg: SynthConfig) -> RAGData:
    world = build_world(
        cfg.n_people,
        cfg.n_cities,
        cfg.n_companies,
        cfg.n_universities,
        cfg.n_countries,
        random.Random(f"ragtune-world:{cfg.seed}"),
    )
    corpus = Corpus(render_passages(world, random.Random(f"ragtune-text:{cfg.seed}"), cfg.n_passage_templates))
    rng = random.Random(f"ragtune-questions:{cfg.seed}")
    maker = _QuestionMaker(world, cfg, rng)
    sizes = cfg.split_sizes()
    pools = {
        kind: getattr(maker, {"single": "singles", "bridge": "bridges", "comparison": "comparisons"}[kind])(
            sum(sizes[s][kind] for s in SPLITS)
        )
        for kind in KINDS
    }
    splits = {}
    for split in SPLITS:
        qs = []
        for kind in KINDS:
            qs += pools[kind][: sizes[split][kind]]
            pools[kind] = pools[kind][sizes[split][kind] :]
        rng.shuffle(qs)
        width = max(5, len(str(len(qs))))
        for j, q in enumerate(qs):
            q.id = f"{split}-{j:0{width}d}"
        splits[split] = qs
    return RAGData(corpus, **splits)


def stats(data: RAGData) -> dict:
    out: dict = {"passages": len(data.corpus)}
    for split in SPLITS:
        c = Counter(q.meta.get("kind") for q in data.split(split))
        out[split] = {"total": sum(c.values()), **{k: c[k] for k in KINDS}}
    return out


def config_hash(cfg: SynthConfig) -> str:
    blob = json.dumps({"v": GENERATOR_VERSION, **dataclasses.asdict(cfg.resolved())}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def write(cfg: SynthConfig | None, out_dir) -> RAGData:
    """Write corpus.jsonl, train/dev/test.jsonl and meta.json (config + counts)."""
    cfg = (cfg or SynthConfig()).resolved()
    data, out = generate(cfg), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_jsonl(out / "corpus.jsonl", data.corpus)
    for split in SPLITS:
        save_jsonl(out / f"{split}.jsonl", data.split(split))
    meta = {
        "generator_version": GENERATOR_VERSION,
        "config": dataclasses.asdict(cfg),
        "config_hash": config_hash(cfg),
        "counts": stats(data),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return data


def default_cache_dir() -> Path:
    return Path(os.environ.get("RAGTUNE_CACHE", Path.home() / ".cache" / "ragtune")) / "synth"


def load_synth(cfg: SynthConfig | None = None, cache_dir=None) -> RAGData:
    """Generate once into cache_dir/<config hash>, then always load (and validate) from disk."""
    cfg = cfg or SynthConfig()
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = root / config_hash(cfg)
    if not (final / "meta.json").exists():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
        try:
            write(cfg, tmp)
            try:
                os.replace(tmp, final)
            except OSError:  # another process won the race; its copy is identical
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return load_rag_dir(final)
