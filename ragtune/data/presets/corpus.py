"""The retrieval corpus of the presets (`data.corpus_path`): the encodings of the wiki-18 DPR corpus.

What: the December 2018 Wikipedia split into 21M disjoint 100-word passages (Karpukhin et al.
2020, "Dense Passage Retrieval for Open-Domain Question Answering", EMNLP, arXiv 2004.04906)
circulates in three encodings that hold the same passages:

  dpr_tsv          DPR's psgs_w100.tsv: a header `id<TAB>text<TAB>title`, one passage a row,
                   csv-quoted text ("" inside quotes)
  contents         FlashRAG's wiki18_100w.jsonl: {"id", "contents": "Title\\ntext"}
  contents_quoted  Search-R1's wiki-18.jsonl: {"id", "contents": "\\"Title\\"\\ntext"}

plus ragtune's own corpus layout, `title_text` ({"id", "title", "text"} jsonl, what `ragtune data
synth` writes).  Any of them may be gzip-compressed (a `.gz` suffix).

The encoding is detected from the file (the suffix, then the first record) and every row must
agree with it: a file that mixes encodings, or whose rows are in none, is rejected with the file,
line and field of each bad row.  The one ambiguity: a `contents` title that itself begins and ends
with a double quote reads like the quoted encoding.  The first record decides; in a quoted file
every title must be quoted, and in a plain file a quoted-looking title is kept verbatim (and
counted in the provenance as `quoted_looking_titles`).

Why it matters: the same questions scored against two encodings of "the same" corpus give
different numbers (a title in quotes changes every passage the models read), and corpus mismatch
is the commonest reason a RAG number cannot be reproduced, so the encoding used goes into
result.json (`data.corpus`).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

from ..schema import Corpus, DataError, Passage, Problem

ENCODINGS = {
    "dpr_tsv": "tsv id/text/title with a header (DPR psgs_w100.tsv)",
    "contents": 'jsonl {"id", "contents": "title\\ntext"} (FlashRAG wiki18_100w)',
    "contents_quoted": 'jsonl {"id", "contents": "\\"title\\"\\ntext"} (Search-R1 wiki-18)',
    "title_text": 'jsonl {"id", "title", "text"} (ragtune corpus layout)',
}
SUFFIXES = (".tsv", ".jsonl", ".tsv.gz", ".jsonl.gz")
_HEAD_BYTES = 1 << 20


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return next((s for s in sorted(SUFFIXES, key=len, reverse=True) if name.endswith(s)), path.suffix.lower())


def _open_text(path: Path):
    raw = gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")
    return io.TextIOWrapper(raw, encoding="utf-8", newline="")


def _is_quoted(title_line: str) -> bool:
    return len(title_line) >= 2 and title_line.startswith('"') and title_line.endswith('"')


def _id(v, where, key, problems) -> Optional[str]:
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    if isinstance(v, str) and v.strip():
        return v
    what = "missing required field" if v is None else f"expected a non-empty string or an int, got {v!r}"
    problems.append(Problem(*where, key, what))
    return None


def _tsv(path: Path, file: str, problems: list, info: dict) -> Iterator[Tuple[int, Passage]]:
    csv.field_size_limit(2**31 - 1)
    with _open_text(path) as f:
        reader = csv.reader(f, delimiter="\t")
        try:
            header = next(reader)
        except StopIteration:
            return
        except (csv.Error, UnicodeDecodeError) as e:
            problems.append(Problem(file, 1, "<header>", f"unreadable: {e}"))
            return
        cols = {name.strip().lower(): i for i, name in enumerate(header)}
        if not {"id", "text", "title"} <= set(cols):
            problems.append(
                Problem(
                    file,
                    1,
                    "<header>",
                    f"unknown tsv encoding: expected a header with id, text and title columns "
                    f"(DPR psgs_w100.tsv), got {header[:5]!r}",
                )
            )
            return
        info["encoding"] = "dpr_tsv"
        i_id, i_text, i_title = cols["id"], cols["text"], cols["title"]
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except (csv.Error, UnicodeDecodeError) as e:
                problems.append(Problem(file, reader.line_num, "<row>", f"unreadable tsv row: {e}"))
                return
            where = (file, reader.line_num)
            if not row or row == [""]:
                continue
            if len(row) != len(header):
                problems.append(Problem(*where, "<row>", f"{len(row)} columns, the header has {len(header)}"))
                continue
            pid = _id(row[i_id], where, "id", problems)
            text = row[i_text]
            if not text.strip():
                problems.append(Problem(*where, "text", "empty string"))
                continue
            if pid is not None:
                yield where[1], Passage(pid, row[i_title], text)


def _jsonl(path: Path, file: str, problems: list, info: dict) -> Iterator[Tuple[int, Passage]]:
    first: Optional[Tuple[str, int]] = None  # (encoding, line) of the first good record
    quoted_looking = 0
    with _open_text(path) as f:
        line_no = 0
        while True:
            try:
                raw = f.readline()
            except UnicodeDecodeError as e:
                problems.append(Problem(file, line_no + 1, "<text>", f"not UTF-8: {e.reason}"))
                return
            if not raw:
                break
            line_no += 1
            if not raw.strip():
                continue
            where = (file, line_no)
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError as e:
                problems.append(Problem(*where, "<json>", f"malformed JSON line: {e.msg}"))
                continue
            if not isinstance(rec, dict):
                problems.append(Problem(*where, "<row>", f"expected an object, got {type(rec).__name__}"))
                continue
            if "contents" in rec:
                contents = rec["contents"]
                if not isinstance(contents, str):
                    problems.append(Problem(*where, "contents", f"expected a string, got {type(contents).__name__}"))
                    continue
                if "\n" not in contents:
                    problems.append(
                        Problem(
                            *where, "contents", 'unknown encoding: no newline between title and text ("title\\ntext")'
                        )
                    )
                    continue
                title, text = contents.split("\n", 1)
                enc = "contents_quoted" if _is_quoted(title) else "contents"
            elif "text" in rec:
                enc = "title_text"
                title, text = rec.get("title") or "", rec["text"]
                if not isinstance(title, str) or not isinstance(text, str):
                    problems.append(Problem(*where, "title/text", "expected strings"))
                    continue
            else:
                problems.append(
                    Problem(
                        *where,
                        "<row>",
                        f"unknown encoding: neither 'contents' nor 'text' (keys: {sorted(rec)[:6]}); "
                        f"expected one of {', '.join(ENCODINGS)}",
                    )
                )
                continue
            if first is None:
                first = (enc, line_no)
                info["encoding"] = enc
            elif enc != first[0]:
                if (
                    first[0] == "contents" and enc == "contents_quoted"
                ):  # a title that happens to look quoted: kept as it is
                    quoted_looking += 1
                    enc = "contents"
                else:
                    problems.append(
                        Problem(
                            *where,
                            "contents" if "contents" in rec else "<row>",
                            f"mixed corpus encodings: this row is {enc}, line {first[1]} was {first[0]}",
                        )
                    )
                    continue
            if enc == "contents_quoted":
                title = title[1:-1]
            if not text.strip():
                problems.append(Problem(*where, "contents" if "contents" in rec else "text", "empty passage text"))
                continue
            pid = _id(rec.get("id"), where, "id", problems)
            if pid is not None:
                yield line_no, Passage(pid, title, text)
    if quoted_looking:
        info["quoted_looking_titles"] = quoted_looking


def detect_encoding(path) -> str:
    """The encoding of a corpus file (reads it whole: every row must agree); DataError otherwise."""
    return read_corpus(path)[1]["encoding"]


def read_corpus(path) -> Tuple[Corpus, Dict[str, object]]:
    """(Corpus, info) from a corpus file in any of ENCODINGS; info records the encoding, its
    description, the passage count, the file size and a sha256 of its first MiB (a cheap
    fingerprint: two copies of wiki-18 that differ there are different corpora)."""
    path = Path(os.path.expanduser(str(path)))
    file = str(path)
    if not path.is_file():
        raise DataError([Problem(file, 0, "<file>", "corpus file not found")])
    suffix = _suffix(path)
    if suffix not in SUFFIXES:
        raise DataError(
            [Problem(file, 0, "<file>", f"unsupported corpus format {suffix!r}; expected one of {', '.join(SUFFIXES)}")]
        )
    problems: List[Problem] = []
    info: Dict[str, object] = {"path": file}
    rows = _tsv if suffix.startswith(".tsv") else _jsonl
    passages, seen = [], {}
    try:
        for line, p in rows(path, file, problems, info):
            if p.id in seen:
                problems.append(Problem(file, line, "id", f"duplicate id {p.id!r} (first at line {seen[p.id]})"))
                continue
            seen[p.id] = line
            passages.append(p)
    except (OSError, EOFError) as e:  # a truncated gzip stream
        problems.append(Problem(file, 0, "<file>", f"unreadable: {e}"))
    if not passages and not problems:
        problems.append(Problem(file, 0, "<file>", "no passages"))
    if problems:
        raise DataError(problems)
    with open(path, "rb") as f:
        head = hashlib.sha256(f.read(_HEAD_BYTES)).hexdigest()
    enc = info["encoding"]
    info.update(description=ENCODINGS[enc], passages=len(passages), bytes=path.stat().st_size, head_sha256=head)
    return Corpus(passages), info
