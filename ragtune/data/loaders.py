"""Reading and writing corpora / question sets: .jsonl, .json, .parquet, HF datasets.

All readers go through validate.py and raise one DataError listing every bad
row (file, line, field).  Line numbers: physical 1-based line for .jsonl,
1-based record index for .json / .parquet / HF datasets.

Question keys: id, question, answers, gold_passage_ids, candidate_passage_ids,
meta, sub_queries, sub_answers (the last two optional; absent or null = empty,
and save_jsonl leaves them out when empty, so files of datasets without
sub-queries look as they always did).  A field_map can rename any of them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Container, Iterable, Iterator, Mapping

from .schema import Corpus, DataError, Problem, Question, RAGData
from .validate import passages_from_records, questions_from_records

FORMATS = (".jsonl", ".json", ".parquet")


def read_records(path: str | os.PathLike, problems: list) -> Iterator[tuple[int, dict]]:
    """Yield (line, record) for every object in the file; bad rows become problems."""
    path = str(path)
    suffix = Path(path).suffix.lower()
    if not Path(path).is_file():
        problems.append(Problem(path, 0, "<file>", "file not found"))
        return
    if suffix not in FORMATS:
        problems.append(
            Problem(path, 0, "<file>", f"unsupported format {suffix!r}; expected one of {', '.join(FORMATS)}")
        )
        return
    if suffix == ".jsonl":
        yield from _jsonl(path, problems)
        return
    if suffix == ".json":
        raw = Path(path).read_bytes()
        try:
            data = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            line = raw[: e.start].count(b"\n") + 1
            problems.append(Problem(path, line, "<text>", f"not UTF-8 (byte 0x{raw[e.start]:02x})"))
            return
        except json.JSONDecodeError as e:
            problems.append(Problem(path, e.lineno, "<json>", f"malformed JSON: {e.msg}"))
            return
        if not isinstance(data, list):
            problems.append(Problem(path, 0, "<file>", f"expected a JSON list of objects, got {type(data).__name__}"))
            return
        rows: Iterable[Any] = data
    elif suffix == ".parquet":
        rows = _parquet(path)
    yield from _objects(path, rows, problems)


def _jsonl(path: str, problems: list) -> Iterator[tuple[int, dict]]:
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                problems.append(Problem(path, line_no, "<text>", f"not UTF-8 (byte 0x{raw[e.start]:02x})"))
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(Problem(path, line_no, "<json>", f"malformed JSON line: {e.msg}"))
                continue
            if not isinstance(obj, dict):
                problems.append(Problem(path, line_no, "<row>", f"expected an object, got {type(obj).__name__}"))
                continue
            yield line_no, obj


def _parquet(path: str) -> Iterator[dict]:
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(path).iter_batches(batch_size=65536):
        yield from batch.to_pylist()


def _objects(file: str, rows: Iterable[Any], problems: list) -> Iterator[tuple[int, dict]]:
    for i, obj in enumerate(rows, 1):
        if isinstance(obj, dict):
            yield i, obj
        else:
            problems.append(Problem(file, i, "<row>", f"expected an object, got {type(obj).__name__}"))


def _finish(result: list, file: str, problems: list, allow_empty: bool = False):
    if not result and not problems and not allow_empty:
        problems.append(Problem(file, 0, "<file>", "no records"))
    if problems:
        raise DataError(problems)
    return result


def load_passages(path, field_map: Mapping[str, str] | None = None) -> Corpus:
    problems: list = []
    ps = passages_from_records(read_records(path, problems), str(path), field_map, problems)
    return Corpus(_finish(ps, str(path), problems))


def load_questions(
    path, corpus: Container[str] | None = None, field_map: Mapping[str, str] | None = None, allow_empty: bool = False
) -> list[Question]:
    """corpus: a Corpus (or any id container) to check gold/candidate ids against."""
    problems: list = []
    qs = questions_from_records(read_records(path, problems), str(path), field_map, corpus, problems)
    return _finish(qs, str(path), problems, allow_empty)


def load_hf(
    name_or_path: str,
    split: str = "train",
    kind: str = "questions",
    field_map: Mapping[str, str] | None = None,
    corpus: Container[str] | None = None,
    **load_kwargs,
):
    """Load a Hugging Face dataset (hub name, or a save_to_disk folder when the path
    exists) as a Corpus (kind="passages") or a list of Questions (kind="questions")."""
    if kind not in ("passages", "corpus", "questions"):
        raise ValueError(f"kind must be 'passages' or 'questions', got {kind!r}")
    import datasets

    if os.path.exists(name_or_path):
        ds = datasets.load_from_disk(name_or_path)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"{name_or_path}: no split {split!r}; has {list(ds)}")
            ds = ds[split]
    else:  # hub download: users' own hubs; never used by the test suite
        ds = datasets.load_dataset(name_or_path, split=split, **load_kwargs)
    file = f"{name_or_path}[{split}]"
    problems: list = []
    records = _objects(file, iter(ds), problems)
    if kind == "questions":
        return _finish(questions_from_records(records, file, field_map, corpus, problems), file, problems)
    return Corpus(_finish(passages_from_records(records, file, field_map, problems), file, problems))


# optional Question fields that save_jsonl writes only when non-empty
_OMIT_WHEN_EMPTY = ("sub_queries", "sub_answers")


def _as_dict(row) -> dict:
    if dataclasses.is_dataclass(row) and not isinstance(row, type):
        d = dataclasses.asdict(row)
        if isinstance(row, Question):
            for k in _OMIT_WHEN_EMPTY:
                if not d[k]:
                    del d[k]
        return d
    if isinstance(row, dict):
        return row
    raise TypeError(f"cannot save {type(row).__name__}; expected a dataclass or dict")


def save_jsonl(path, rows: Iterable) -> int:
    """Write Passages / Questions (or dicts) one JSON object per line; returns count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(_as_dict(row), ensure_ascii=False) + "\n")
            n += 1
    return n


def load_rag_dir(path) -> RAGData:
    """Load corpus.jsonl + train/dev/test.jsonl from a folder (as written by synth)."""
    path = Path(path)
    corpus = load_passages(path / "corpus.jsonl")
    problems, splits = [], {}
    for name in ("train", "dev", "test"):
        try:
            splits[name] = load_questions(path / f"{name}.jsonl", corpus, allow_empty=True)
        except DataError as e:
            problems.extend(e.problems)
    if problems:
        raise DataError(problems)
    return RAGData(corpus, **splits)
