"""Row validation: turn raw records (dicts) into Passages / Questions.

Every bad row is reported as a Problem(file, line, field, message); nothing is
ever silently fixed.  The file readers (loaders.py) and `ragtune data check`
share these functions so both apply exactly the same rules.
"""

from __future__ import annotations

from typing import Container, Iterable, Mapping, Sequence

from .schema import Passage, Problem, Question

PASSAGE_FIELDS = ("id", "title", "text")
QUESTION_FIELDS = (
    "id",
    "question",
    "answers",
    "gold_passage_ids",
    "candidate_passage_ids",
    "meta",
    "sub_queries",
    "sub_answers",
)


def check_field_map(field_map: Mapping[str, str] | None) -> dict:
    """One map may serve both corpus and questions; keys naming no field are an error."""
    fm = dict(field_map or {})
    allowed = dict.fromkeys(PASSAGE_FIELDS + QUESTION_FIELDS)
    unknown = sorted(set(fm) - set(allowed))
    if unknown:
        raise ValueError(f"field_map keys {unknown} are not fields; expected some of {list(allowed)}")
    return fm


def _get(rec: dict, fm: dict, name: str):
    key = fm.get(name, name)
    return key, rec.get(key)


def _string(rec, fm, name, where, problems, required=True):
    key, v = _get(rec, fm, name)
    if v is None:
        if required:
            problems.append(Problem(*where, key, "missing required field"))
        return None
    if not isinstance(v, str):
        problems.append(Problem(*where, key, f"expected a string, got {type(v).__name__}"))
        return None
    if required and not v.strip():
        problems.append(Problem(*where, key, "empty string"))
        return None
    return v


def _string_list(rec, fm, name, where, problems, required):
    key, v = _get(rec, fm, name)
    if v is None:
        if required:
            problems.append(Problem(*where, key, "missing required field"))
        return None if required else []
    if not isinstance(v, (list, tuple)):
        problems.append(Problem(*where, key, f"expected a list of strings, got {type(v).__name__}"))
        return None
    bad = False
    for i, x in enumerate(v):
        if not isinstance(x, str):
            problems.append(Problem(*where, key, f"item {i} is {type(x).__name__}, expected a string"))
            bad = True
        elif not x.strip():
            problems.append(Problem(*where, key, f"item {i} is an empty string"))
            bad = True
    if required and not v:
        problems.append(Problem(*where, key, "empty list"))
        bad = True
    return None if bad else list(v)


def passages_from_records(
    records: Iterable[tuple[int, dict]], file: str, field_map: Mapping[str, str] | None, problems: list
) -> list[Passage]:
    """records: (line, dict) pairs. Appends problems; returns the valid passages."""
    fm = check_field_map(field_map)
    out, seen = [], {}
    for line, rec in records:
        where = (file, line)
        n = len(problems)
        pid = _string(rec, fm, "id", where, problems)
        title = _string(rec, fm, "title", where, problems, required=False)
        text = _string(rec, fm, "text", where, problems)
        if pid is not None:
            if pid in seen:
                problems.append(
                    Problem(file, line, fm.get("id", "id"), f"duplicate id {pid!r} (first at line {seen[pid]})")
                )
            else:
                seen[pid] = line
        if len(problems) == n:
            out.append(Passage(pid, title or "", text))
    return out


def questions_from_records(
    records: Iterable[tuple[int, dict]],
    file: str,
    field_map: Mapping[str, str] | None,
    known_ids: Container[str] | None,
    problems: list,
) -> list[Question]:
    """Like passages_from_records; known_ids (e.g. a Corpus) enables id checks."""
    fm = check_field_map(field_map)
    out, seen = [], {}
    for line, rec in records:
        where = (file, line)
        n = len(problems)
        qid = _string(rec, fm, "id", where, problems)
        text = _string(rec, fm, "question", where, problems)
        answers = _string_list(rec, fm, "answers", where, problems, required=True)
        ids = {}
        for name in ("gold_passage_ids", "candidate_passage_ids"):
            ids[name] = _string_list(rec, fm, name, where, problems, required=False)
            key = fm.get(name, name)
            if ids[name] and known_ids is not None:
                for pid in ids[name]:
                    if pid not in known_ids:
                        problems.append(Problem(file, line, key, f"unknown passage id {pid!r} (not in corpus)"))
            if ids[name] and len(set(ids[name])) != len(ids[name]):
                problems.append(Problem(file, line, key, "repeated passage id"))
        subs = _sub_chain(rec, fm, where, ids["gold_passage_ids"], problems)
        mkey, meta = _get(rec, fm, "meta")
        if meta is not None and not isinstance(meta, dict):
            problems.append(Problem(file, line, mkey, f"expected an object, got {type(meta).__name__}"))
        if qid is not None:
            if qid in seen:
                problems.append(
                    Problem(file, line, fm.get("id", "id"), f"duplicate id {qid!r} (first at line {seen[qid]})")
                )
            else:
                seen[qid] = line
        if len(problems) == n:
            out.append(
                Question(
                    qid,
                    text,
                    answers,
                    ids["gold_passage_ids"],
                    ids["candidate_passage_ids"],
                    dict(meta or {}),
                    *subs,
                )
            )
    return out


def _sub_chain(rec, fm, where, gold, problems) -> tuple[list, list]:
    """sub_queries / sub_answers: optional lists of non-empty strings (absent, null or
    [] = none); sub_answers only alongside sub_queries and of the same length;
    at most one sub-query per gold passage when gold ids are given."""
    queries = _string_list(rec, fm, "sub_queries", where, problems, required=False)
    answers = _string_list(rec, fm, "sub_answers", where, problems, required=False)
    qkey, akey = fm.get("sub_queries", "sub_queries"), fm.get("sub_answers", "sub_answers")
    if queries and gold and len(queries) > len(gold):
        problems.append(
            Problem(
                *where,
                qkey,
                f"{len(queries)} sub-queries but only {len(gold)} gold passages (sub_queries[i] finds gold[i])",
            )
        )
    if answers and queries == []:
        problems.append(Problem(*where, akey, f"sub-answers given without sub-queries (in '{qkey}')"))
    elif answers and queries and len(answers) != len(queries):
        problems.append(
            Problem(*where, akey, f"{len(answers)} sub-answers for {len(queries)} sub-queries; lengths must match")
        )
    return queries or [], answers or []


def split_overlap(splits: Mapping[str, Sequence[Question]], names: Mapping[str, str] | None = None) -> list:
    """Problems for questions of dev/test that also occur in train (same id, or the same
    normalised question text): a leak that inflates scores. `names` maps split -> file name."""
    names = dict(names or {})
    train = splits.get("train") or []
    ids = {q.id for q in train}
    texts = {" ".join(q.question.lower().split()) for q in train}
    problems = []
    for split in ("dev", "test"):
        for i, q in enumerate(splits.get(split) or [], start=1):
            where = names.get(split, split)
            if q.id in ids:
                problems.append((where, i, "id", f"question id {q.id!r} is also in the train split"))
            elif " ".join(q.question.lower().split()) in texts:
                problems.append((where, i, "question", f"question text of {q.id!r} is also in the train split"))
    return problems
