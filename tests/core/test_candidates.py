"""Ragged candidate sets, scoring any query embedding against them, and ragged generator scoring."""

from __future__ import annotations

import pytest
import torch

from ragtune.candidates import SOURCES, Candidates

from helpers import build, tiny_cfg


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cfg = tiny_cfg(tmp_path_factory.mktemp("run"), "strategy.name=joint")
    data, m, ledger = build(cfg)
    return cfg, data, m, ledger


def test_union_dedupes_in_first_seen_order_and_ors_sources():
    prior = Candidates.of(torch.tensor([[5, 2, 9], [1, 2, 3]]), "prior")
    post = Candidates.of(torch.tensor([[9, 7, 5], [4, 4, 1]]), "posterior")
    cache = Candidates.from_lists([[7], []], [[SOURCES["cache"]], []])
    u = prior.union(post, cache)
    assert u.rows[0].tolist() == [5, 2, 9, 7] and u.mask[0].tolist() == [True] * 4
    assert u.rows[1, :4].tolist() == [1, 2, 3, 4] and u.mask[1].tolist() == [True] * 4
    assert u.has("prior")[0].tolist() == [True, True, True, False]
    assert u.has("posterior")[0].tolist() == [True, False, True, True]
    assert u.has("cache")[0].tolist() == [False, False, False, True]
    assert u.sizes().tolist() == [4, 4]
    assert u.position(torch.tensor([9, 8])).tolist() == [2, -1]


def test_union_pads_ragged_rows_with_masked_zeros():
    a = Candidates.from_lists([[3], [1, 2, 4]], [[1], [1, 1, 1]])
    assert a.rows.tolist() == [[3, 0, 0], [1, 2, 4]] and a.mask.tolist() == [[True, False, False], [True] * 3]
    assert a.position(torch.tensor([0, 4])).tolist() == [-1, 2]  # padding is never found
    with pytest.raises(ValueError, match="unknown candidate source"):
        Candidates.of(torch.tensor([[1]]), "oracle")


def test_score_candidates_is_minus_inf_at_padding_and_matches_score_rows(built):
    _, _, m, _ = built
    q = m.encode_questions(["who founded it", "where was she born"])  # (2, H)
    cands = Candidates.from_lists([[3, 8], [5]], [[1, 1], [2]])
    s = m.score_candidates(q, cands)  # (2, 2)
    assert s[1, 1] == float("-inf")
    dense = m.score_rows(q, torch.tensor([[3, 8], [5, 5]]))
    assert torch.allclose(s[0], dense[0]) and torch.allclose(s[1, 0], dense[1, 0])


def test_trained_passage_tower_reencodes_only_distinct_real_rows(built):
    _, _, m, _ = built
    rows = torch.tensor([[4, 4, 9], [9, 0, 0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    seen = []
    orig = m.retriever.encode_passages
    m.retriever.encode_passages = lambda texts, activity=None: seen.append(list(texts)) or orig(texts, activity)
    m.doc_trained = True
    try:
        emb = m.passage_embeddings(rows, mask)  # (2, 3, H)
    finally:
        m.doc_trained = False
        m.retriever.encode_passages = orig
    assert seen == [[m.passage_texts[4], m.passage_texts[9]]]  # 2 distinct real rows, not 6
    fresh = orig([m.passage_texts[4], m.passage_texts[9]])
    assert torch.allclose(emb[0, 0], fresh[0], atol=1e-6) and torch.allclose(emb[1, 0], fresh[1], atol=1e-6)
    assert torch.all(emb[1, 1:] == 0)


def test_score_pairs_ragged_equals_answer_logprobs_per_question(built):
    _, data, m, _ = built
    qs = [q.question for q in data.train[:2]]
    ans = [q.answers[0] for q in data.train[:2]]
    P = m.passage_texts
    with torch.no_grad():
        tok, mask = m.generator.score_pairs(
            [qs[0], qs[0], qs[0], qs[1]], [P[1], P[2], P[3], P[4]], [ans[0]] * 3 + [ans[1]]
        )
        ref0, m0 = m.generator.answer_logprobs([qs[0]], [[P[1], P[2], P[3]]], [ans[0]])
        ref1, m1 = m.generator.answer_logprobs([qs[1]], [[P[4]]], [ans[1]])
    T0, T1 = int(m0.sum()), int(m1.sum())
    assert torch.allclose(tok[:3, :T0], ref0[0, :, :T0], atol=1e-5)
    assert torch.allclose(tok[3, :T1], ref1[0, 0, :T1], atol=1e-5)
    assert mask[:3].sum(-1).tolist() == [T0] * 3 and int(mask[3].sum()) == T1


def test_read_candidates_scores_one_sequence_per_selected_pair(built):
    _, data, m, _ = built
    batch = data.train[:2]
    cands = Candidates.from_lists([[1, 2, 3], [4]], [[1, 1, 2], [1]])
    select = torch.tensor([[True, False, True], [True, False, False]])
    n_rows = []
    orig = m.generator.score_pairs
    m.generator.score_pairs = lambda q, p, a: n_rows.append(len(q)) or orig(q, p, a)
    try:
        with torch.no_grad():
            tok, mask, scored = m.read_candidates(batch, cands, select)
    finally:
        m.generator.score_pairs = orig
    assert n_rows == [3] and scored.tolist() == [[True, False, True], [True, False, False]]
    assert torch.all(tok[0, 1] == 0) and torch.all(tok[1, 1:] == 0)
    with torch.no_grad():
        ref, rmask = m.generator.answer_logprobs([batch[0].question], [[m.passage_texts[3]]], [batch[0].answers[0]])
    T = int(rmask.sum())
    assert torch.allclose(tok[0, 2, :T], ref[0, 0, :T], atol=1e-5) and int(mask[0].sum()) == T
