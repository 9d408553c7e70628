"""Each strategy's loss equals the documented objective recomputed from the same retrieval."""

import pytest
import torch

from ragtune import losses

from helpers import build, step_ctx, tiny_cfg


def _setup(tmp_path, *overrides):
    data, m, _ = build(tiny_cfg(tmp_path, *overrides))
    m.set_modes(set())
    return data.train[:4], m


def _reference(m, batch, k):
    """Independent recomputation: retrieve, score every passage, no strategy code involved."""
    qs = [q.question for q in batch]
    q = m.retriever.encode_queries(qs)  # (B, H)
    _, rows = m.index.search(q, k)  # (B, K)
    scores = torch.einsum("bh,bkh->bk", q, m.index.lookup(rows)) / m.retriever.temperature
    texts = [[m.passage_texts[r] for r in row] for row in rows.tolist()]
    tok_lp, mask = m.generator.answer_logprobs(qs, texts, [x.answers[0] for x in batch])
    return scores, tok_lp, mask


@pytest.mark.parametrize(
    "name,opts,expected",
    [
        ("two_phase", [], lambda s, t, m: losses.rag_token_nll(s, t, m)),
        ("two_phase", ["strategy.marginal=sequence"], lambda s, t, m: losses.rag_sequence_nll(s, t, m)),
        ("joint", [], lambda s, t, m: losses.rag_token_nll(s, t, m)),
        ("joint", ["strategy.reduction=mean"], lambda s, t, m: losses.rag_token_nll(s, t, m, "mean")),
        (
            "joint",
            ["strategy.retriever_loss=pdist", "strategy.gen_temperature=2.0"],
            lambda s, t, m: losses.nll_given_passages(t, m) + losses.distill_kl(s, losses.seq_logprob(t, m), 2.0),
        ),
        (
            "joint",
            ["strategy.retriever_loss=emdr2"],
            lambda s, t, m: losses.nll_given_passages(t, m) + losses.emdr2_loss(s, losses.seq_logprob(t, m)),
        ),
    ],
)
def test_loss_matches_objective(tmp_path, name, opts, expected):
    batch, m = _setup(tmp_path, f"strategy.name={name}", *opts)
    with torch.no_grad():
        got, _ = m.strategy.loss(batch, m, step_ctx(m, k=2))
        s, t, mk = _reference(m, batch, 2)
        want = expected(s, t, mk)
    torch.testing.assert_close(got, want)


def test_independent_generator_phase_is_uniform_nll_over_untuned_top_k(tmp_path):
    batch, m = _setup(tmp_path, "strategy.name=independent")
    for p in m.generator.model.parameters():  # the generator phase: only the generator trains
        p.requires_grad_(True)
    got, _ = m.strategy.loss(batch, m, step_ctx(m, "generator", k=2))
    with torch.no_grad():
        _, t, mk = _reference(m, batch, 2)
    torch.testing.assert_close(got.detach(), losses.nll_given_passages(t, mk))
