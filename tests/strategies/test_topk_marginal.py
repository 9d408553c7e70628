"""topk_marginal: with K = the whole corpus its losses are the exact log p(y|x), recomputed by
enumeration with the generator's own per-passage scores; its decoders and its staleness log."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import build, step_ctx, tiny_cfg


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cfg = tiny_cfg(tmp_path_factory.mktemp("run"), "strategy.name=topk_marginal")
    data, m, _ = build(cfg)
    m.eval()  # no dropout: the recomputation below must see the same numbers
    return cfg, data, m


def _exact_log_marginals(m, batch):
    """Enumerate every passage: (seq, tok) log p(y|x) per question, float64."""
    N = len(m.corpus)
    out_seq, out_tok = [], []
    with torch.no_grad():
        for x in batch:
            q = m.retriever.encode_queries([x.question]).double()  # (1, H)
            log_prior = torch.log_softmax((q @ m.index.emb.double().T)[0] / m.retriever.temperature, 0)  # (N,)
            tok, mask = m.generator.score_pairs([x.question] * N, m.passage_texts, [x.answers[0]] * N)  # (N, T)
            tok, keep = tok.double(), mask[0].bool()
            out_seq.append(float(torch.logsumexp(log_prior + tok.sum(-1), 0)))
            out_tok.append(float(torch.logsumexp(log_prior[:, None] + tok, 0)[keep].sum()))
    return out_seq, out_tok


@pytest.mark.parametrize("kind", ["sequence", "token"])
def test_loss_with_k_covering_the_corpus_is_the_exact_marginal(built, kind):
    cfg, data, m = built
    m.strategy.opts.loss = kind
    batch = data.train[:3]
    loss, logs = m.strategy.loss(batch, m, step_ctx(m, k=len(m.corpus)))
    seq, tok = _exact_log_marginals(m, batch)
    want = -sum(seq if kind == "sequence" else tok) / len(batch)
    assert math.isclose(float(loss.detach()), want, rel_tol=1e-4, abs_tol=1e-4)
    assert logs["distinct_passages"] == len(m.corpus)


def test_default_decoder_is_the_methods_own(built):
    _, _, m = built
    m.strategy.opts.loss = "token"
    assert m.strategy.default_decoder() == "token_mixture"
    m.strategy.opts.loss = "sequence"
    assert m.strategy.default_decoder() == "thorough"


def test_end2end_logs_staleness_of_the_index(tmp_path):
    cfg = tiny_cfg(tmp_path, "strategy.name=topk_marginal", "strategy.train_doc_encoder=true")
    data, m, _ = build(cfg)
    m.eval()
    m.doc_trained = True
    _, logs = m.strategy.loss(data.train[:2], m, step_ctx(m, step=5))
    assert logs["steps_since_refresh"] == 0.0 and logs["index_drift"] < 1e-5  # just built: fresh
    with torch.no_grad():
        for p in m.retriever.doc_encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    _, logs = m.strategy.loss(data.train[:2], m, step_ctx(m, step=9))
    assert logs["steps_since_refresh"] == 4.0 and logs["index_drift"] > 1e-3
    m.refresh_index()
    _, logs = m.strategy.loss(data.train[:2], m, step_ctx(m, step=11))
    assert logs["steps_since_refresh"] == 0.0 and logs["index_drift"] < 1e-5
    state = m.strategy.extra_state()
    m.strategy.load_extra_state({})
    m.strategy.load_extra_state(state)
    assert m.strategy.extra_state() == state
