"""Synthetic benchmark: determinism, gold/hop structure, pools, wording, scale, caching."""

import json
import random
import re
import time
from collections import Counter

import pytest

from ragtune.data import SynthConfig, check_files, generate, load_synth, stats, write
from ragtune.data.names import NameGen
from ragtune.data.templates import COMPARISONS
from ragtune.data.world import build_world

SMALL = SynthConfig(n_people=10, n_train=20, n_dev=5, n_test=5)


@pytest.fixture(scope="module")
def default_data():
    return generate(SynthConfig(seed=7))


def _all(d):
    return d.train + d.dev + d.test


def test_small_world_is_fast_and_sized():
    t = time.perf_counter()
    d = generate(SMALL)
    assert time.perf_counter() - t < 1.0
    s = stats(d)
    assert s["train"] == {"total": 20, "single": 12, "bridge": 4, "comparison": 4}
    assert s["dev"]["total"] == 5 and s["test"]["total"] == 5 and 50 < s["passages"] < 200


def test_default_size(default_data):
    s = stats(default_data)
    assert 1500 <= s["passages"] <= 3000
    assert s["train"] == {"total": 2000, "single": 1200, "bridge": 400, "comparison": 400}
    assert s["dev"]["total"] == s["test"]["total"] == 300


def test_same_seed_identical_files_other_seed_differs(tmp_path):
    write(SMALL, tmp_path / "a")
    write(SMALL, tmp_path / "b")
    write(SynthConfig(seed=1, n_people=10, n_train=20, n_dev=5, n_test=5), tmp_path / "c")
    names = ["corpus.jsonl", "train.jsonl", "dev.jsonl", "test.jsonl", "meta.json"]
    for n in names:
        assert (tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes(), n
    for n in names[:4]:
        assert (tmp_path / "a" / n).read_bytes() != (tmp_path / "c" / n).read_bytes(), n
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    assert meta["config"]["n_people"] == 10 and meta["counts"]["train"]["total"] == 20
    assert check_files([str(tmp_path / "a" / n) for n in names[:4]]) == []


def test_gold_passages_in_hop_order(default_data):
    d, c = default_data, default_data.corpus
    kinds = Counter()
    for q in _all(d):
        kind = q.meta["kind"]
        kinds[kind] += 1
        gold = [c.get(g) for g in q.gold_passage_ids]
        if kind == "single":
            assert len(gold) == 1 and q.answers[0] in gold[0].text
            assert gold[0].title in q.question
        elif kind == "bridge":
            first, second = gold
            assert q.answers[0] in second.text and q.answers[0] not in first.text
            assert second.title in first.text  # hop 1's object is hop 2's subject
            assert first.title in q.question and second.title not in q.question
        else:
            assert len(gold) == 2 and gold[0].title != gold[1].title
            assert all(p.title in q.question for p in gold)
            rel, tpls = COMPARISONS[q.meta["relation"]]
            rule = tpls[q.meta["template"]][1]
            if rule == "same":
                assert q.answers == ["yes"] or q.answers == ["no"]
            else:
                years = [int(re.search(r"\d{4}", p.text).group()) for p in gold]
                want = (min if rule == "min" else max)(range(2), key=lambda i: years[i])
                assert years[0] != years[1] and q.answers == [gold[want].title]
    assert set(kinds) == {"single", "bridge", "comparison"}


def test_yes_no_answers_match_facts():
    d = generate(
        SynthConfig(
            seed=2, n_people=40, n_train=200, n_dev=0, n_test=0, frac_single=0, frac_bridge=0, frac_comparison=1
        )
    )
    titles = {p.title for p in d.corpus}
    answers = Counter()
    for q in d.train:
        if q.answers[0] in ("yes", "no"):
            objs = []
            for g in q.gold_passage_ids:
                p = d.corpus.get(g)
                rest = p.text.replace(p.title, "")
                objs.append({t for t in titles if re.search(rf"\b{re.escape(t)}\b", rest)})
            assert (objs[0] == objs[1]) == (q.answers[0] == "yes"), q
            answers[q.answers[0]] += 1
    assert answers["yes"] > 10 and answers["no"] > 10


def test_candidate_pools(default_data):
    c = default_data.corpus
    for q in _all(default_data):
        pool = q.candidate_passage_ids
        assert set(q.gold_passage_ids) <= set(pool) and len(set(pool)) == len(pool)
        assert len(pool) == len(q.gold_passage_ids) + 8
        assert all(pid in c for pid in pool)
    # distractors include other facts about the gold entities (hard negatives)
    shared = sum(
        any(
            c.get(p).title in {c.get(g).title for g in q.gold_passage_ids}
            for p in set(q.candidate_passage_ids) - set(q.gold_passage_ids)
        )
        for q in default_data.train
    )
    assert shared == len(default_data.train)
    # gold is not always first: pools are shuffled
    assert len({q.candidate_passage_ids.index(q.gold_passage_ids[0]) for q in default_data.train}) > 5


def test_no_question_repeated_across_splits(default_data):
    keys = [(q.meta["relation"], tuple(sorted(q.gold_passage_ids))) for q in _all(default_data)]
    assert len(keys) == len(set(keys))
    ids = [q.id for q in _all(default_data)]
    assert len(ids) == len(set(ids))


def test_questions_do_not_copy_passage_wording(default_data):
    c = default_data.corpus
    ents = {t for p in c for t in re.findall(r"[a-z0-9]+", p.title.lower())}

    def grams(text):
        toks = re.findall(r"[a-z0-9]+", text.lower())
        return {
            tuple(toks[i : i + 3])
            for i in range(len(toks) - 2)
            if not any(t in ents or t.isdigit() for t in toks[i : i + 3])
        }

    born = next(p.text for p in c if " came into the world in " in p.text)
    assert grams(born) == {
        ("came", "into", "the"),
        ("into", "the", "world"),
        ("the", "world", "in"),
    }  # the check sees template wording only
    shared = {
        (q.meta["relation"], g)
        for q in _all(default_data)
        for pid in q.gold_passage_ids
        for g in grams(q.question) & grams(c.get(pid).text)
    }
    assert shared == set()


def test_paraphrase_templates_used_and_limitable():
    d = generate(SynthConfig(n_people=60, n_train=10, n_dev=0, n_test=0))
    born = [p.text for p in d.corpus if " came into the world in " in p.text]
    assert 0 < len(born) < 60  # several wordings for born_in
    d1 = generate(SynthConfig(n_people=60, n_train=10, n_dev=0, n_test=0, n_passage_templates=1))
    assert sum(" came into the world in " in p.text for p in d1.corpus) == 60


def test_names_unique_and_generation_terminates():
    gen = NameGen(random.Random(0), set(), max_tries=2)
    words = [gen.word(share_stem=0.5) for _ in range(30000)]
    assert len(set(w.lower() for w in words)) == 30000 and gen.n_syl > 2
    w = build_world(500, 100, 100, 50, 20, random.Random(1))
    names = [n for ns in w.names.values() for n in ns]
    assert len(names) == len(set(names))
    assert max(len(f) for f in w.families) > 1  # look-alike people share a family name


def test_invalid_configs():
    with pytest.raises(ValueError, match="world too small"):
        generate(SynthConfig(n_people=3, n_train=500, n_dev=0, n_test=0))
    with pytest.raises(ValueError, match="sum to 1"):
        SynthConfig(frac_single=0.9)


def test_load_synth_caches_and_validates(tmp_path, monkeypatch):
    d = load_synth(SMALL, tmp_path)
    assert [q.question for q in d.test] == [q.question for q in generate(SMALL).test]
    assert len(list(tmp_path.iterdir())) == 1
    import ragtune.data.synth as synth

    monkeypatch.setattr(synth, "write", lambda *a: pytest.fail("regenerated"))
    assert load_synth(SMALL, tmp_path).corpus.ids == d.corpus.ids


def test_scales_linearly_to_large_corpora():
    t = time.perf_counter()
    d = generate(SynthConfig(n_people=20000, n_train=100, n_dev=10, n_test=10))
    assert len(d.corpus) > 50000 and time.perf_counter() - t < 15
