"""A dev/test question that also occurs in train (same id, or same text) is a data error."""

import json

import pytest

from ragtune import run
from ragtune.data import DataError
from ragtune.data.schema import Question
from ragtune.data.validate import split_overlap

from helpers import tiny_cfg


def _q(i, text):
    return Question(id=i, question=text, answers=["x"])


def test_split_overlap_by_id_and_by_text():
    splits = {
        "train": [_q("a", "Who is  Ann?"), _q("b", "Where?")],
        "dev": [_q("c", "fine"), _q("a", "other text")],
        "test": [_q("d", "who is ann?"), _q("e", "new")],
    }
    probs = split_overlap(splits, {"dev": "dev.jsonl"})
    assert [(p[0], p[1], p[2]) for p in probs] == [("dev.jsonl", 2, "id"), ("test", 1, "question")]
    assert split_overlap({"train": splits["train"], "dev": [_q("z", "unique")]}) == []


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("allow", [False, True])
def test_load_data_refuses_a_leak_unless_allowed(tmp_path, allow):
    _write(tmp_path / "corpus.jsonl", [{"id": "p1", "text": "Ann was born in Oslo."}])
    row = {"id": "q1", "question": "Where was Ann born?", "answers": ["Oslo"], "gold_passage_ids": ["p1"]}
    _write(tmp_path / "train.jsonl", [row])
    _write(tmp_path / "dev.jsonl", [{**row, "id": "q2", "question": "Who?"}])
    _write(tmp_path / "test.jsonl", [{**row, "id": "q3", "question": " where was ann BORN? "}])
    cfg = tiny_cfg(tmp_path / "run", "data.source=files", f"data.dir={tmp_path}", f"data.allow_split_overlap={allow}")
    if allow:
        assert len(run.load_data(cfg.data).test) == 1
    else:
        with pytest.raises(DataError, match=r"test\.jsonl:1: question"):
            run.load_data(cfg.data)


def test_data_check_reports_a_leak(tmp_path, capsys):
    from ragtune import cli

    row = {"id": "q1", "question": "Where was Ann born?", "answers": ["Oslo"]}
    _write(tmp_path / "train.jsonl", [row])
    _write(tmp_path / "test.jsonl", [{**row, "id": "t1", "question": "Who?"}, {**row, "id": "t2"}])
    assert cli.main(["data", "check", str(tmp_path / "train.jsonl"), str(tmp_path / "test.jsonl")]) == 1
    assert "test.jsonl:2: question: question text of 't2' is also in the train split" in capsys.readouterr().err
