"""`ragtune data check`: classify files, report every problem in every file, exit codes."""

import json

from ragtune.data import check_files, main_check


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def _files(tmp_path):
    corpus = _write(
        tmp_path / "corpus.jsonl", [{"id": "p1", "title": "T", "text": "x"}, {"id": "p2", "title": "U", "text": "y"}]
    )
    good = _write(
        tmp_path / "good.jsonl", [{"id": "q1", "question": "Q?", "answers": ["a"], "gold_passage_ids": ["p1"]}]
    )
    bad = _write(
        tmp_path / "bad.jsonl",
        [
            {"id": "q1", "question": "Q?", "answers": ["a"], "gold_passage_ids": ["p3"]},
            {"id": "q2", "question": "Q?", "answers": "a"},
            "{oops",
        ],
    )
    return corpus, good, bad


def test_check_files_reports_all_files_and_rows(tmp_path):
    corpus, good, bad = _files(tmp_path)
    bad_corpus = _write(tmp_path / "c2.jsonl", [{"id": "p9", "text": ""}])
    probs = check_files([bad, good, corpus, bad_corpus])
    got = sorted((p.file, p.line, p.field) for p in probs)
    assert got == sorted(
        [(bad, 1, "gold_passage_ids"), (bad, 2, "answers"), (bad, 3, "<json>"), (bad_corpus, 1, "text")]
    )


def test_gold_ids_checked_against_corpus_path(tmp_path):
    corpus, good, bad = _files(tmp_path)
    assert check_files([good], corpus_path=corpus) == []
    assert [p.line for p in check_files([bad], corpus_path=corpus)] == [1, 2, 3]
    assert check_files([bad]) and not any(p.field == "gold_passage_ids" for p in check_files([bad]))


def test_unclassifiable_and_missing_files(tmp_path):
    odd = _write(tmp_path / "odd.jsonl", [{"foo": 1}])
    probs = check_files([odd, str(tmp_path / "missing.jsonl")])
    assert [(p.line, p.field) for p in probs] == [(1, "<row>"), (0, "<file>")]


def test_main_check_exit_codes(tmp_path, capsys):
    corpus, good, bad = _files(tmp_path)
    assert main_check([corpus, good]) == 0
    out = capsys.readouterr()
    assert out.out.splitlines() == [
        f"OK {corpus}: corpus, 2 passages",
        f"OK {good}: questions, 1 questions, 0 with sub-queries",
    ]
    assert main_check([corpus, bad]) == 1
    err = capsys.readouterr().err.splitlines()
    assert f"{bad}:2: answers: expected a list of strings, got str" in err and len(err) == 3
    assert main_check([]) == 1
