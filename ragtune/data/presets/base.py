"""The common base of the dataset adapters: row field checks, paragraph ids, the Preset class.

What: an adapter (one `Preset` subclass per dataset family) maps one raw row of a dataset, in the
dataset's own field layout, to a `Question`: answers as a list of strings, gold passage ids (in hop
order where the dataset gives it) and candidate ids where the dataset has them.  It also says
which of the dataset's splits is the one the literature reports on (`test_splits`), where dev and
train come from, and whether the rows bring their own paragraphs (HotpotQA distractor, MuSiQue,
2WikiMultihopQA, BabiLong), from which the corpus is built when no `data.corpus_path` is given.

Why: every real dataset spells the same things differently (`answer` vs `answers` vs
`golden_answers` vs a JSON string, `Question` capitalised, supporting facts as titles...), and a
silent guess there is how numbers stop being comparable.  So every field is checked and every bad
row becomes a Problem naming the file, the line and the dataset's own field; nothing is fixed up.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..schema import Corpus, Passage, Problem, Question, RAGData

Where = Tuple[str, int]  # (file, line) of a row
FILE_SUFFIXES = (".json", ".jsonl", ".parquet", ".tsv")  # a dataset's own files
_MISSING = object()


@dataclass
class PresetData(RAGData):
    """RAGData plus where it came from: the `data` entry of result.json."""

    provenance: Dict[str, Any] = field(default_factory=dict)


@dataclass
class NoOptions:
    """A preset without options of its own (`data.preset_options` must then be empty)."""


# ---- row fields ------------------------------------------------------------------------------------
def value(rec: dict, key: str) -> Any:
    """rec[key], following dots into nested objects ("answer.aliases"); _MISSING when absent."""
    cur: Any = rec
    for part in key.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return _MISSING
        cur = cur[part]
    return cur


def present(rec: dict, key: str) -> bool:
    return value(rec, key) is not _MISSING


def need_str(rec: dict, key: str, where: Where, problems: list, hint: str = "") -> Optional[str]:
    """A required non-empty string field; None (and a Problem) otherwise."""
    v = value(rec, key)
    if v is _MISSING or v is None:
        problems.append(Problem(*where, key, "missing required field" + (f" ({hint})" if hint else "")))
        return None
    if not isinstance(v, str):
        problems.append(Problem(*where, key, f"expected a string, got {type(v).__name__}"))
        return None
    if not v.strip():
        problems.append(Problem(*where, key, "empty string"))
        return None
    return v


def need_id(rec: dict, keys: Sequence[str], where: Where, problems: list) -> Optional[str]:
    """The row's id from the first of `keys` present: a non-empty string or an int (as its decimal
    string; TSV and parquet copies of the same dataset differ there)."""
    key = next((k for k in keys if present(rec, k)), keys[0])
    v = value(rec, key)
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    return need_str(rec, key, where, problems)


def check_str_list(v: Any, key: str, where: Where, problems: list, allow_empty: bool = False) -> Optional[List[str]]:
    """v must be a list of non-empty strings (non-empty unless allow_empty)."""
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
    if not v and not allow_empty:
        problems.append(Problem(*where, key, "empty list"))
        bad = True
    return None if bad else list(v)


def need_str_list(rec: dict, key: str, where: Where, problems: list, allow_empty: bool = False):
    v = value(rec, key)
    if v is _MISSING or v is None:
        problems.append(Problem(*where, key, "missing required field"))
        return None
    return check_str_list(v, key, where, problems, allow_empty)


def structured(rec: dict, key: str, where: Where, problems: list, types: tuple = (list, dict)) -> Any:
    """A nested field (a list or an object).  Some copies of a dataset store these as JSON strings
    (PopQA's `possible_answers` always does); a string is decoded, and must decode to `types`."""
    v = value(rec, key)
    if v is _MISSING or v is None:
        problems.append(Problem(*where, key, "missing required field"))
        return None
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except json.JSONDecodeError as e:
            problems.append(Problem(*where, key, f"a string that is not valid JSON ({e.msg} at char {e.pos})"))
            return None
    if not isinstance(v, types):
        names = " or ".join("a list" if t is list else "an object" for t in types)
        problems.append(Problem(*where, key, f"expected {names}, got {type(v).__name__}"))
        return None
    return v


def unique(items: Sequence[str]) -> List[str]:
    """Items in first-seen order, repeats dropped (an alias listed twice is one answer)."""
    return list(dict.fromkeys(items))


def titled_sentences(ctx_value: Any, key: str, where: Where, problems: list, body: str) -> Optional[list]:
    """[(title, [sentence, ...]), ...] from the two layouts of HotpotQA / 2Wiki paragraphs: the
    original files' list of [title, sentences] pairs, or the hub's {"title": [...], body: [[...]]}."""
    if isinstance(ctx_value, dict):
        titles, bodies = ctx_value.get("title"), ctx_value.get(body)
        if not isinstance(titles, list) or not isinstance(bodies, list) or len(titles) != len(bodies):
            problems.append(Problem(*where, key, f"expected {{'title': [...], '{body}': [[...]]}} of equal lengths"))
            return None
        pairs = list(zip(titles, bodies))
    elif isinstance(ctx_value, list):
        pairs = []
        for i, p in enumerate(ctx_value):
            if not (isinstance(p, (list, tuple)) and len(p) == 2):
                problems.append(Problem(*where, f"{key}[{i}]", "expected a [title, sentences] pair"))
                return None
            pairs.append(tuple(p))
    else:
        problems.append(Problem(*where, key, f"expected a list or an object, got {type(ctx_value).__name__}"))
        return None
    out = []
    for i, (title, sents) in enumerate(pairs):
        if not isinstance(title, str) or not title.strip():
            problems.append(Problem(*where, f"{key}[{i}].title", "expected a non-empty string"))
            return None
        if not isinstance(sents, list) or not all(isinstance(s, str) for s in sents):
            problems.append(Problem(*where, f"{key}[{i}].{body}", "expected a list of strings"))
            return None
        out.append((title, sents))
    return out


def fact_titles(sf_value: Any, key: str, where: Where, problems: list) -> Optional[List[str]]:
    """The titles of supporting facts, in order of first appearance, from the original layout
    ([[title, sent_id], ...]) or the hub's ({"title": [...], "sent_id": [...]})."""
    if isinstance(sf_value, dict):
        titles = sf_value.get("title")
    elif isinstance(sf_value, list):
        if not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in sf_value):
            problems.append(Problem(*where, key, "expected [title, sent_id] pairs"))
            return None
        titles = [p[0] for p in sf_value]
    else:
        titles = None
    if not isinstance(titles, list) or not all(isinstance(t, str) and t.strip() for t in titles):
        problems.append(Problem(*where, key, "expected supporting-fact titles (non-empty strings)"))
        return None
    if not titles:
        problems.append(Problem(*where, key, "no supporting facts"))
        return None
    return unique(titles)


def join_sentences(sentences: Sequence[str]) -> str:
    """One paragraph from its sentences: HotpotQA's sentences carry their own leading space, other
    copies do not; a space is inserted only where the next sentence does not start with one."""
    out = ""
    for s in sentences:
        out += s if not out or s[:1].isspace() or out[-1:].isspace() else " " + s
    return out.strip()


def context_gold(ctx, paragraphs, titles: Sequence[str], where: Where, problems: list):
    """(gold ids, candidate ids) of a question bringing its own titled paragraphs (HotpotQA
    distractor, 2Wiki): each paragraph registered in the corpus once, gold = the paragraphs of the
    supporting titles in their order; None (and a problem) for an empty paragraph or a supporting
    title not among them. With data.corpus_path a supporting title the corpus lacks leaves the
    question without gold (counted)."""
    by_title: Dict[str, Optional[str]] = {}
    cands = []
    for title, sents in paragraphs:
        body = join_sentences(sents)
        if not body:
            problems.append(Problem(*where, "context", f"paragraph {title!r} has no text"))
            return None
        pid = ctx.paragraphs.paragraph(title, body)
        by_title.setdefault(title, pid)
        if pid is not None:
            cands.append(pid)
    missing = [t for t in titles if t not in by_title]
    if missing:
        why = f"title {missing[0]!r} is not among the context paragraphs"
        problems.append(Problem(*where, "supporting_facts", why))
        return None
    gold = [by_title[t] for t in titles]
    if None in gold:
        ctx.stats["without_gold_title_not_in_corpus"] += 1
        gold = []
    return gold, cands


def paragraph_id(title: str, text: str) -> str:
    """A stable passage id for a dataset's own paragraph: the title plus a hash of title and text,
    so the same paragraph shared by many questions is one passage, a title with two different texts
    is two, and the id does not depend on the order the rows were read in."""
    h = hashlib.sha1(f"{title}\0{text}".encode()).hexdigest()[:10]
    return f"{title}#{h}"


# ---- where a dataset's paragraphs go -----------------------------------------------------------------
class Paragraphs:
    """Own paragraphs (no data.corpus_path): each becomes a corpus passage with a stable id.
    With a corpus (data.corpus_path), a paragraph is looked up by its title instead (the first
    passage of that title: in the 100-word wiki-18 splits, the article's opening, which is what
    HotpotQA's paragraphs are); None when the corpus has no such title."""

    def __init__(self, corpus: Optional[Corpus] = None):
        self.corpus = corpus
        self.passages: Dict[str, Passage] = {}
        self._titles: Dict[str, str] = {}
        if corpus is not None:
            for p in corpus:
                self._titles.setdefault(p.title, p.id)

    @property
    def own(self) -> bool:
        return self.corpus is None

    def paragraph(self, title: str, text: str) -> Optional[str]:
        if self.corpus is not None:
            return self._titles.get(title)
        pid = paragraph_id(title, text)
        self.passages.setdefault(pid, Passage(pid, title, text))
        return pid

    def passage(self, pid: str, title: str, text: str) -> str:
        """A passage with an id of the adapter's choosing (BabiLong: question id + sentence)."""
        self.passages.setdefault(pid, Passage(pid, title, text))
        return pid

    def built_corpus(self) -> Corpus:
        return Corpus(self.passages.values())


@dataclass
class RowContext:
    """What an adapter's `question` gets besides the row: the source split, the problem list, where
    paragraphs go, and counters that end up in result.json (questions skipped, gold not found...)."""

    split: str
    problems: list
    paragraphs: Paragraphs
    stats: Counter = field(default_factory=Counter)


# ---- the adapter base class --------------------------------------------------------------------------
_SPLIT_WORDS = {
    "train": "train",
    "dev": "validation",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "test": "test",
}


def canonical_split(name: str) -> str:
    """dev, valid and val name the validation split (HF names it so when it infers splits)."""
    return _SPLIT_WORDS.get(name.lower(), name)


class Preset:
    """One dataset family's adapter.  Subclasses set the class attributes and `question`."""

    name = ""
    summary = ""
    paper = ""
    hub_id = ""  # default of data.hf_name
    hub_config = ""  # default of data.hf_config
    # source split names in order of preference (dev / validation are one name, see canonical_split)
    test_splits: Tuple[str, ...] = ("test",)  # the split the literature reports on
    dev_splits: Tuple[str, ...] = ()  # empty: dev is carved from train
    train_splits: Tuple[str, ...] = ("train",)  # none available: train and dev are carved from test
    own_paragraphs = False  # rows bring their own paragraphs (corpus built from them without corpus_path)
    id_fields: Tuple[str, ...] = ("id",)
    Options: type = NoOptions

    def __init__(self, opts: Any = None, config: str = ""):
        self.opts = opts if opts is not None else self.Options()
        self.config = config or self.hub_config

    # -- corpus requirements (checked with the config, before any data is read) --
    def needs_corpus(self) -> bool:
        """data.corpus_path is required (an open-domain setting: no paragraphs in the rows)."""
        return not self.own_paragraphs

    def accepts_corpus(self) -> bool:
        return True

    def check_config(self, dc) -> Optional[Tuple[str, str]]:
        """(dotted key, message) of a setting (`dc`: the DataConfig) this preset cannot work with, else None."""
        return None

    # -- splits --
    def split_of_file(self, path: Path) -> Optional[str]:
        """The source split a local file holds, from the words of its name (train, dev/validation,
        test); None when the name says none."""
        words = re.split(r"[^a-z0-9]+", path.name.lower())
        found = {_SPLIT_WORDS[w] for w in words if w in _SPLIT_WORDS}
        return found.pop() if len(found) == 1 else None

    def local_files(self, folder: Path, config: str) -> List[Path]:
        """The dataset files of a local folder (its own files, not its subfolders)."""
        return sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in FILE_SUFFIXES)

    def test_pool(self, available: Sequence[str]) -> List[str]:
        """The source splits that make up the reported split (usually one; none: not there)."""
        name = next((s for s in self.test_splits if s in available), None)
        return [name] if name else []

    # -- rows --
    def question(self, rec: dict, where: Where, ctx: RowContext) -> Optional[Question]:
        raise NotImplementedError

    def default_id(self, where: Where, ctx: RowContext) -> str:
        """For datasets without ids: the source split and the row's line (stable for one file)."""
        return f"{ctx.split}-{where[1]}"
