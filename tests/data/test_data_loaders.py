"""Loaders: every bad row reported with file/line/field; json, parquet, HF round-trips."""

import json

import pytest

from ragtune.data import DataError, Passage, Question, load_hf, load_passages, load_questions, save_jsonl


def _lines(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def corpus(tmp_path):
    ps = [Passage(f"p{i}", f"T{i}", f"text {i}") for i in range(4)]
    save_jsonl(tmp_path / "corpus.jsonl", ps)
    return load_passages(tmp_path / "corpus.jsonl")


GOOD_Q = {"id": "q1", "question": "Who?", "answers": ["x"], "gold_passage_ids": ["p0"]}


def _problems(fn, *args, **kw):
    with pytest.raises(DataError) as e:
        fn(*args, **kw)
    return [(p.line, p.field, p.message) for p in e.value.problems], e.value


def test_every_bad_question_row_is_reported(tmp_path, corpus):
    f = _lines(
        tmp_path / "q.jsonl",
        [
            GOOD_Q,  # line 1 ok
            {"id": "q2", "question": "", "answers": ["x"]},  # 2 empty question
            {"id": "q3", "question": "Why?", "answers": []},  # 3 empty answers
            {"id": "q4", "question": "Why?"},  # 4 missing answers
            {"id": "q5", "question": "Why?", "answers": "x"},  # 5 bare string
            {"id": "q6", "question": "Why?", "answers": ["x", 3]},  # 6 non-string item
            "{not json",  # 7 malformed line
            {"id": "q1", "question": "Again?", "answers": ["y"]},  # 8 duplicate id
            {"id": "q9", "question": "W?", "answers": ["x"], "gold_passage_ids": ["p0", "zz"]},
            {"question": "no id", "answers": ["x"]},  # 10 missing id
            {"id": 11, "question": "W?", "answers": ["x"]},  # 11 non-string id
        ],
    )
    probs, err = _problems(load_questions, f, corpus)
    by_line = {line: (field, msg) for line, field, msg in probs}
    assert sorted(by_line) == [2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    assert by_line[2] == ("question", "empty string")
    assert by_line[3] == ("answers", "empty list")
    assert by_line[4] == ("answers", "missing required field")
    assert by_line[5][0] == "answers" and "list of strings" in by_line[5][1]
    assert by_line[6][0] == "answers" and "item 1" in by_line[6][1]
    assert by_line[7][0] == "<json>" and "malformed" in by_line[7][1]
    assert by_line[8] == ("id", "duplicate id 'q1' (first at line 1)")
    assert by_line[9][0] == "gold_passage_ids" and "'zz'" in by_line[9][1]
    assert by_line[10] == ("id", "missing required field")
    assert by_line[11][0] == "id" and "expected a string" in by_line[11][1]
    assert all(p.file == str(f) for p in err.problems)
    assert f"{f}:9: gold_passage_ids: unknown passage id 'zz'" in str(err)


def test_unknown_candidate_id_only_checked_with_corpus(tmp_path, corpus):
    row = dict(GOOD_Q, candidate_passage_ids=["p0", "p9"])
    f = _lines(tmp_path / "q.jsonl", [row])
    assert load_questions(f)[0].candidate_passage_ids == ["p0", "p9"]
    probs, _ = _problems(load_questions, f, corpus)
    assert probs == [(1, "candidate_passage_ids", "unknown passage id 'p9' (not in corpus)")]


def test_bad_passages_all_reported(tmp_path):
    f = _lines(
        tmp_path / "c.jsonl",
        [
            {"id": "a", "title": "A", "text": "ok"},
            {"id": "b", "title": "B"},  # 2 missing text
            "",  # blank line: skipped, still counted
            {"id": "a", "text": "dup"},  # 4 duplicate
            {"title": "T", "text": "no id"},  # 5 missing id
            {"id": "c", "title": 5, "text": "t"},  # 6 non-string title
            [1, 2],  # 7 not an object
        ],
    )
    probs, _ = _problems(load_passages, f)
    assert [(line, fld) for line, fld, _ in probs] == [(2, "text"), (4, "id"), (5, "id"), (6, "title"), (7, "<row>")]


def test_empty_file_is_an_error(tmp_path):
    probs, _ = _problems(load_passages, _lines(tmp_path / "c.jsonl", []))
    assert probs == [(0, "<file>", "no records")]


def test_json_list_round_trip_and_record_index(tmp_path, corpus):
    f = tmp_path / "q.json"
    f.write_text(json.dumps([GOOD_Q, {"id": "q2", "question": "W?", "answers": []}]))
    probs, _ = _problems(load_questions, f, corpus)
    assert probs == [(2, "answers", "empty list")]
    f.write_text(json.dumps([GOOD_Q]))
    assert load_questions(f, corpus) == [Question("q1", "Who?", ["x"], ["p0"], [], {})]
    f.write_text('{"id": "q1"}')
    probs, _ = _problems(load_questions, f)
    assert probs[0][:2] == (0, "<file>")


def test_parquet_round_trip_and_validation(tmp_path, corpus):
    pd = pytest.importorskip("pandas")
    rows = [
        dict(GOOD_Q, meta={"kind": "single"}),
        {
            "id": "q2",
            "question": "Why?",
            "answers": ["y"],
            "gold_passage_ids": ["p1", "p2"],
            "meta": {"kind": "bridge"},
        },
    ]
    pd.DataFrame(rows).to_parquet(tmp_path / "q.parquet")
    qs = load_questions(tmp_path / "q.parquet", corpus)
    assert [q.gold_passage_ids for q in qs] == [["p0"], ["p1", "p2"]]
    assert qs[1].meta == {"kind": "bridge"} and qs[0].answers == ["x"]
    rows[1]["gold_passage_ids"] = ["p7"]
    rows[0]["question"] = ""
    pd.DataFrame(rows).to_parquet(tmp_path / "bad.parquet")
    probs, _ = _problems(load_questions, tmp_path / "bad.parquet", corpus)
    assert [(line, fld) for line, fld, _ in probs] == [(1, "question"), (2, "gold_passage_ids")]


def test_field_map(tmp_path):
    f = _lines(
        tmp_path / "q.jsonl",
        [{"qid": "1", "query": "Who?", "answer": ["A"]}, {"qid": "2", "query": "Who?", "answer": "B"}],
    )
    fm = {"id": "qid", "question": "query", "answers": "answer"}
    probs, _ = _problems(load_questions, f, field_map=fm)
    assert probs[0][:2] == (2, "answer")  # problem names the file's column
    _lines(f, [{"qid": "1", "query": "Who?", "answer": ["A"]}])
    assert load_questions(f, field_map=fm)[0] == Question("1", "Who?", ["A"])
    with pytest.raises(ValueError, match="not fields"):
        load_questions(f, field_map={"qestion": "query"})
    c = _lines(tmp_path / "c.jsonl", [{"pid": "a", "body": "hello"}])
    shared = {"id": "pid", "text": "body", "question": "query"}  # one map for both kinds
    assert load_passages(c, field_map=shared)[0] == Passage("a", "", "hello")


def test_save_jsonl_round_trip(tmp_path):
    qs = [Question("1", "Q?", ["a", "b"], ["p1"], ["p1", "p2"], {"kind": "bridge"})]
    assert save_jsonl(tmp_path / "sub" / "q.jsonl", qs) == 1
    assert load_questions(tmp_path / "sub" / "q.jsonl") == qs


def test_hf_save_to_disk_round_trip(tmp_path, corpus):
    datasets = pytest.importorskip("datasets")
    rows = [
        dict(GOOD_Q, candidate_passage_ids=["p0", "p1"]),
        {"id": "q2", "question": "W?", "answers": ["y"], "gold_passage_ids": ["p3"], "candidate_passage_ids": []},
    ]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "hfq"))
    qs = load_hf(str(tmp_path / "hfq"), "train", "questions", corpus=corpus)
    assert [q.id for q in qs] == ["q1", "q2"] and qs[0].candidate_passage_ids == ["p0", "p1"]
    datasets.DatasetDict(
        {
            "test": datasets.Dataset.from_list(
                [{"pid": "a", "title": "A", "body": "x"}, {"pid": "a", "title": "B", "body": "y"}]
            )
        }
    ).save_to_disk(str(tmp_path / "hfc"))
    with pytest.raises(DataError) as e:
        load_hf(str(tmp_path / "hfc"), "test", "passages", field_map={"id": "pid", "text": "body"})
    assert str(e.value).startswith(f"{tmp_path / 'hfc'}[test]:2: pid: duplicate id 'a'")
    with pytest.raises(ValueError, match="no split 'train'"):
        load_hf(str(tmp_path / "hfc"), "train", "passages")
