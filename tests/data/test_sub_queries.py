"""Per-hop sub-queries / sub-answers: schema, synthetic chains, byte identity, I/O, validation."""

import dataclasses
import hashlib
import json
import re

import pytest

import ragtune.data.synth as synth
from ragtune.data import (
    DataError,
    Question,
    SynthConfig,
    check_files,
    generate,
    hops_parallel,
    load_hf,
    load_questions,
    load_synth,
    main_check,
    save_jsonl,
    stats,
    write,
)
from ragtune.data.templates import BRIDGE_QUESTIONS, COMPARISONS, SINGLE_QUESTIONS
from ragtune.data.validate import check_field_map

NEW_FIELDS = ("sub_queries", "sub_answers")
SPLITS = ("train", "dev", "test")

# Reference sha256 digests of the jsonl rendering (one json.dumps(..., ensure_ascii=False)
# line per record, as save_jsonl writes it) of corpus/train/dev/test.  They were taken from
# the generator before sub-queries were added (GENERATOR_VERSION 1); the new fields
# (sub_queries, sub_answers) are excluded from the digest.  Everything else -- questions,
# answers, gold ids, candidate pools, ids, meta and the corpus -- must stay byte-identical.
REFERENCE = {
    "small": (
        SynthConfig(n_people=10, n_train=20, n_dev=5, n_test=5),
        {
            "corpus": "d98949ec47a67b275784bdd63214ad2e5c1a1218766ba25fe13862ddacd5ecee",
            "train": "17b2b03d92fbd4ce8669ccc37b304521e6616810d8437801a1ad6aefa665597b",
            "dev": "4e8f94f38c38cc8b6b412da5cf82b05c23ebc71e4747a4e79b35e3fb7c94c1ca",
            "test": "b7b31177a2550a42706a7bd5a9e509e09b24d7752ccbba3a03a51e1454063f82",
        },
    ),
    "mixed": (
        SynthConfig(
            seed=3,
            n_people=40,
            n_train=60,
            n_dev=12,
            n_test=12,
            distractors_per_question=4,
            frac_single=0.2,
            frac_bridge=0.4,
            frac_comparison=0.4,
            n_question_templates=2,
        ),
        {
            "corpus": "598c1f67d56edb0ee8d996575b21aeee8c751e177e07b59811d5406721a101fa",
            "train": "07eb0cfc9789a0e93a93b6fef0528df75521e4beb450414b78c1bcff329d7ab5",
            "dev": "3fed79040b61f13dc9226ca48fc0d83573aa56b66a756d1d47213767fab5431f",
            "test": "465cfe87840bb7d9adb1df105698aabf989ed42055510241b875880dde436429",
        },
    ),
    "para1": (
        SynthConfig(
            seed=11,
            n_people=25,
            n_train=30,
            n_dev=6,
            n_test=6,
            n_passage_templates=1,
            frac_single=0.0,
            frac_bridge=0.5,
            frac_comparison=0.5,
        ),
        {
            "corpus": "3a55f8aee6ab50cec88a287f8d4b1219dd4576e6d706f3544b0e3d1163c8c091",
            "train": "117ac64eec102df87f6ac12d8a1c15b201c84b7d6003f0cc376c0b8ffd2d6108",
            "dev": "34b0152a7c271332eb695fdc869699f89acb715d7b60288ae57db0d1a93baa9f",
            "test": "e2a04a49bf8af99a872a16bd33eda8b36efae1d025f579682029b71d1b0d9c61",
        },
    ),
}

MIX = SynthConfig(
    seed=5, n_people=60, n_train=150, n_dev=30, n_test=30, frac_single=0.34, frac_bridge=0.33, frac_comparison=0.33
)


@pytest.fixture(scope="module")
def mix():
    return generate(MIX)


def _all(d):
    return d.train + d.dev + d.test


def _digest(records) -> str:
    h = hashlib.sha256()
    for rec in records:
        rec = {k: v for k, v in rec.items() if k not in NEW_FIELDS}
        h.update((json.dumps(rec, ensure_ascii=False) + "\n").encode())
    return h.hexdigest()


def _rels(q) -> list[str]:
    """The relation each sub-query asks (both hops of a comparison ask the same one)."""
    if q.meta["kind"] == "comparison":
        return [COMPARISONS[q.meta["relation"]][0]] * 2
    return q.meta["relation"].split(">")


# ---- schema ----------------------------------------------------------------------------


def test_question_defaults_and_parallel_hops():
    q1, q2 = Question("1", "q?", ["a"]), Question("2", "q?", ["a"], meta={"kind": "comparison"})
    q1.sub_queries.append("x")
    assert q2.sub_queries == [] and q2.sub_answers == [] and q1.sub_answers == []
    assert q2.parallel_hops and hops_parallel(q2)
    for meta in ({"kind": "bridge"}, {"kind": "single"}, {}):
        q = Question("3", "q?", ["a"], meta=meta)
        assert q.parallel_hops is False and hops_parallel(q) is False
    assert [f.name for f in dataclasses.fields(Question)][-2:] == list(NEW_FIELDS)


def test_field_map_may_rename_the_new_fields():
    assert check_field_map({"sub_queries": "decomposition", "sub_answers": "steps"}) == {
        "sub_queries": "decomposition",
        "sub_answers": "steps",
    }
    with pytest.raises(ValueError, match="not fields"):
        check_field_map({"sub_query": "x"})


# ---- synthetic chains ------------------------------------------------------------------


def test_every_chain_relation_has_a_single_hop_template():
    rels = {r for chain in BRIDGE_QUESTIONS for r in chain} | {rel for rel, _ in COMPARISONS.values()}
    assert rels <= set(SINGLE_QUESTIONS)


def test_chains_for_bridge_and_comparison_only(mix):
    kinds = {"single": 0, "bridge": 0, "comparison": 0}
    for q in _all(mix):
        kinds[q.meta["kind"]] += 1
        if q.meta["kind"] == "single":
            assert q.sub_queries == [] and q.sub_answers == [], q
        else:
            assert len(q.sub_queries) == len(q.sub_answers) == len(q.gold_passage_ids) == 2, q
            assert all(s.strip() for s in q.sub_queries + q.sub_answers)
        assert q.parallel_hops == (q.meta["kind"] == "comparison")
    assert min(kinds.values()) > 50


def test_bridge_chain_is_sequential_and_ends_in_the_answer(mix):
    c, n = mix.corpus, 0
    for q in _all(mix):
        if q.meta["kind"] != "bridge":
            continue
        n += 1
        first, second = (c.get(g) for g in q.gold_passage_ids)
        mid, final = q.sub_answers
        assert mid in q.sub_queries[1] and mid not in q.sub_queries[0]  # hop 2 needs hop 1's answer
        assert final == q.answers[0]
        assert first.title in q.sub_queries[0] and mid in first.text  # sub_queries[i] finds gold[i]
        assert second.title == mid and final in second.text
    assert n > 50


def test_comparison_answer_follows_from_sub_answers(mix):
    c, rules = mix.corpus, {"same": set(), "min": 0, "max": 0}
    for q in _all(mix):
        if q.meta["kind"] != "comparison":
            continue
        gold = [c.get(g) for g in q.gold_passage_ids]
        assert [p.title in sq for p, sq in zip(gold, q.sub_queries)] == [True, True]
        assert all(v in p.text.replace(p.title, "") for p, v in zip(gold, q.sub_answers))
        rule = COMPARISONS[q.meta["relation"]][1][q.meta["template"]][1]
        if rule == "same":
            want = "yes" if q.sub_answers[0] == q.sub_answers[1] else "no"
            assert q.answers == [want], q
            rules["same"].add(want)
        else:
            years = [int(v) for v in q.sub_answers]
            pick = (min if rule == "min" else max)(range(2), key=lambda i: years[i])
            assert years[0] != years[1] and q.answers == [gold[pick].title], q
            rules[rule] += 1
    assert rules["same"] == {"yes", "no"} and rules["min"] > 3 and rules["max"] > 3


def test_sub_queries_use_single_hop_templates(mix):
    used = set()
    for q in _all(mix):
        for sq, pid, rel in zip(q.sub_queries, q.gold_passage_ids, _rels(q)):
            subject = mix.corpus.get(pid).title
            assert sq in {t.format(s=subject) for t in SINGLE_QUESTIONS[rel]}, (sq, q)
            used.add(sq.replace(subject, "{s}"))
    assert len(used) > 15  # wording varies (deterministically) across questions
    # n_question_templates limits sub-query wording too: template 0 only
    one = generate(dataclasses.replace(MIX, n_question_templates=1, n_train=60, n_dev=0, n_test=0))
    n = 0
    for q in one.train:
        for sq, pid, rel in zip(q.sub_queries, q.gold_passage_ids, _rels(q)):
            n += 1
            assert sq == SINGLE_QUESTIONS[rel][0].format(s=one.corpus.get(pid).title)
    assert n > 50


def test_sub_queries_do_not_copy_passage_wording(mix):
    ents = {t for p in mix.corpus for t in re.findall(r"[a-z0-9]+", p.title.lower())}

    def grams(text):
        toks = re.findall(r"[a-z0-9]+", text.lower())
        return {
            tuple(toks[i : i + 3])
            for i in range(len(toks) - 2)
            if not any(t in ents or t.isdigit() for t in toks[i : i + 3])
        }

    n, shared = 0, set()
    for q in _all(mix):
        for sq, pid in zip(q.sub_queries, q.gold_passage_ids):
            n += 1
            shared |= grams(sq) & grams(mix.corpus.get(pid).text)
    assert n > 200 and shared == set()


# ---- byte identity with generator version 1 ---------------------------------------------


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_everything_but_the_chains_is_byte_identical(name):
    cfg, want = REFERENCE[name]
    d = generate(cfg)
    got = {"corpus": _digest(dataclasses.asdict(p) for p in d.corpus)}
    got.update({s: _digest(dataclasses.asdict(q) for q in d.split(s)) for s in SPLITS})
    assert got == want
    assert any(q.sub_queries for q in _all(d))  # the digest really skipped something


def test_written_files_match_the_reference(tmp_path):
    cfg, want = REFERENCE["small"]
    write(cfg, tmp_path)
    assert hashlib.sha256((tmp_path / "corpus.jsonl").read_bytes()).hexdigest() == want["corpus"]
    n_sub = 0
    for s in SPLITS:
        lines = (tmp_path / f"{s}.jsonl").read_text(encoding="utf-8").splitlines()
        recs = [json.loads(line) for line in lines]
        assert _digest(recs) == want[s]
        n_sub += sum("sub_queries" in r for r in recs)
        # single-hop rows are written exactly as before: no empty sub-query keys
        assert all(("sub_queries" in r) == (r["meta"]["kind"] != "single") for r in recs)
    assert n_sub == sum(stats(generate(cfg))[s][k] for s in SPLITS for k in ("bridge", "comparison"))


def test_cache_of_the_old_generator_is_not_reused(tmp_path, monkeypatch):
    cfg = REFERENCE["small"][0]
    new_key = synth.config_hash(cfg)
    d = load_synth(cfg, tmp_path)  # from disk: the chains survive the cache
    assert [q.sub_queries for q in d.test] == [q.sub_queries for q in generate(cfg).test]
    assert any(q.sub_answers for q in d.train)
    monkeypatch.setattr(synth, "GENERATOR_VERSION", 1)
    assert synth.config_hash(cfg) != new_key  # folders written by version 1 have another key


# ---- loaders ---------------------------------------------------------------------------

CHAIN = Question(
    "b1",
    "Where is the employer of Ann based?",
    ["Oslo"],
    ["p1", "p2"],
    ["p2", "p0", "p1"],
    {"kind": "bridge"},
    ["Who employs Ann?", "Where is Acme based?"],
    ["Acme", "Oslo"],
)
PLAIN = Question("s1", "Where was Ann born?", ["Rome"], ["p0"], [], {"kind": "single"})


def test_jsonl_round_trip(tmp_path):
    qs = [CHAIN, PLAIN, Question("q", "Who?", ["x"], ["p0"], sub_queries=["Who is x?"])]
    save_jsonl(tmp_path / "q.jsonl", qs)
    assert load_questions(tmp_path / "q.jsonl") == qs
    recs = [json.loads(line) for line in (tmp_path / "q.jsonl").read_text().splitlines()]
    assert recs[0]["sub_queries"] == CHAIN.sub_queries and recs[0]["sub_answers"] == ["Acme", "Oslo"]
    assert set(NEW_FIELDS).isdisjoint(recs[1]) and "sub_answers" not in recs[2]


def test_synth_round_trip(tmp_path):
    cfg = REFERENCE["mixed"][0]
    d = generate(cfg)
    save_jsonl(tmp_path / "train.jsonl", d.train)
    assert load_questions(tmp_path / "train.jsonl", d.corpus) == d.train


def test_parquet_nulls_mean_no_chain(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [dataclasses.asdict(CHAIN), {"id": "s1", "question": "W?", "answers": ["y"], "gold_passage_ids": ["p0"]}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "q.parquet")  # row 2 gets nulls
    qs = load_questions(tmp_path / "q.parquet")
    assert qs[0].sub_queries == CHAIN.sub_queries and qs[0].sub_answers == CHAIN.sub_answers
    assert qs[1].sub_queries == [] and qs[1].sub_answers == []


def test_hf_field_map_renames_the_chain(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [
        {"id": "b1", "question": "Q?", "answers": ["Oslo"], "decomp": ["A?", "B?"], "steps": ["Acme", "Oslo"]},
        {"id": "b2", "question": "R?", "answers": ["x"], "decomp": ["C?"], "steps": ["x", "y"]},
    ]
    datasets.Dataset.from_list(rows[:1]).save_to_disk(str(tmp_path / "good"))
    fm = {"sub_queries": "decomp", "sub_answers": "steps"}
    (q,) = load_hf(str(tmp_path / "good"), "train", "questions", field_map=fm)
    assert q.sub_queries == ["A?", "B?"] and q.sub_answers == ["Acme", "Oslo"]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(DataError) as e:
        load_hf(str(tmp_path / "bad"), "train", "questions", field_map=fm)
    assert str(e.value) == f"{tmp_path / 'bad'}[train]:2: steps: 2 sub-answers for 1 sub-queries; lengths must match"


# ---- validation ------------------------------------------------------------------------

BASE = {"id": "q", "question": "Q?", "answers": ["a"], "gold_passage_ids": ["p1", "p2"]}
BAD_ROWS = [
    # (row overrides, field, message)
    ({"sub_queries": "Who?"}, "sub_queries", "expected a list of strings, got str"),
    ({"sub_queries": ["Who?", ""]}, "sub_queries", "item 1 is an empty string"),
    ({"sub_queries": ["Who?", 3]}, "sub_queries", "item 1 is int, expected a string"),
    ({"sub_queries": ["A?"], "sub_answers": {"a": 1}}, "sub_answers", "expected a list of strings, got dict"),
    ({"sub_queries": ["A?"], "sub_answers": [" "]}, "sub_answers", "item 0 is an empty string"),
    ({"sub_queries": ["A?", "B?"], "sub_answers": ["x"]}, "sub_answers", "1 sub-answers for 2 sub-queries"),
    ({"sub_answers": ["x"]}, "sub_answers", "sub-answers given without sub-queries"),
    ({"sub_queries": [], "sub_answers": ["x"]}, "sub_answers", "sub-answers given without sub-queries"),
    ({"sub_queries": ["A?", "B?", "C?"]}, "sub_queries", "3 sub-queries but only 2 gold passages"),
]
GOOD_ROWS = [
    {"sub_queries": ["A?", "B?"]},  # sub-answers are optional
    {"sub_queries": ["A?", "B?", "C?"], "gold_passage_ids": []},  # no gold ids: no length bound
    {"sub_queries": None, "sub_answers": None},
    {"sub_queries": ["A?"], "sub_answers": ["x"]},  # fewer sub-queries than hops is allowed
]


def _rows_file(tmp_path, rows):
    f = tmp_path / "q.jsonl"
    f.write_text("".join(json.dumps({**BASE, "id": f"q{i}", **r}) + "\n" for i, r in enumerate(rows, 1)))
    return f


def test_each_malformed_chain_names_file_line_and_field(tmp_path):
    f = _rows_file(tmp_path, GOOD_ROWS + [r for r, _, _ in BAD_ROWS])
    with pytest.raises(DataError) as e:
        load_questions(f)
    text = str(e.value)
    assert len(e.value.problems) == len(BAD_ROWS), text
    for i, (_, field, message) in enumerate(BAD_ROWS, len(GOOD_ROWS) + 1):
        assert f"{f}:{i}: {field}: {message}" in text, (i, text)
    assert all(p.line > len(GOOD_ROWS) for p in e.value.problems)


def test_good_chain_rows_load(tmp_path):
    qs = load_questions(_rows_file(tmp_path, GOOD_ROWS))
    assert [len(q.sub_queries) for q in qs] == [2, 3, 0, 1]
    assert [q.sub_answers for q in qs] == [[], [], [], ["x"]]


def test_field_map_names_the_file_column_in_problems(tmp_path):
    f = tmp_path / "q.jsonl"
    f.write_text(json.dumps({**BASE, "hops": ["A?"], "hop_answers": ["x", "y"]}) + "\n")
    with pytest.raises(DataError) as e:
        load_questions(f, field_map={"sub_queries": "hops", "sub_answers": "hop_answers"})
    assert [(p.line, p.field) for p in e.value.problems] == [(1, "hop_answers")]


# ---- data check ------------------------------------------------------------------------


def test_data_check_counts_questions_with_sub_queries(tmp_path, capsys):
    cfg = REFERENCE["small"][0]
    write(cfg, tmp_path)
    files = [str(tmp_path / f"{s}.jsonl") for s in SPLITS]
    assert main_check(files, str(tmp_path / "corpus.jsonl")) == 0
    out = capsys.readouterr().out.splitlines()
    s = stats(generate(cfg))
    for split, line in zip(SPLITS, out[1:]):
        n_sub = s[split]["bridge"] + s[split]["comparison"]
        assert (
            line == f"OK {tmp_path / split}.jsonl: questions, {s[split]['total']} questions, {n_sub} with sub-queries"
        )
    assert len(out) == 4 and out[0].startswith(f"OK {tmp_path / 'corpus.jsonl'}: corpus, ")


def test_data_check_reports_bad_chains(tmp_path, capsys):
    f = _rows_file(tmp_path, [{}, {"sub_queries": ["A?"], "sub_answers": ["x", "y"]}])
    assert [(p.line, p.field) for p in check_files([str(f)])] == [(2, "sub_answers")]
    assert main_check([str(f)]) == 1
    assert f"{f}:2: sub_answers: 2 sub-answers for 1 sub-queries" in capsys.readouterr().err
