"""The search-and-answer turn format of `rag_r1` (RAG-R1, Tan et al. 2025, arXiv 2507.02962): pure
functions on text, no model, no tokenizer.

A rollout is a prompt, then model turns and observations alternating:

    prompt        "<instruction>\\nQuestion: <question>\\n"            (no example answer in it)
    model turn    "<think> ... </think> <search> q1 | q2 | q3 </search>"
    observation   "\\n<information> (1) passage (2) passage ... </information>\\n"
    model turn    "<think> ... </think> <answer> ... </answer>"

A model turn ends at the first `</search>` or `</answer>` it writes (`STOP`). After `max_turns`
search turns the rollout appends the forced text `FINAL_TEXT` ("<answer>") and the model writes
one last turn, which then continues that answer (its text has no opening tag of its own).

Queries. In `multi` mode one search turn holds up to `max_queries` queries issued in parallel,
separated by `SEPARATOR` ("|"). The separator is *reserved*: a generated query containing it is
split there, empty parts are dropped (so "a || b" and "a | | b" are two queries), and parts after
the first `max_queries` are dropped; building SFT data with a sub-query containing it is an
error (`search_turn` raises). Nothing else splits a query: commas are ordinary text ("Paris,
Texas" is one query; the reference code split on commas). In `single` mode the separator is
ordinary text: the whole (stripped) search text is one query.

Parsing (`parse_turn`) never raises and accepts everything a sampler can produce:
- a leading `<think> ... </think>` block is skipped (its content is never parsed for tags);
- the first `<search>` or `<answer>` after it decides the action;
- `<answer>` closed or not: the text up to `</answer>` or, unclosed (the turn hit its token
  budget), the whole rest of the turn; a nested `<answer>` inside it restarts the answer;
- `<search>` closed or not: its text split into queries as above (unclosed: the rest of the turn);
  an empty search has no query: the observation is an empty `<information> </information>` and
  no retrieval runs for it; it is not a query and not a retrieval round (`rag_r1` counts rounds
  as search turns that issued at least one query);
- neither tag: action "none", the rollout ends with an empty answer.
`extract_answer` reads the model's own turns only (never the prompt, never an observation), so
no prompt text can be mistaken for an answer (the reference extractor needed a second `<answer>`
match because its prompt showed an example one); no answer gives "" (never an exception: the
reference evaluation crashed there).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
SEARCH_OPEN, SEARCH_CLOSE = "<search>", "</search>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
INFO_OPEN, INFO_CLOSE = "<information>", "</information>"
SEPARATOR = "|"  # reserved in multi mode: never part of a query
STOP = (SEARCH_CLOSE, ANSWER_CLOSE)  # a model turn ends at the first of these it writes
FINAL_TEXT = ANSWER_OPEN  # forced after the last allowed search turn

INSTRUCTIONS = {
    "multi": "Search (queries split by |), then answer.",
    "single": "Search, then answer.",
}


def prompt_text(question: str, mode: str = "multi") -> str:
    """The prompt: a one-line instruction and the question (no example of a turn or answer)."""
    return f"{INSTRUCTIONS[mode]}\nQuestion: {question}\n"


# ---- building turns (SFT trajectories) ------------------------------------------------------------
def think_text(found: Sequence[str]) -> str:
    """The templated reasoning of a turn: the intermediate answers found so far, or "search"."""
    return "found " + ", ".join(found) if found else "search"


def search_turn(think: str, queries: Sequence[str], mode: str = "multi") -> str:
    """A model turn issuing `queries` (one in single mode). Raises ValueError on an empty list, an
    empty query, several queries in single mode, or (multi mode) a query containing SEPARATOR."""
    qs = [q.strip() for q in queries]
    if not qs or not all(qs):
        raise ValueError(f"a search turn needs non-empty queries, got {list(queries)!r}")
    if mode == "single" and len(qs) != 1:
        raise ValueError(f"single-query mode issues one query per search turn, got {len(qs)}")
    if mode == "multi":
        bad = [q for q in qs if SEPARATOR in q]
        if bad:
            raise ValueError(f"query {bad[0]!r} contains the reserved separator {SEPARATOR!r}")
    joined = f" {SEPARATOR} ".join(qs)
    return f"{THINK_OPEN} {think} {THINK_CLOSE} {SEARCH_OPEN} {joined} {SEARCH_CLOSE}"


def answer_turn(think: str, answer: str) -> str:
    """A model turn giving the final answer."""
    return f"{THINK_OPEN} {think} {THINK_CLOSE} {ANSWER_OPEN} {answer} {ANSWER_CLOSE}"


def forced_answer_turn(answer: str) -> str:
    """What the model writes after the forced FINAL_TEXT: the answer and the closing tag."""
    return f" {answer} {ANSWER_CLOSE}"


def observation(passages: Sequence[str]) -> str:
    """The retrieved text returned after a search turn, passages numbered from 1 (none: empty)."""
    body = "".join(f" ({i + 1}) {p}" for i, p in enumerate(passages))
    return f"\n{INFO_OPEN}{body} {INFO_CLOSE}\n"


# ---- parsing model turns --------------------------------------------------------------------------
@dataclass(frozen=True)
class Turn:
    action: str  # "search" | "answer" | "none"
    queries: Tuple[str, ...] = ()  # search: the queries issued (possibly none)
    answer: str = ""  # answer: the stripped answer text
    closed: bool = False  # the action's closing tag was written
    think: bool = False  # the turn starts with a closed <think> ... </think> block


def split_queries(text: str, mode: str = "multi", max_queries: int = 3) -> List[str]:
    """Queries of a search text: multi mode splits on SEPARATOR, strips, drops empty parts, keeps
    the first `max_queries`; single mode: the stripped text as one query (none if empty)."""
    if mode == "single":
        q = text.strip()
        return [q] if q else []
    return [q for q in (p.strip() for p in text.split(SEPARATOR)) if q][:max_queries]


def _tagged(rest: str, open_tag: str, close_tag: str) -> Tuple[str, bool]:
    """The text after `open_tag` (at the start of `rest`) up to `close_tag` or the end; closed?"""
    body = rest[len(open_tag) :]
    end = body.find(close_tag)
    return (body[:end], True) if end >= 0 else (body, False)


def parse_turn(text: str, mode: str = "multi", max_queries: int = 3) -> Turn:
    """The action of one model turn (see the module docstring); never raises."""
    s = text.lstrip()
    think = False
    if s.startswith(THINK_OPEN):
        end = s.find(THINK_CLOSE)
        if end >= 0:
            think, s = True, s[end + len(THINK_CLOSE) :]
    found = [(i, tag) for tag in (SEARCH_OPEN, ANSWER_OPEN) for i in [s.find(tag)] if i >= 0]
    if not found:
        return Turn("none", think=think)
    start, tag = min(found)
    rest = s[start:]
    if tag == ANSWER_OPEN:
        body, closed = _tagged(rest, ANSWER_OPEN, ANSWER_CLOSE)
        body = body.rsplit(ANSWER_OPEN, 1)[-1]  # a nested opening tag restarts the answer
        return Turn("answer", answer=body.strip(), closed=closed, think=think)
    body, closed = _tagged(rest, SEARCH_OPEN, SEARCH_CLOSE)
    return Turn("search", queries=tuple(split_queries(body, mode, max_queries)), closed=closed, think=think)


def final_turn(turns: Sequence[str], forced: bool, mode: str = "multi", max_queries: int = 3) -> Turn:
    """The parsed last model turn; `forced`: it continues FINAL_TEXT (so it is parsed after it)."""
    if not turns:
        return Turn("none")
    return parse_turn((FINAL_TEXT if forced else "") + turns[-1], mode, max_queries)


def extract_answer(turns: Sequence[str], forced: bool, mode: str = "multi", max_queries: int = 3) -> str:
    """The final answer of a rollout from its model turns only; "" when it gave none."""
    t = final_turn(turns, forced, mode, max_queries)
    if t.action != "answer":
        return ""
    # a forced answer in which the model searched again: the answer ends where the search begins
    return t.answer.split(SEARCH_OPEN, 1)[0].strip()


def well_formed(turns: Sequence[str], forced: bool, mode: str = "multi", max_queries: int = 3) -> bool:
    """Every turn but the last a closed search with at least one query after a closed think; the
    last a closed, non-empty answer (after a closed think unless it continues the forced text)."""
    if not turns:
        return False
    for text in turns[:-1]:
        t = parse_turn(text, mode, max_queries)
        if not (t.think and t.action == "search" and t.closed and t.queries):
            return False
    last = final_turn(turns, forced, mode, max_queries)
    return last.action == "answer" and last.closed and bool(last.answer) and (forced or last.think)
