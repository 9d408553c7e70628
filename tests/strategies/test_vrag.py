"""vrag: the loss is minus the ELBO over prior top-k U posterior top-k, recomputed here by hand
from the towers and the generator; the bound is below the marginal over the same set; the prior
learns only through the KL; the posterior starts as a copy of the prior's query tower."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import build, step_ctx, tiny_cfg


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cfg = tiny_cfg(tmp_path_factory.mktemp("run"), "strategy.name=vrag", "strategy.kl_beta=0.7")
    data, m, _ = build(cfg)
    m.eval()
    return cfg, data, m


def _by_hand(m, x, k, beta):
    """(ELBO, log marginal over C) for one question, float64, without ragtune.losses."""
    with torch.no_grad():
        qp = m.retriever.encode_queries([x.question])[0].double()
        sep = m.retriever.tokenizer.sep_token
        qq = m.retriever.encode([f"{x.question} {sep} {x.answers[0]}"], m.strategy.posterior, "posterior", 64)
        qq = qq[0].double()
        emb = m.index.emb.double()
        top = lambda v: torch.argsort(emb @ v, descending=True)[:k].tolist()  # noqa: E731
        C = list(dict.fromkeys(top(qp) + top(qq)))
        tau = m.retriever.temperature
        lp = torch.log_softmax(torch.stack([qp @ emb[r] for r in C]) / tau, 0)
        lq = torch.log_softmax(torch.stack([qq @ emb[r] for r in C]) / tau, 0)
        tok, _ = m.generator.score_pairs(
            [x.question] * len(C), [m.passage_texts[r] for r in C], [x.answers[0]] * len(C)
        )
        g = tok.double().sum(-1)
    q = lq.exp()
    bound = float((q * g).sum() - beta * (q * (lq - lp)).sum())
    return bound, float(torch.logsumexp(lp + g, 0)), len(C)


def test_loss_is_minus_the_elbo_and_below_the_marginal(built):
    cfg, data, m = built
    batch = data.train[:3]
    k = 3
    loss, logs = m.strategy.loss(batch, m, step_ctx(m, k=k))
    hand = [_by_hand(m, x, k, 0.7) for x in batch]
    assert math.isclose(float(loss.detach()), -sum(h[0] for h in hand) / 3, rel_tol=1e-4, abs_tol=1e-4)
    assert math.isclose(logs["candidates"], sum(h[2] for h in hand) / 3, rel_tol=1e-6)
    full = [_by_hand(m, x, k, 1.0) for x in batch]
    assert all(b <= lm + 1e-6 for b, lm, _ in full)  # a lower bound of log p(y|x) over C


def test_posterior_starts_as_the_prior_tower_and_is_its_own_module(built):
    _, _, m = built
    prior, post = m.retriever.query_encoder, m.strategy.posterior
    assert post is not prior
    fresh_cfg_model = dict(prior.named_parameters())
    assert all(torch.equal(p, fresh_cfg_model[n]) for n, p in post.named_parameters())


def test_gradients_route_prior_only_through_the_kl(tmp_path):
    cfg = tiny_cfg(tmp_path, "strategy.name=vrag", "strategy.kl_beta=0")
    data, m, _ = build(cfg)
    for p in m.parameters():
        p.requires_grad_(True)
    loss, _ = m.strategy.loss(data.train[:2], m, step_ctx(m))
    loss.backward()

    def norm(mod):
        return sum(float(p.grad.abs().sum()) for p in mod.parameters() if p.grad is not None)

    assert norm(m.retriever.query_encoder) == 0.0  # kl_beta = 0: no path into the prior
    assert norm(m.strategy.posterior) > 0 and norm(m.generator) > 0
