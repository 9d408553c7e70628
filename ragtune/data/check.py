"""`ragtune data check FILE...`: validate corpus and question files, report everything.

Each file is classified as a corpus (records have `text` and no `question`) or a
question set. A question of a file whose name does not contain "train" that is also in one that
does (same id or question text) is reported as a leak.  Question files are checked against the ids of every corpus given
(as a FILE or via corpus_path).  All files are checked even after failures.
The OK line of a question file also says how many of its questions carry
sub-queries (the per-hop chain multi-step strategies train on).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from .loaders import read_records
from .schema import Problem
from .validate import passages_from_records, questions_from_records, split_overlap


def _read(path: str) -> tuple[list, list]:
    problems: list = []
    try:
        records = list(read_records(path, problems))
    except (OSError, ValueError) as e:
        problems.append(Problem(path, 0, "<file>", str(e)))
        records = []
    return records, problems


def _kind(records: list) -> str | None:
    for _, rec in records[:1]:
        if "question" in rec:
            return "questions"
        if "text" in rec:
            return "corpus"
    return None


def _check(paths: Sequence[str], corpus_path: str | None = None) -> list[tuple]:
    """Returns (path, kind, n_valid, n_with_sub_queries, problems) per file, corpus_path first."""
    files = [str(corpus_path)] if corpus_path else []
    files += [str(p) for p in paths if str(p) not in files]
    read = {p: _read(p) for p in files}
    kinds = {p: ("corpus" if p == corpus_path else _kind(read[p][0])) for p in files}
    known: set | None = None
    results = {}
    for p in files:
        if kinds[p] != "corpus":
            continue
        records, problems = read[p]
        ps = passages_from_records(records, p, None, problems)
        known = (known or set()) | {r.get("id") for _, r in records if isinstance(r.get("id"), str)}
        results[p] = (p, "corpus", len(ps), 0, problems)
    questions = {}
    for p in files:
        records, problems = read[p]
        if kinds[p] == "questions":
            qs = questions_from_records(records, p, None, known, problems)
            questions[p] = qs
            results[p] = (p, "questions", len(qs), sum(bool(q.sub_queries) for q in qs), problems)
        elif kinds[p] is None:
            if records:
                problems.append(
                    Problem(
                        p,
                        records[0][0],
                        "<row>",
                        "cannot tell corpus from questions: first record has neither 'text' nor 'question'",
                    )
                )
            elif not problems:
                problems.append(Problem(p, 0, "<file>", "no records"))
            results[p] = (p, None, 0, 0, problems)
    # a question of a dev/test file that is also in a train file (same id or text) is a leak
    train = [q for p, qs in questions.items() if "train" in Path(p).name for q in qs]
    for p, qs in questions.items():
        if train and "train" not in Path(p).name:
            results[p][-1].extend(Problem(*pr) for pr in split_overlap({"train": train, "dev": qs}, {"dev": p}))
    for *_, problems in results.values():
        problems.sort(key=lambda pr: pr.line)  # parse errors were found first
    return [results[p] for p in files]


def check_files(paths: Sequence[str], corpus_path: str | None = None) -> list[Problem]:
    """Every problem in every file (question ids checked against the corpora given)."""
    return [pr for *_, problems in _check(paths, corpus_path) for pr in problems]


def main_check(paths: Sequence[str], corpus_path: str | None = None) -> int:
    """Print problems to stderr (exit code 1) or one OK line per file (exit code 0)."""
    if not paths and not corpus_path:
        print("ragtune data check: no files given", file=sys.stderr)
        return 1
    bad = False
    for path, kind, n, n_sub, problems in _check(paths, corpus_path):
        for pr in problems:
            print(pr, file=sys.stderr)
        if problems:
            bad = True
        elif kind == "corpus":
            print(f"OK {path}: corpus, {n} passages")
        else:
            print(f"OK {path}: questions, {n} questions, {n_sub} with sub-queries")
    return 1 if bad else 0
