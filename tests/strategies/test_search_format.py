"""rag_r1's turn format: building, parsing and answer extraction (pure functions, no model)."""

from __future__ import annotations

import pytest

from ragtune.strategies import search_format as fmt


def test_built_turns_parse_back():
    s = fmt.search_turn("search", ["Where is A?", "Where is B?"])
    assert s == "<think> search </think> <search> Where is A? | Where is B? </search>"
    t = fmt.parse_turn(s)
    assert (t.action, t.queries, t.closed, t.think) == ("search", ("Where is A?", "Where is B?"), True, True)
    a = fmt.parse_turn(fmt.answer_turn("found x", "Ranfein"))
    assert (a.action, a.answer, a.closed, a.think) == ("answer", "Ranfein", True, True)
    assert fmt.extract_answer([s, fmt.answer_turn("found x", "Ranfein")], forced=False) == "Ranfein"


def test_comma_is_not_a_separator():
    """The reference code split on commas: "Paris, Texas" must stay one query in both modes."""
    for mode in ("multi", "single"):
        t = fmt.parse_turn("<think> t </think> <search> weather in Paris, Texas </search>", mode)
        assert t.queries == ("weather in Paris, Texas",)
    two = fmt.parse_turn("<search> Paris, Texas | Paris, France </search>")
    assert two.queries == ("Paris, Texas", "Paris, France")


def test_generated_separator_splits_drops_empty_parts_and_caps_the_count():
    t = fmt.parse_turn("<search> a || b | | c |  d </search>", "multi", max_queries=3)
    assert t.queries == ("a", "b", "c")  # empty parts dropped, the fourth query over max_queries
    # single mode: the separator is ordinary text, the whole search text is one query
    s = fmt.parse_turn("<search> a | b </search>", "single")
    assert s.queries == ("a | b",)


def test_sub_query_with_the_separator_is_an_error_in_multi_mode_only():
    with pytest.raises(ValueError, match="reserved separator"):
        fmt.search_turn("search", ["AC|DC members"], "multi")
    assert fmt.parse_turn(fmt.search_turn("search", ["AC|DC members"], "single"), "single").queries == (
        "AC|DC members",
    )
    with pytest.raises(ValueError):
        fmt.search_turn("search", ["a", "b"], "single")  # one query per turn
    with pytest.raises(ValueError):
        fmt.search_turn("search", [" "], "multi")


def test_unclosed_answer_is_the_text_after_the_tag():
    assert fmt.extract_answer(["<think> hm </think> <answer> Sumras Inst"], forced=False) == "Sumras Inst"
    t = fmt.parse_turn("<answer> x")
    assert t.action == "answer" and not t.closed


def test_unclosed_search_gives_its_text_as_queries():
    t = fmt.parse_turn("<think> t </think> <search> who founded Pada | where is Ran")
    assert (t.action, t.queries, t.closed) == ("search", ("who founded Pada", "where is Ran"), False)


def test_empty_search_has_no_query():
    t = fmt.parse_turn("<think> t </think> <search>  |  </search>")
    assert t.action == "search" and t.queries == () and t.closed
    assert fmt.observation([]) == "\n<information> </information>\n"


def test_neither_tag_is_no_action_and_no_answer():
    assert fmt.parse_turn("the model rambles on").action == "none"
    assert fmt.extract_answer(["the model rambles on"], forced=False) == ""
    assert fmt.extract_answer([], forced=False) == ""
    assert fmt.extract_answer(["<think> unclosed <answer"], forced=False) == ""


def test_think_content_is_never_parsed_and_the_first_action_decides():
    t = fmt.parse_turn("<think> maybe <answer> x </answer> or <search> y </think> <answer> z </answer>")
    assert (t.action, t.answer) == ("answer", "z")
    t = fmt.parse_turn("<think> t </think> <search> q </search> <answer> early </answer>")
    assert (t.action, t.queries) == ("search", ("q",))
    assert fmt.parse_turn("<answer> a <answer> b </answer>").answer == "b"  # a nested tag restarts


def test_prompt_has_no_answer_and_extraction_reads_model_turns_only():
    for mode in ("multi", "single"):
        p = fmt.prompt_text("Who founded Pada Foundry?", mode)
        assert fmt.ANSWER_OPEN not in p and fmt.ANSWER_CLOSE not in p and p.endswith("Who founded Pada Foundry?\n")
    # an observation quoting an answer tag is not a model turn: only the turns are read
    turns = ["<think> t </think> <search> q </search>", "<think> t </think> <answer> mine </answer>"]
    assert fmt.extract_answer(turns, forced=False) == "mine"


def test_forced_final_turn_continues_the_forced_tag():
    turns = ["<think> a </think> <search> q </search>", " Ranfein </answer>"]
    assert fmt.extract_answer(turns, forced=True) == "Ranfein"
    assert fmt.extract_answer(turns, forced=False) == ""  # without the forced tag there is no answer
    assert fmt.well_formed(turns, forced=True)
    assert fmt.extract_answer([""], forced=True) == ""  # the forced tag, then nothing written


def test_well_formed():
    s = "<think> t </think> <search> q </search>"
    a = "<think> t </think> <answer> x </answer>"
    assert fmt.well_formed([s, s, a], forced=False)
    assert not fmt.well_formed([s, "<think> t </think> <search> </search>", a], forced=False)  # empty search
    assert not fmt.well_formed([s, "<search> q </search>", a], forced=False)  # no think
    assert not fmt.well_formed([s, "<think> t </think> <answer> x"], forced=False)  # unclosed answer
    assert not fmt.well_formed([s, "<think> t </think> <answer> </answer>"], forced=False)  # empty answer
    assert not fmt.well_formed([s], forced=False)  # ends on a search
    assert not fmt.well_formed([], forced=False)


def test_observation_numbers_passages():
    assert fmt.observation(["A. x", "B. y"]) == "\n<information> (1) A. x (2) B. y </information>\n"


def test_a_forced_answer_that_searches_again_ends_where_the_search_begins():
    assert fmt.extract_answer(["Paris <search> q2 </search>"], forced=True) == "Paris"
    assert fmt.extract_answer(["<search> q2 </search>"], forced=True) == ""
