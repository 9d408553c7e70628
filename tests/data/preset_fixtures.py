"""Small fixtures in each real dataset's field layout (as datasets.md and the cards give them),
written by the tests into tmp_path: nothing is downloaded."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path
from typing import Iterable, List

# ---- writers ---------------------------------------------------------------------------------------


def jsonl(path: Path, rows: Iterable) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def json_list(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    return path


def tsv(path: Path, header: List[str], rows: Iterable[list]) -> Path:
    """csv-quoted tsv (as pandas and DPR write it: fields with quotes are quoted, quotes doubled)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
    return path


# ---- a tiny wiki-18 ---------------------------------------------------------------------------------
# (id, title, text); two passages of "Ada Lovelace" (DPR splits an article into 100-word passages)
WIKI = [
    ("1", "Ada Lovelace", "Ada Lovelace was an English mathematician, born in London."),
    ("2", "Ada Lovelace", 'She wrote the first "program" for the Analytical Engine.'),
    ("3", "London", "London is the capital of England and of the United Kingdom."),
    ("4", "Charles Babbage", "Charles Babbage designed the Analytical Engine in London."),
    ("5", "Paris", "Paris is the capital of France, on the Seine."),
    ("6", "Mont Blanc", "Mont Blanc is the highest mountain of the Alps, in France."),
    ("7", "Ben Nevis", "Ben Nevis is the highest mountain of the United Kingdom, in Scotland."),
    ("8", "Alan Turing", "Alan Turing was an English mathematician, born in London."),
]


def wiki_tsv(path: Path, gz: bool = False) -> Path:
    """DPR psgs_w100.tsv: header id/text/title, csv-quoted text."""
    p = tsv(path, ["id", "text", "title"], [[i, text, title] for i, title, text in WIKI])
    if gz:
        out = p.with_name(p.name + ".gz")
        out.write_bytes(gzip.compress(p.read_bytes()))
        p.unlink()
        return out
    return p


def wiki_contents(path: Path, quoted: bool = False) -> Path:
    """FlashRAG wiki18_100w ("title\\ntext") or Search-R1 wiki-18 ('"title"\\ntext')."""
    fmt = '"{}"\n{}' if quoted else "{}\n{}"
    return jsonl(path, [{"id": i, "contents": fmt.format(title, text)} for i, title, text in WIKI])


# ---- NQ-open: {question, answer: [..]} ----------------------------------------------------------------
NQ_TRAIN = [
    {"question": "where was ada lovelace born", "answer": ["London"]},
    {"question": "who designed the analytical engine", "answer": ["Charles Babbage", "Babbage"]},
    {"question": "what is the capital of france", "answer": ["Paris"]},
    {"question": "highest mountain in the alps", "answer": ["Mont Blanc"]},
    {"question": "highest mountain in the uk", "answer": ["Ben Nevis"]},
    {"question": "where was alan turing born", "answer": ["London"]},
    {"question": "capital of the united kingdom", "answer": ["London"]},
    {"question": "what river runs through paris", "answer": ["Seine", "the Seine"]},
    {"question": "who wrote the first program", "answer": ["Ada Lovelace"]},
    {"question": "what is the capital of england", "answer": ["London"]},
]
NQ_VALIDATION = [
    {"question": "where is ben nevis", "answer": ["Scotland"]},
    {"question": "where is mont blanc", "answer": ["France", "the Alps"]},
    {"question": "what nationality was ada lovelace", "answer": ["English"]},
]


def nq_folder(root: Path) -> Path:
    jsonl(root / "train.jsonl", NQ_TRAIN)
    jsonl(root / "validation.jsonl", NQ_VALIDATION)
    return root


# ---- TriviaQA: {question, question_id, answer{aliases, normalized_aliases, value, ...}} ---------------
def trivia_row(qid: str, question: str, value: str, aliases: List[str]) -> dict:
    return {
        "question": question,
        "question_id": qid,
        "question_source": "http://www.triviacountry.com/",
        "entity_pages": {"doc_source": [], "filename": [], "title": [], "wiki_context": []},
        "search_results": {"description": [], "filename": [], "rank": [], "title": [], "url": [], "search_context": []},
        "answer": {
            "aliases": aliases,
            "normalized_aliases": [a.lower() for a in aliases],
            "matched_wiki_entity_name": "",
            "normalized_matched_wiki_entity_name": "",
            "normalized_value": value.lower(),
            "type": "WikipediaEntity",
            "value": value,
        },
    }


# ---- HotpotQA ---------------------------------------------------------------------------------------
HOTPOT = [
    {
        "id": "5a8b57f25542995d1e6f1371",
        "question": "Which mathematician born in London wrote the first program?",
        "answer": "Ada Lovelace",
        "type": "bridge",
        "level": "medium",
        "context": [
            ["Analytical Engine", ["The Analytical Engine was designed by Charles Babbage.", " Ada wrote for it."]],
            ["Ada Lovelace", ["Ada Lovelace was a mathematician.", " She was born in London."]],
            ["Paris", ["Paris is the capital of France."]],
        ],
        "supporting_facts": [["Ada Lovelace", 1], ["Analytical Engine", 1], ["Ada Lovelace", 0]],
    },
    {
        "id": "5a8c7595554299585d9e36b6",
        "question": "Which is higher, Mont Blanc or Ben Nevis?",
        "answer": "Mont Blanc",
        "type": "comparison",
        "level": "easy",
        "context": [
            ["Ben Nevis", ["Ben Nevis is 1,345 m high."]],
            ["Paris", ["Paris is the capital of France."]],
            ["Mont Blanc", ["Mont Blanc is 4,806 m high."]],
        ],
        "supporting_facts": [["Mont Blanc", 0], ["Ben Nevis", 0]],
    },
    {
        "id": "5ab3b0bf5542992ade7c6e39",
        "question": "In which city was the designer of the Analytical Engine born?",
        "answer": "London",
        "type": "bridge",
        "level": "hard",
        "context": [
            ["Charles Babbage", ["Charles Babbage was born in London."]],
            ["Analytical Engine", ["The Analytical Engine was designed by Charles Babbage.", " Ada wrote for it."]],
            ["Ben Nevis", ["Ben Nevis is 1,345 m high."]],
        ],
        "supporting_facts": [["Analytical Engine", 0], ["Charles Babbage", 0]],
    },
]


def hotpot_original(row: dict) -> dict:
    """The release files' layout: `_id`, lists of pairs."""
    out = {k: v for k, v in row.items() if k != "id"}
    out["_id"] = row["id"]
    return out


def hotpot_hub(row: dict) -> dict:
    """The hub's layout: `id`, dicts of lists."""
    out = dict(row)
    out["context"] = {"title": [t for t, _ in row["context"]], "sentences": [s for _, s in row["context"]]}
    out["supporting_facts"] = {
        "title": [t for t, _ in row["supporting_facts"]],
        "sent_id": [i for _, i in row["supporting_facts"]],
    }
    return out


def hotpot_folder(root: Path, n_train: int = 0) -> Path:
    """hotpot_train_v1.1.json (the three questions repeated under new ids when n_train) and
    hotpot_dev_distractor_v1.json, both in the original layout."""
    train = []
    for i in range(max(n_train, 1)):
        for r in HOTPOT:
            row = hotpot_original(r)
            row["_id"] = f"{r['id']}-{i}"
            row["question"] = f"{r['question']} (variant {i})"
            train.append(row)
    json_list(root / "hotpot_train_v1.1.json", train)
    json_list(root / "hotpot_dev_distractor_v1.json", [hotpot_original(r) for r in HOTPOT])
    return root


# ---- MuSiQue -------------------------------------------------------------------------------------
def musique_row(qid="2hop__1_2", answerable=True) -> dict:
    """A 2-hop MuSiQue question whose paragraph list is not in hop order (hop 1 is idx 2)."""
    return {
        "id": qid,
        "paragraphs": [
            {"idx": 0, "title": "Paris", "paragraph_text": "Paris is the capital of France.", "is_supporting": False},
            {
                "idx": 1,
                "title": "Charles Babbage",
                "paragraph_text": "Charles Babbage was born in London.",
                "is_supporting": True,
            },
            {
                "idx": 2,
                "title": "Analytical Engine",
                "paragraph_text": "The Analytical Engine was designed by Charles Babbage.",
                "is_supporting": True,
            },
            {"idx": 3, "title": "Ben Nevis", "paragraph_text": "Ben Nevis is in Scotland.", "is_supporting": False},
        ],
        "question": "Where was the designer of the Analytical Engine born?",
        "question_decomposition": [
            {
                "id": 1,
                "question": "Analytical Engine >> designer",
                "answer": "Charles Babbage",
                "paragraph_support_idx": 2,
            },
            {"id": 2, "question": "Where was #1 born?", "answer": "London", "paragraph_support_idx": 1},
        ],
        "answer": "London",
        "answer_aliases": ["London, England"],
        "answerable": answerable,
    }


# ---- 2WikiMultihopQA (original layout) --------------------------------------------------------------
TWOWIKI = [
    {
        "_id": "8813f87c0bdd11eba7f7acde48001122",
        "type": "compositional",
        "question": "Where was the designer of the Analytical Engine born?",
        "context": [
            ["Charles Babbage", ["Charles Babbage was an English polymath.", "He was born in London."]],
            ["Analytical Engine", ["The Analytical Engine was designed by Charles Babbage."]],
            ["Paris", ["Paris is the capital of France."]],
        ],
        "supporting_facts": [["Analytical Engine", 0], ["Charles Babbage", 1]],
        "evidences": [["Analytical Engine", "designer", "Charles Babbage"], ["Charles Babbage", "born", "London"]],
        "answer": "London",
    },
    {
        "_id": "5811079c0bdd11eba7f7acde48001122",
        "type": "comparison",
        "question": "Which mountain is higher, Ben Nevis or Mont Blanc?",
        "context": [
            ["Mont Blanc", ["Mont Blanc is 4,806 m high."]],
            ["Ben Nevis", ["Ben Nevis is 1,345 m high."]],
        ],
        "supporting_facts": [["Ben Nevis", 0], ["Mont Blanc", 0]],
        "evidences": [["Ben Nevis", "height", "1,345 m"], ["Mont Blanc", "height", "4,806 m"]],
        "answer": "Mont Blanc",
    },
]

# ---- PopQA (test.tsv) ---------------------------------------------------------------------------------
POPQA_HEADER = [
    "id",
    "subj",
    "prop",
    "obj",
    "subj_id",
    "prop_id",
    "obj_id",
    "s_aliases",
    "o_aliases",
    "s_uri",
    "o_uri",
    "s_wiki_title",
    "o_wiki_title",
    "s_pop",
    "o_pop",
    "question",
    "possible_answers",
]


def popqa_row(i: int, subj: str, obj: str, answers: List[str], possible=None) -> list:
    row = {
        "id": str(4222362 + i),
        "subj": subj,
        "prop": "place of birth",
        "obj": obj,
        "subj_id": str(1000 + i),
        "prop_id": "22",
        "obj_id": "2000",
        "s_aliases": json.dumps([]),
        "o_aliases": json.dumps(answers[1:]),
        "s_uri": f"http://www.wikidata.org/entity/Q{1000 + i}",
        "o_uri": "http://www.wikidata.org/entity/Q84",
        "s_wiki_title": subj,
        "o_wiki_title": obj,
        "s_pop": str(100 + i),
        "o_pop": "123456",
        "question": f"In what city was {subj} born?",
        "possible_answers": json.dumps(answers) if possible is None else possible,
    }
    return [row[k] for k in POPQA_HEADER]


def popqa_tsv(path: Path, n: int = 20, bad_line: int = 0) -> Path:
    rows = [popqa_row(i, f"Person {i}", "London", ["London", "London, England"]) for i in range(n)]
    if bad_line:
        rows[bad_line - 2] = popqa_row(bad_line, "Broken", "London", [], possible="['London'")  # not JSON
    return tsv(path, POPQA_HEADER, rows)
