"""Dataset presets: each adapter on a fixture in its dataset's real field layout, the wiki-18
corpus encodings, split carving, bad rows named by file/line/field, config errors, the hub call."""

import gzip
import json

import preset_fixtures as fx
import pytest

from ragtune.config import ConfigError
from ragtune.data import DataError, Question
from ragtune.data.presets import REGISTRY, detect_encoding, load_preset, read_corpus
from ragtune.data.presets.base import join_sentences, paragraph_id
from ragtune.data.presets.splits import carve

from helpers import tiny_cfg


def _cfg(tmp_path, *overrides):
    return tiny_cfg(tmp_path / "run", *overrides)


def _load(tmp_path, *overrides):
    return load_preset(_cfg(tmp_path, *overrides).data)


def _problems(fn, *args):
    with pytest.raises(DataError) as e:
        fn(*args)
    return [(p.file, p.line, p.field, p.message) for p in e.value.problems]


@pytest.fixture
def wiki(tmp_path):
    return fx.wiki_tsv(tmp_path / "psgs_w100.tsv")


# ---- corpus encodings ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make, encoding",
    [
        (lambda d: fx.wiki_tsv(d / "psgs_w100.tsv"), "dpr_tsv"),
        (lambda d: fx.wiki_tsv(d / "psgs_w100.tsv", gz=True), "dpr_tsv"),
        (lambda d: fx.wiki_contents(d / "wiki18_100w.jsonl"), "contents"),
        (lambda d: fx.wiki_contents(d / "wiki-18.jsonl", quoted=True), "contents_quoted"),
        (
            lambda d: fx.jsonl(d / "corpus.jsonl", [{"id": i, "title": t, "text": x} for i, t, x in fx.WIKI]),
            "title_text",
        ),
    ],
)
def test_each_corpus_encoding_gives_the_same_passages(tmp_path, make, encoding):
    path = make(tmp_path)
    corpus, info = read_corpus(path)
    assert info["encoding"] == encoding == detect_encoding(path)
    assert info["passages"] == len(fx.WIKI) and info["path"] == str(path) and len(info["head_sha256"]) == 64
    assert [(p.id, p.title, p.text) for p in corpus] == list(fx.WIKI)  # quotes in the text kept, title unquoted


def test_a_quoted_looking_title_in_a_plain_contents_file_is_kept_and_counted(tmp_path):
    rows = [{"id": "1", "contents": "Heroes\nA song."}, {"id": "2", "contents": '"Weird"\nA title in quotes.'}]
    corpus, info = read_corpus(fx.jsonl(tmp_path / "c.jsonl", rows))
    assert info["encoding"] == "contents" and info["quoted_looking_titles"] == 1
    assert corpus.get("2").title == '"Weird"'


@pytest.mark.parametrize(
    "rows, line, field, words",
    [
        # quoted file, then a plain row: two encodings mixed
        ([{"id": "1", "contents": '"A"\nx'}, {"id": "2", "contents": "B\ny"}], 2, "contents", "mixed corpus encodings"),
        # contents rows, then an id/title/text row
        ([{"id": "1", "contents": "A\nx"}, {"id": "2", "title": "B", "text": "y"}], 2, "<row>", "mixed corpus"),
        ([{"id": "1", "contents": "A\nx"}, {"id": "2", "body": "y"}], 2, "<row>", "unknown encoding"),
        ([{"id": "1", "contents": "no newline here"}], 1, "contents", "unknown encoding"),
        ([{"id": "1", "contents": "A\nx"}, {"id": "1", "contents": "B\ny"}], 2, "id", "duplicate id '1'"),
        ([{"id": "1", "contents": "A\n  "}], 1, "contents", "empty passage text"),
        ([{"contents": "A\nx"}], 1, "id", "missing"),
    ],
)
def test_bad_corpus_rows_name_file_line_and_field(tmp_path, rows, line, field, words):
    path = fx.jsonl(tmp_path / "c.jsonl", rows)
    probs = _problems(read_corpus, path)
    assert any(p[0] == str(path) and p[1] == line and p[2] == field and words in p[3] for p in probs), probs


def test_tsv_corpus_needs_its_header_and_whole_rows(tmp_path):
    p = fx.tsv(tmp_path / "nohdr.tsv", ["1", "some text", "Title"], [["2", "more", "T"]])
    [(file, line, field, msg)] = _problems(read_corpus, p)
    assert (file, line, field) == (str(p), 1, "<header>") and "id, text and title" in msg
    p = fx.tsv(tmp_path / "short.tsv", ["id", "text", "title"], [["1", "text", "T"], ["2", "only two"]])
    assert _problems(read_corpus, p) == [(str(p), 3, "<row>", "2 columns, the header has 3")]
    p = tmp_path / "c.csv"
    p.write_text("id,text,title\n")
    assert "unsupported corpus format" in _problems(read_corpus, p)[0][3]


def test_truncated_gzip_corpus_is_reported(tmp_path):
    p = fx.wiki_tsv(tmp_path / "psgs_w100.tsv", gz=True)
    p.write_bytes(p.read_bytes()[:-20])
    [(file, line, field, msg)] = _problems(read_corpus, p)
    assert file == str(p) and field == "<file>" and "unreadable" in msg


# ---- split carving -----------------------------------------------------------------------------------
def _qs(n, dup=0):
    qs = [Question(f"q{i}", f"Question number {i}?", ["a"]) for i in range(n)]
    qs += [Question(f"d{i}", "  the SAME   question? ", ["a"]) for i in range(dup)]
    return qs


def test_carving_is_deterministic_disjoint_complete_and_order_free():
    qs = _qs(200, dup=5)
    a = carve(qs, [("dev", 0.1), ("train", 0.5)], "test", seed=0)
    assert a == carve(qs, [("dev", 0.1), ("train", 0.5)], "test", seed=0)
    ids = {k: {q.id for q in v} for k, v in a.items()}
    reversed_rows = carve(qs[::-1], [("dev", 0.1), ("train", 0.5)], "test", seed=0)
    assert {k: {q.id for q in v} for k, v in reversed_rows.items()} == ids  # the row order does not matter
    assert not (ids["dev"] & ids["train"]) and not (ids["dev"] & ids["test"]) and not (ids["train"] & ids["test"])
    assert set().union(*ids.values()) == {q.id for q in qs}
    assert 20 <= len(ids["dev"]) <= 25 and 102 <= len(ids["train"]) <= 108  # round(f * n), runs kept whole
    # identical texts (after lower-casing and collapsing spaces) land on one side
    assert sum(bool({f"d{i}" for i in range(5)} & s) for s in ids.values()) == 1
    b = carve(qs, [("dev", 0.1), ("train", 0.5)], "test", seed=1)
    assert {q.id for q in b["dev"]} != ids["dev"]
    # within a part the original order is kept
    assert [q.id for q in a["test"]] == [q.id for q in qs if q.id in ids["test"]]


def test_carving_a_tiny_set_still_gives_each_part_a_question():
    got = carve(_qs(3), [("dev", 0.1), ("train", 0.5)], "test", seed=0)
    assert [len(got[k]) for k in ("dev", "train", "test")] == [1, 1, 1]


# ---- NQ-open --------------------------------------------------------------------------------------------
def test_nq_open_test_is_validation_and_dev_is_carved_from_train(tmp_path, wiki):
    d = fx.nq_folder(tmp_path / "nq")
    data = _load(tmp_path, "data.preset=nq_open", f"data.hf_name={d}", f"data.corpus_path={wiki}")
    assert [(q.id, q.question, q.answers) for q in data.test] == [
        (f"validation-{i}", r["question"], r["answer"]) for i, r in enumerate(fx.NQ_VALIDATION, 1)
    ]
    assert all(q.gold_passage_ids == [] and q.meta["kind"] == "single" for q in data.test)
    assert len(data.dev) == 1 and len(data.train) == 9 and not {q.id for q in data.dev} & {q.id for q in data.train}
    assert {q.id for q in data.train + data.dev} == {f"train-{i}" for i in range(1, 11)}
    assert data.train[1].answers == ["Charles Babbage", "Babbage"]
    prov = data.provenance
    assert prov["preset"] == "nq_open" and prov["source"]["kind"] == "files"
    assert prov["source"]["where"] == str(d.resolve()) and prov["source"]["config"] == "nq_open"
    assert prov["splits"]["test"] == {"from": "validation", "questions": 3, "with_gold": 0, "with_sub_queries": 0}
    assert prov["splits"]["dev"]["from"] == "carved from train"
    assert prov["carving"]["from"] == "train" and prov["carving"]["fractions"] == {"dev": 0.1}
    assert prov["carving"]["seed"] == 0 and prov["carving"]["rows"] == {"dev": 1, "train": 9}
    assert prov["corpus"]["encoding"] == "dpr_tsv" and prov["corpus"]["passages"] == len(fx.WIKI)
    assert prov["warnings"] == []
    json.dumps(prov)  # goes into result.json as it is


def test_bad_nq_rows_are_reported_with_file_line_and_field(tmp_path, wiki):
    d = tmp_path / "nq"
    fx.jsonl(d / "train.jsonl", [*fx.NQ_TRAIN[:2], {"question": "q", "answer": "London"}, "{broken"])
    fx.jsonl(
        d / "validation.jsonl", [{"question": "", "answer": ["x"]}, {"answer": ["x"]}, {"question": "q", "answer": []}]
    )
    probs = _problems(_load, tmp_path, "data.preset=nq_open", f"data.hf_name={d}", f"data.corpus_path={wiki}")
    train, dev = str(d / "train.jsonl"), str(d / "validation.jsonl")
    assert (train, 3, "answer", "expected a list of strings, got str") in probs
    assert any(p[:3] == (train, 4, "<json>") for p in probs)
    assert (dev, 1, "question", "empty string") in probs
    assert (dev, 2, "question", "missing required field") in probs
    assert (dev, 3, "answer", "empty list") in probs


def test_a_lone_file_without_a_split_name_is_the_reported_split(tmp_path, wiki):
    f = fx.jsonl(tmp_path / "nq_open.jsonl", fx.NQ_VALIDATION + fx.NQ_TRAIN)
    data = _load(tmp_path, "data.preset=nq_open", f"data.hf_name={f}", f"data.corpus_path={wiki}")
    assert data.provenance["source"]["notes"] == [
        "nq_open.jsonl: its name names no split; taken as 'validation' (the reported split)"
    ]
    assert data.provenance["splits"]["train"]["from"] == "carved from validation"
    assert len(data.train + data.dev + data.test) == 13 and data.provenance["warnings"]


def test_a_folder_file_without_a_split_name_is_an_error(tmp_path, wiki):
    d = fx.nq_folder(tmp_path / "nq")
    fx.jsonl(d / "extra.jsonl", fx.NQ_TRAIN[:1])
    probs = _problems(_load, tmp_path, "data.preset=nq_open", f"data.hf_name={d}", f"data.corpus_path={wiki}")
    assert probs == [
        (
            str(d / "extra.jsonl"),
            0,
            "<file>",
            "cannot tell which split this file holds: name it with train, dev or test",
        )
    ]


# ---- TriviaQA -------------------------------------------------------------------------------------------
def test_triviaqa_answers_are_the_aliases(tmp_path, wiki):
    d = tmp_path / "tqa"
    fx.jsonl(
        d / "train.jsonl",
        [fx.trivia_row(f"tc_{i}", f"Trivia question {i}?", "London", ["London", "London, England"]) for i in range(5)],
    )
    fx.jsonl(
        d / "validation.jsonl",
        [fx.trivia_row("qb_1", "Who designed the Analytical Engine?", "Babbage", ["Charles Babbage", "Babbage"])],
    )
    data = _load(tmp_path, "data.preset=triviaqa", f"data.hf_name={d}", f"data.corpus_path={wiki}")
    [q] = data.test
    assert (q.id, q.answers, q.meta["question_source"]) == (
        "qb_1",
        ["Charles Babbage", "Babbage"],
        "http://www.triviacountry.com/",
    )
    data = _load(
        tmp_path,
        "data.preset=triviaqa",
        f"data.hf_name={d}",
        f"data.corpus_path={wiki}",
        "data.preset_options.answers=normalized_aliases",
    )
    assert data.test[0].answers == ["charles babbage", "babbage"]
    # the hub's test split hides its answers: an empty alias list is reported, not skipped
    fx.jsonl(d / "validation.jsonl", [fx.trivia_row("qb_2", "Hidden?", "", [])])
    probs = _problems(_load, tmp_path, "data.preset=triviaqa", f"data.hf_name={d}", f"data.corpus_path={wiki}")
    assert probs == [(str(d / "validation.jsonl"), 1, "answer.aliases", "empty list")]


# ---- HotpotQA -----------------------------------------------------------------------------------------
def test_hotpotqa_distractor_builds_its_corpus_from_the_context(tmp_path):
    d = fx.hotpot_folder(tmp_path / "hotpot", n_train=4)
    data = _load(tmp_path, "data.preset=hotpotqa", f"data.hf_name={d}")
    q = next(q for q in data.test if q.id == "5a8b57f25542995d1e6f1371")
    ada = paragraph_id("Ada Lovelace", "Ada Lovelace was a mathematician. She was born in London.")
    engine = paragraph_id(
        "Analytical Engine", "The Analytical Engine was designed by Charles Babbage. Ada wrote for it."
    )
    paris = paragraph_id("Paris", "Paris is the capital of France.")
    assert q.answers == ["Ada Lovelace"] and q.meta == {"kind": "bridge", "level": "medium"}
    assert q.gold_passage_ids == [ada, engine]  # supporting-fact order, each title once
    assert q.candidate_passage_ids == [engine, ada, paris]
    assert data.corpus.get(ada).text == "Ada Lovelace was a mathematician. She was born in London."
    # a paragraph shared by questions is one passage: 6 distinct paragraphs in the fixture
    assert len(data.corpus) == 6 and ada.startswith("Ada Lovelace#")
    assert {q.meta["kind"] for q in data.test} == {"bridge", "comparison"}
    assert len(data.train) + len(data.dev) == 12 and len(data.test) == 3
    prov = data.provenance
    assert prov["corpus"]["encoding"] == "dataset_paragraphs" and prov["source"]["config"] == "distractor"
    assert prov["splits"]["test"]["from"] == "validation" and prov["splits"]["test"]["with_gold"] == 3


def test_hotpotqa_hub_and_original_layouts_agree(tmp_path):
    a = tmp_path / "a"
    fx.jsonl(a / "train.jsonl", [fx.hotpot_hub(r) for r in fx.HOTPOT[:2]])
    fx.jsonl(a / "validation.jsonl", [fx.hotpot_hub(fx.HOTPOT[2])])
    b = tmp_path / "b"
    fx.json_list(b / "hotpot_train_v1.1.json", [fx.hotpot_original(r) for r in fx.HOTPOT[:2]])
    fx.json_list(b / "hotpot_dev_distractor_v1.json", [fx.hotpot_original(fx.HOTPOT[2])])
    da = _load(tmp_path, "data.preset=hotpotqa", f"data.hf_name={a}")
    db = _load(tmp_path, "data.preset=hotpotqa", f"data.hf_name={b}")
    assert da.test == db.test and da.train + da.dev == db.train + db.dev
    assert [p.id for p in da.corpus] == [p.id for p in db.corpus]


def test_hotpotqa_fullwiki_maps_supporting_titles_onto_the_corpus(tmp_path):
    corpus = fx.wiki_contents(tmp_path / "wiki18_100w.jsonl")
    d = tmp_path / "hp"
    fx.jsonl(d / "train.jsonl", [fx.hotpot_hub(fx.HOTPOT[0]), fx.hotpot_hub(fx.HOTPOT[2])])
    fx.jsonl(d / "validation.jsonl", [fx.hotpot_hub(fx.HOTPOT[1])])
    data = _load(
        tmp_path, "data.preset=hotpotqa", "data.hf_config=fullwiki", f"data.hf_name={d}", f"data.corpus_path={corpus}"
    )
    [q] = data.test
    assert q.gold_passage_ids == ["6", "7"] and q.candidate_passage_ids == []  # Mont Blanc, Ben Nevis
    # "Analytical Engine" is not a corpus title: that question has no gold ids, and it is counted
    assert sorted(bool(q.gold_passage_ids) for q in data.train + data.dev) == [False, False]
    assert data.provenance["counts"] == {"without_gold_title_not_in_corpus": 2}
    assert data.provenance["corpus"]["encoding"] == "contents" and len(data.corpus) == len(fx.WIKI)


def test_bad_hotpotqa_rows(tmp_path):
    d = tmp_path / "hp"
    bad_title = fx.hotpot_original(fx.HOTPOT[0]) | {"supporting_facts": [["Nowhere", 0]]}
    bad_type = fx.hotpot_original(fx.HOTPOT[1]) | {"type": "yesno"}
    no_ctx = {k: v for k, v in fx.hotpot_original(fx.HOTPOT[2]).items() if k != "context"}
    fx.json_list(d / "hotpot_dev_distractor_v1.json", [bad_title, bad_type, no_ctx])
    fx.json_list(d / "hotpot_train_v1.1.json", [fx.hotpot_original(fx.HOTPOT[0])])
    probs = _problems(_load, tmp_path, "data.preset=hotpotqa", f"data.hf_name={d}")
    f = str(d / "hotpot_dev_distractor_v1.json")
    assert (f, 1, "supporting_facts", "title 'Nowhere' is not among the context paragraphs") in probs
    assert (f, 2, "type", "'yesno' is not one of bridge, comparison") in probs
    assert (f, 3, "context", "missing required field") in probs


# ---- MuSiQue ---------------------------------------------------------------------------------------------
def test_musique_gold_is_in_hop_order_with_sub_queries(tmp_path):
    d = tmp_path / "musique"
    fx.jsonl(d / "musique_ans_v1.0_train.jsonl", [fx.musique_row(f"2hop__{i}_{i}") for i in range(6)])
    fx.jsonl(d / "musique_ans_v1.0_dev.jsonl", [fx.musique_row(), fx.musique_row("2hop__9_9", answerable=False)])
    data = _load(tmp_path, "data.preset=musique", f"data.hf_name={d}")
    [q] = data.test
    engine = paragraph_id("Analytical Engine", "The Analytical Engine was designed by Charles Babbage.")
    babbage = paragraph_id("Charles Babbage", "Charles Babbage was born in London.")
    assert q.gold_passage_ids == [engine, babbage]  # decomposition order, not paragraph order
    assert q.sub_queries == ["Analytical Engine >> designer", "Where was Charles Babbage born?"]
    assert q.sub_answers == ["Charles Babbage", "London"]
    assert q.answers == ["London", "London, England"] and len(q.candidate_passage_ids) == 4
    assert q.meta == {"kind": "bridge", "hops": 2, "type": "2hop", "answerable": True}
    assert data.provenance["counts"] == {"skipped_unanswerable": 1}
    assert data.provenance["splits"]["test"]["with_sub_queries"] == 1
    data = _load(tmp_path, "data.preset=musique", f"data.hf_name={d}", "data.preset_options.answerable_only=false")
    assert [q.meta["answerable"] for q in data.test] == [True, False]


def test_bad_musique_rows(tmp_path):
    d = tmp_path / "musique"
    bad_idx = fx.musique_row("2hop__a")
    bad_idx["question_decomposition"][1]["paragraph_support_idx"] = 7
    not_marked = fx.musique_row("2hop__b")
    not_marked["paragraphs"][1]["is_supporting"] = False
    bad_ref = fx.musique_row("2hop__c")
    bad_ref["question_decomposition"][0]["question"] = "Who made #2?"
    fx.jsonl(d / "musique_ans_v1.0_dev.jsonl", [bad_idx, not_marked, bad_ref, fx.musique_row("2hop__a")])
    fx.jsonl(d / "musique_ans_v1.0_train.jsonl", [fx.musique_row("2hop__t")])
    probs = _problems(_load, tmp_path, "data.preset=musique", f"data.hf_name={d}")
    f = str(d / "musique_ans_v1.0_dev.jsonl")
    assert (f, 1, "question_decomposition[1].paragraph_support_idx", "7 is no paragraph's idx") in probs
    assert any(p[:3] == (f, 2, "question_decomposition") and "is_supporting" in p[3] for p in probs)
    assert (f, 3, "question_decomposition[0].question", "#2 refers to no earlier step") in probs
    assert len(probs) == 3  # line 4 repeats line 1's id, but line 1 was rejected


# ---- 2WikiMultihopQA ------------------------------------------------------------------------------------
def test_2wiki_gold_from_supporting_titles_and_kinds(tmp_path):
    d = tmp_path / "2wiki"
    fx.json_list(d / "dev.json", fx.TWOWIKI)
    train = [dict(r, _id=f"{r['_id']}-{i}", question=f"{r['question']} {i}") for i in range(3) for r in fx.TWOWIKI]
    fx.json_list(d / "train.json", train)
    data = _load(tmp_path, "data.preset=2wikimultihopqa", f"data.hf_name={d}")
    comp, cmp_ = data.test
    assert comp.gold_passage_ids == [
        paragraph_id("Analytical Engine", "The Analytical Engine was designed by Charles Babbage."),
        paragraph_id("Charles Babbage", "Charles Babbage was an English polymath. He was born in London."),
    ]
    assert comp.meta["kind"] == "bridge" and cmp_.meta["kind"] == "comparison" and cmp_.parallel_hops
    assert comp.meta["evidences"][0] == ["Analytical Engine", "designer", "Charles Babbage"]
    assert cmp_.answers == ["Mont Blanc"] and len(comp.candidate_passage_ids) == 3
    # a hub mirror's {"title": [...], "content": [[...]]} layout reads the same
    hub = [
        dict(
            r,
            context={"title": [t for t, _ in r["context"]], "content": [s for _, s in r["context"]]},
            supporting_facts={
                "title": [t for t, _ in r["supporting_facts"]],
                "sent_id": [i for _, i in r["supporting_facts"]],
            },
        )
        for r in fx.TWOWIKI
    ]
    fx.jsonl(tmp_path / "hub" / "validation.jsonl", hub)
    fx.json_list(tmp_path / "hub" / "train.json", train)
    assert _load(tmp_path, "data.preset=2wikimultihopqa", f"data.hf_name={tmp_path / 'hub'}").test == data.test


# ---- PopQA ------------------------------------------------------------------------------------------------
def test_popqa_answers_are_decoded_from_json_and_splits_are_carved(tmp_path, wiki, capsys):
    f = fx.popqa_tsv(tmp_path / "popqa" / "test.tsv", n=20)
    assert '"[""London""' in f.read_text()  # the tsv really quotes the JSON string
    data = _load(tmp_path, "data.preset=popqa", f"data.hf_name={f}", f"data.corpus_path={wiki}")
    q = (data.train + data.dev + data.test)[0]
    assert q.answers == ["London", "London, England"] and q.id.isdigit()
    assert q.meta["prop"] == "place of birth" and q.meta["s_wiki_title"].startswith("Person")
    assert (len(data.dev), len(data.train), len(data.test)) == (2, 10, 8)
    prov = data.provenance
    assert prov["carving"]["from"] == "test" and prov["carving"]["fractions"] == {"dev": 0.1, "train": 0.5}
    assert prov["splits"]["train"]["from"] == "carved from test"
    assert "one distribution" in prov["warnings"][0] and "not the published one" in prov["warnings"][0]
    assert "warning: data.preset=popqa" in capsys.readouterr().err
    # another seed, another carving; the same seed, the same
    again = _load(tmp_path, "data.preset=popqa", f"data.hf_name={f}", f"data.corpus_path={wiki}")
    other = _load(tmp_path, "data.preset=popqa", f"data.hf_name={f}", f"data.corpus_path={wiki}", "data.carve.seed=3")
    assert [q.id for q in again.test] == [q.id for q in data.test] != [q.id for q in other.test]
    assert other.provenance["carving"]["seed"] == 3


def test_popqa_malformed_json_answers_name_file_line_and_field(tmp_path, wiki):
    f = fx.popqa_tsv(tmp_path / "test.tsv", n=5, bad_line=4)
    [(file, line, field, msg)] = _problems(
        _load, tmp_path, "data.preset=popqa", f"data.hf_name={f}", f"data.corpus_path={wiki}"
    )
    assert (file, line, field) == (str(f), 4, "possible_answers") and "not valid JSON" in msg


# ---- Bamboogle ----------------------------------------------------------------------------------------
def test_bamboogle_reads_capitalised_fields(tmp_path, wiki):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"Question": f"Who was president when invention {i} was made?", "Answer": f"Person {i}"} for i in range(10)]
    f = tmp_path / "bamboogle" / "test.parquet"
    f.parent.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), f)
    data = _load(tmp_path, "data.preset=bamboogle", f"data.hf_name={f}", f"data.corpus_path={wiki}")
    got = sorted((q.id, q.question, q.answers) for q in data.train + data.dev + data.test)
    assert got == sorted((f"test-{i + 1}", r["Question"], [r["Answer"]]) for i, r in enumerate(rows))
    assert all(q.meta["kind"] == "bridge" for q in data.test) and data.provenance["carving"]["from"] == "test"
    g = fx.jsonl(tmp_path / "lower" / "test.jsonl", [{"question": "q?", "answer": "a"}])
    probs = _problems(_load, tmp_path, "data.preset=bamboogle", f"data.hf_name={g}", f"data.corpus_path={wiki}")
    assert probs[0][:3] == (str(g), 1, "Question") and "capitalised" in probs[0][3] and "'question'" in probs[0][3]


# ---- BabiLong -----------------------------------------------------------------------------------------
def _babilong_rows(n, task):
    return [
        {
            "input": f"The sky was grey. Mary moved to the bathroom. It rained {i} times! John went to the hallway.",
            "question": "Where is Mary?",
            "target": "bathroom",
        }
        for i in range(n)
    ]


def test_babilong_haystacks_become_the_questions_passages(tmp_path):
    d = tmp_path / "babilong"
    fx.json_list(d / "qa1" / "0k.json", _babilong_rows(10, "qa1"))
    fx.json_list(d / "qa2" / "0k.json", _babilong_rows(10, "qa2"))
    fx.json_list(d / "qa2" / "4k.json", _babilong_rows(3, "qa2"))  # another length: not read
    data = _load(tmp_path, "data.preset=babilong", f"data.hf_name={d}", "data.preset_options.tasks=[qa1,qa2]")
    qs = data.train + data.dev + data.test
    assert len(qs) == 20 and {q.meta["task"] for q in qs} == {"qa1", "qa2"}
    q = next(q for q in qs if q.id == "0k-qa1-1")
    assert q.answers == ["bathroom"] and q.gold_passage_ids == []
    assert [data.corpus.get(p).text for p in q.candidate_passage_ids] == [
        "The sky was grey.",
        "Mary moved to the bathroom.",
        "It rained 0 times!",
        "John went to the hallway.",
    ]
    assert q.candidate_passage_ids[0] == "0k-qa1-1/0" and len(data.corpus) == 80
    two = _load(tmp_path, "data.preset=babilong", f"data.hf_name={d}", "data.preset_options.sentences_per_passage=2")
    assert len(two.corpus) == 20 and two.provenance["options"] == {"tasks": ["qa1"], "sentences_per_passage": 2}
    with pytest.raises(ConfigError, match=r"data.preset_options.tasks.*qa3"):
        _load(tmp_path, "data.preset=babilong", f"data.hf_name={d}", "data.preset_options.tasks=[qa3]")


# ---- FlashRAG -----------------------------------------------------------------------------------------
def _flash(i, split):
    return {
        "id": f"{split}_{i}",
        "question": f"{split} question {i}?",
        "golden_answers": [f"a{i}", f"b{i}"],
        "metadata": {"type": "bridge"},
    }


def test_flashrag_test_then_dev(tmp_path, wiki):
    d = tmp_path / "nq"
    for split, n in (("train", 6), ("dev", 3), ("test", 2)):
        fx.jsonl(d / f"{split}.jsonl", [_flash(i, split) for i in range(n)])
    data = _load(tmp_path, "data.preset=flashrag", f"data.hf_name={d}", f"data.corpus_path={wiki}")
    assert [q.id for q in data.test] == ["test_0", "test_1"] and [q.id for q in data.dev] == ["dev_0", "dev_1", "dev_2"]
    assert data.test[0].answers == ["a0", "b0"] and data.test[0].meta == {
        "metadata": {"type": "bridge"},
        "kind": "bridge",
    }
    assert data.provenance["carving"] is None
    (d / "test.jsonl").unlink()  # no test: dev is the test split, and dev is carved from train
    data = _load(tmp_path, "data.preset=flashrag", f"data.hf_name={d}", f"data.corpus_path={wiki}")
    assert [q.id for q in data.test] == ["dev_0", "dev_1", "dev_2"] and len(data.dev) == 1
    assert data.provenance["splits"]["dev"]["from"] == "carved from train"


# ---- the hub and save_to_disk ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "preset, hub_id, config, extra",
    [
        ("nq_open", "google-research-datasets/nq_open", "nq_open", []),
        ("triviaqa", "mandarjoshi/trivia_qa", "unfiltered.nocontext", []),
        ("hotpotqa", "hotpotqa/hotpot_qa", "distractor", []),
        ("hotpotqa", "hotpotqa/hotpot_qa", "fullwiki", ["data.hf_config=fullwiki"]),
        ("popqa", "akariasai/PopQA", None, []),
        ("musique", "dgslibisey/MuSiQue", None, []),
        ("2wikimultihopqa", "ohjoonhee/2WikiMultihopQA", None, []),
        ("bamboogle", "chiayewken/bamboogle", None, []),
        ("babilong", "RMT-team/babilong", "0k", []),
        ("flashrag", "RUC-NLPIR/FlashRAG_datasets", "nq", ["data.hf_config=nq"]),
        ("nq_open", "someone/my_nq", "nq_open", ["data.hf_name=someone/my_nq"]),
    ],
)
def test_hub_loading_calls_load_dataset_with_the_id_and_config(
    tmp_path, wiki, monkeypatch, preset, hub_id, config, extra
):
    import datasets

    calls = []

    def fake(path, name=None, **kw):
        calls.append((path, name))
        raise RuntimeError("stop here")

    monkeypatch.setattr(datasets, "load_dataset", fake)
    corpus = [] if preset == "babilong" else [f"data.corpus_path={wiki}"]
    with pytest.raises(RuntimeError, match="stop here"):
        _load(tmp_path, f"data.preset={preset}", *corpus, *extra)
    assert calls == [(hub_id, config)]


def test_hub_rows_go_through_the_adapter(tmp_path, monkeypatch):
    import datasets

    ds = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list([fx.hotpot_hub(r) for r in fx.HOTPOT[:2]]),
            "validation": datasets.Dataset.from_list([fx.hotpot_hub(fx.HOTPOT[2])]),
        }
    )
    monkeypatch.setattr(datasets, "load_dataset", lambda path, name=None, **kw: ds)
    data = _load(tmp_path, "data.preset=hotpotqa")
    assert [q.id for q in data.test] == [fx.HOTPOT[2]["id"]] and len(data.test[0].gold_passage_ids) == 2
    assert data.provenance["source"] == {
        "kind": "hub",
        "where": "hotpotqa/hotpot_qa",
        "config": "distractor",
        "splits": {
            "train": "hotpotqa/hotpot_qa:distractor[train]",
            "validation": "hotpotqa/hotpot_qa:distractor[validation]",
        },
    }
    ds.save_to_disk(str(tmp_path / "saved"))  # a save_to_disk folder reads the same
    saved = _load(tmp_path, "data.preset=hotpotqa", f"data.hf_name={tmp_path / 'saved'}")
    assert saved.test == data.test and saved.provenance["source"]["kind"] == "save_to_disk"


# ---- configuration ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, key, words",
    [
        (["data.preset=nqopen"], "data.preset", "expected one of nq_open, triviaqa, hotpotqa, popqa, musique"),
        (["data.source=preset"], "data.preset", "needs a preset"),
        (["data.preset=nq_open"], "data.corpus_path", "open-domain"),
        (["data.preset=hotpotqa", "data.hf_config=fullwiki"], "data.corpus_path", "fullwiki"),
        (["data.preset=hotpotqa", "data.hf_config=open"], "data.hf_config", "distractor, fullwiki"),
        (["data.preset=flashrag", "data.corpus_path=WIKI"], "data.hf_config", "folder name"),
        (["data.preset=babilong", "data.corpus_path=WIKI"], "data.corpus_path", "does not apply"),
        (["data.preset=nq_open", "data.corpus_path=/nope.tsv"], "data.corpus_path", "not found"),
        (["data.preset=musique", "data.hf_name=./nowhere"], "data.hf_name", "path not found"),
        (["data.preset=musique", "data.source=files"], "data.source", "cannot be combined"),
        (["data.preset=musique", "data.carve.dev_fraction=1.5"], "data.carve.dev_fraction", "(0, 1)"),
        (["data.preset=musique", "data.carve.train_fraction=0.95"], "data.carve.train_fraction", "< 1"),
        (["data.preset=musique", "data.preset_options.hops=2"], "data.preset_options", "hops"),
        (["data.preset=babilong", "data.preset_options.tasks=[foo]"], "data.preset_options.tasks", "qa1"),
    ],
)
def test_config_errors_name_the_key(tmp_path, wiki, overrides, key, words):
    overrides = [o.replace("WIKI", str(wiki)) for o in overrides]
    with pytest.raises(ConfigError) as e:
        _cfg(tmp_path, *overrides)
    assert f"'{key}" in str(e.value) and words in str(e.value), str(e.value)


def test_registry_names_the_issue_presets():
    assert set(REGISTRY) == {
        "nq_open",
        "triviaqa",
        "hotpotqa",
        "popqa",
        "musique",
        "2wikimultihopqa",
        "bamboogle",
        "babilong",
        "flashrag",
    }
    for cls in REGISTRY.values():
        assert cls.paper and cls.hub_id and cls.summary and "arXiv" in cls.paper or "TACL" in cls.paper


def test_shipped_data_configs_validate(tmp_path, wiki):
    from ragtune.config import load_config

    from helpers import ROOT, TINY

    files = sorted((ROOT / "configs" / "data").glob("*.yaml"))
    assert {f.stem for f in files} >= {"nq_open", "hotpotqa"}
    for f in files:
        cfg = load_config(
            [TINY, str(f)],
            ["run_dir=/tmp/unused", f"data.corpus_path={wiki}"]
            if "babilong" not in f.name
            else ["run_dir=/tmp/unused"],
        )
        assert cfg.data.preset in REGISTRY and "ragtune train" in f.read_text()


def test_join_sentences_keeps_hotpotqa_spacing():
    assert join_sentences(["A b.", " C d."]) == "A b. C d."
    assert join_sentences(["A b.", "C d."]) == "A b. C d."


def test_gzip_corpus_roundtrip(tmp_path):
    p = tmp_path / "wiki-18.jsonl.gz"
    p.write_bytes(gzip.compress(fx.wiki_contents(tmp_path / "w.jsonl", quoted=True).read_bytes()))
    assert detect_encoding(p) == "contents_quoted"


def test_musique_with_a_corpus_file_looks_paragraphs_up_by_title(tmp_path):
    rows = [
        {"id": "1", "title": "Analytical Engine", "text": "A mechanical computer."},
        {"id": "2", "title": "Charles Babbage", "text": "An English polymath, born in London."},
        {"id": "3", "title": "Paris", "text": "The capital of France."},
    ]
    corpus = fx.jsonl(tmp_path / "corpus.jsonl", rows)
    d = tmp_path / "musique"
    fx.jsonl(d / "musique_ans_v1.0_train.jsonl", [fx.musique_row(f"2hop__{i}_{i}") for i in range(3)])
    fx.jsonl(d / "musique_ans_v1.0_dev.jsonl", [fx.musique_row()])
    data = _load(tmp_path, "data.preset=musique", f"data.hf_name={d}", f"data.corpus_path={corpus}")
    [q] = data.test
    assert q.gold_passage_ids == ["1", "2"] and q.candidate_passage_ids == ["3", "2", "1"]  # no "Ben Nevis"
    assert data.provenance["corpus"]["encoding"] == "title_text" and len(data.corpus) == 3
