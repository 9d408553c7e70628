"""Schema objects: Corpus lookup, model-facing text, DataError formatting."""

import pickle

import pytest

from ragtune.data import Corpus, DataError, Passage, Question, RAGData, passage_text


def _corpus():
    return Corpus([Passage("a", "Alpha", "first text"), Passage("b", "", "second text")])


def test_corpus_lookup_and_texts():
    c = _corpus()
    assert len(c) == 2 and c[1].id == "b" and c.row("b") == 1 and c.ids == ["a", "b"]
    assert "a" in c and "zz" not in c
    assert c.texts([1, 0]) == ["second text", "Alpha. first text"]
    assert c.texts() == [passage_text(p) for p in c]
    assert c.get("a").title == "Alpha"


def test_corpus_unknown_id_message():
    with pytest.raises(KeyError, match="'nope' is not in the corpus"):
        _corpus().row("nope")


def test_corpus_rejects_duplicate_ids():
    with pytest.raises(DataError) as e:
        Corpus([Passage("a", "", "x"), Passage("a", "", "y")])
    assert e.value.problems[0].line == 2 and "duplicate id 'a'" in str(e.value)


def test_data_error_lists_every_problem():
    err = DataError([("f.jsonl", 3, "answers", "empty list"), ("f.jsonl", 7, "id", "missing")])
    assert str(err).splitlines() == ["f.jsonl:3: answers: empty list", "f.jsonl:7: id: missing"]
    assert str(pickle.loads(pickle.dumps(err))) == str(err)


def test_question_defaults_are_not_shared():
    q1, q2 = Question("1", "q?", ["a"]), Question("2", "q?", ["a"])
    q1.meta["kind"] = "single"
    q1.gold_passage_ids.append("x")
    assert q2.meta == {} and q2.gold_passage_ids == []


def test_ragdata_split():
    d = RAGData(_corpus(), [Question("1", "q?", ["a"])], [], [])
    assert d.split("train")[0].id == "1"
    with pytest.raises(KeyError):
        d.split("validation")
