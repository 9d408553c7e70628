"""The gradient-variance diagnostic: exact on hand-built losses (zero variance for a deterministic
one, the analytic covariance trace and norm moments for theta . eps), leaves no trace (RNGs,
grads, modes, strategy state, ledger, weights), and a run with it on trains bit-identically."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from ragtune import run
from ragtune.diagnostics import gradient_variance, metrics_row
from ragtune.ledger import Ledger
from ragtune.strategies import REGISTRY
from ragtune.strategy import LossSum, Phase, StepContext, Strategy

from helpers import assert_same_tensors, build, deterministic_cost, final_weights, step_lines, tiny_cfg

PHASE = Phase("main", frozenset({"generator"}))
CTX = StepContext(PHASE, 0, 0, 1, {}, 2)


class Quadratic(Strategy):
    """loss = 0.5 ||A theta - b||^2 (grad A^T (A theta - b)), charged 100 FLOPs a call; counts calls
    in its extra_state; `as_sum` returns it as LossSum(2 loss, 2)."""

    def __init__(self, as_sum=False):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.A, self.b, self.as_sum, self.calls = torch.randn(7, 5, generator=g), torch.randn(7, generator=g), as_sum, 0

    def loss(self, batch, rag, ctx):
        self.calls += 1
        rag.ledger.charge("generator", "train", tokens=3, flops=100)
        loss = 0.5 * ((self.A @ rag.theta - self.b) ** 2).sum()
        return (LossSum(2 * loss, 2.0) if self.as_sum else loss), {}

    def extra_state(self):
        return {"calls": self.calls}

    def load_extra_state(self, state):
        self.calls = state["calls"]


class Noisy(Strategy):
    """loss = theta . (mu + eps), eps ~ N(0, I) from the torch RNG: gradient mu + eps, covariance I."""

    def __init__(self, mu):
        super().__init__()
        self.mu = mu

    def loss(self, batch, rag, ctx):
        return rag.theta @ (self.mu + torch.randn(rag.theta.shape[0])), {}


class FakeRAG(nn.Module):
    """What gradient_variance uses of a pipeline: parameters per component, modes, ledger, strategy."""

    def __init__(self, strategy, dim=5):
        super().__init__()
        self.theta = nn.Parameter(torch.linspace(-1, 1, dim))
        self.frozen = nn.Linear(2, 2).requires_grad_(False)
        self.strategy, self.ledger = strategy, Ledger("test")

    def component_params(self):
        return {"generator": [self.theta], "query_encoder": list(self.frozen.parameters())}

    def set_modes(self, trains):
        self.eval()
        self.strategy.train("generator" in trains)


@pytest.mark.parametrize("as_sum", [False, True])
def test_deterministic_loss_has_zero_variance_and_the_exact_norm(as_sum):
    rag = FakeRAG(Quadratic(as_sum))
    res = gradient_variance(rag, [["q1"], ["q2"]], CTX, draws=3)
    assert set(res["components"]) == {"generator"}  # frozen parameters are not reported
    s = res["components"]["generator"]
    exact = float(torch.linalg.vector_norm(rag.strategy.A.T @ (rag.strategy.A @ rag.theta.detach() - rag.strategy.b)))
    assert s["var_norm"] == 0.0 and s["cov_trace"] == 0.0 and s["rel_var"] == 0.0
    assert s["norm_mean"] == pytest.approx(exact, rel=1e-6)
    assert res["draws"] == 3 and res["batches"] == 2 and res["flops"] == 6 * 100


def test_noisy_loss_matches_the_analytic_moments():
    d, n = 50, 4000
    res = gradient_variance(FakeRAG(Noisy(torch.zeros(d)), d), [[0], [1]], CTX, draws=n)["components"]["generator"]
    mean_chi = math.sqrt(2) * math.exp(math.lgamma((d + 1) / 2) - math.lgamma(d / 2))  # E ||eps||, eps ~ N(0, I_d)
    assert res["cov_trace"] == pytest.approx(d, rel=0.03)  # std of the estimate: sqrt(2 d / n) = 0.16
    assert res["norm_mean"] == pytest.approx(mean_chi, rel=0.01)
    assert res["var_norm"] == pytest.approx(d - mean_chi**2, abs=0.06)  # 0.4975; std ~ 0.011
    mu = torch.full((d,), 2.0)  # ||mu||^2 = 200: relative variance d / 200 = 0.25
    res = gradient_variance(FakeRAG(Noisy(mu), d), [[0]], CTX, draws=n)["components"]["generator"]
    assert res["rel_var"] == pytest.approx(d / 200, rel=0.05)
    assert res["cov_trace"] == pytest.approx(d, rel=0.05)


class Chained(Strategy):
    """loss = theta . v_s where s is a counter in its extra_state that every loss call advances
    (like a sample cache a chain resumes from): deterministic given the state."""

    def __init__(self):
        super().__init__()
        self.state = 0

    def loss(self, batch, rag, ctx):
        v = torch.arange(rag.theta.shape[0], dtype=torch.float32) * (1 + self.state)
        self.state += 1
        return rag.theta @ v, {}

    def extra_state(self):
        return {"state": self.state}

    def load_extra_state(self, state):
        self.state = state["state"]


def test_every_draw_starts_from_the_same_strategy_state():
    rag = FakeRAG(Chained())
    res = gradient_variance(rag, [["q1"]], CTX, draws=4)["components"]["generator"]
    assert res["cov_trace"] == 0.0 and res["var_norm"] == 0.0  # without the per-draw restore: > 0
    assert res["norm_mean"] == pytest.approx(float(torch.linalg.vector_norm(torch.arange(5.0))), rel=1e-6)
    assert rag.strategy.state == 0


def test_everything_is_restored():
    rag = FakeRAG(Quadratic())
    rag.train()
    rag.frozen.eval()
    grad = torch.ones(5)
    rag.theta.grad = grad
    weights = rag.theta.detach().clone()
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    rng = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    ledger = rag.ledger.state_dict()
    modes = [m.training for m in rag.modules()]
    res = gradient_variance(rag, [["q"]], CTX, draws=3)
    assert res["flops"] == 300 and rag.ledger.state_dict() == ledger  # reported, never charged
    assert rag.strategy.calls == 0  # strategy state mutated by loss is put back
    assert rag.theta.grad is grad and torch.equal(grad, torch.ones(5))
    assert torch.equal(rag.theta.detach(), weights)
    assert [m.training for m in rag.modules()] == modes
    assert random.getstate() == rng[0] and np.array_equal(np.random.get_state()[1], rng[1])
    assert torch.equal(torch.get_rng_state(), rng[2])
    noisy = FakeRAG(Noisy(torch.zeros(5)))
    torch.manual_seed(5)
    gradient_variance(noisy, [[0]], CTX, draws=3)
    after = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(3))  # the draws consumed no random number of the run


def test_metrics_row_keys():
    row = metrics_row(gradient_variance(FakeRAG(Quadratic()), [["q"]], CTX, draws=2))
    assert set(row) == {
        "grad_var/generator",
        "grad_norm_mean/generator",
        "grad_cov_trace/generator",
        "grad_rel_var/generator",
        "grad_var_draws",
        "grad_var_batches",
        "grad_var_flops",
    }


class SampledToy(Strategy):
    """A stochastic strategy on the real pipeline: one passage per question sampled from p(z|x)
    with the torch RNG, score-function gradient for the query encoder, NLL of the sample for the
    generator."""

    name = "sampled_toy"

    def phases(self):
        return [Phase("joint", frozenset({"query_encoder", "generator"}))]

    def loss(self, batch, rag, ctx):
        ret, tok_lp, mask = rag.retrieve_and_read(batch, ctx.k)  # scores (B, K), tok_lp (B, K, T)
        seq = (tok_lp * mask.unsqueeze(1)).sum(-1)  # (B, K)
        z = torch.multinomial(ret.scores.detach().softmax(-1), 1)  # (B, 1)
        lp_z = ret.scores.log_softmax(-1).gather(1, z).squeeze(1)  # (B,)
        seq_z = seq.gather(1, z).squeeze(1)  # (B,)
        return -(seq_z + lp_z * seq_z.detach()).mean(), {}


def test_real_pipeline_deterministic_strategy_has_zero_variance(tmp_path):
    cfg = tiny_cfg(tmp_path, "strategy.name=joint")
    data, m, _ = build(cfg)
    ph = m.strategy.phases()[0]
    for p in m.parameters():
        p.requires_grad_(False)
    for c in ph.trains:
        for p in m.component_params()[c]:
            p.requires_grad_(True)
    ctx = StepContext(ph, 0, 0, 1, {}, cfg.train.k)
    batch = data.train[:4]
    res = gradient_variance(m, [batch], ctx, draws=3)
    assert set(res["components"]) == set(ph.trains) and res["flops"] > 0
    m.set_modes(ph.trains)
    loss, _ = m.strategy.loss(batch, m, ctx)
    (loss.total / loss.count if isinstance(loss, LossSum) else loss).backward()
    for c, s in res["components"].items():
        g = torch.cat([p.grad.reshape(-1) for p in m.component_params()[c] if p.grad is not None])
        assert s["cov_trace"] == 0.0 and s["var_norm"] == 0.0
        assert s["norm_mean"] == pytest.approx(float(g.double().norm()), rel=1e-6)


def test_training_is_bit_identical_with_diagnostics_on(tmp_path, monkeypatch):
    monkeypatch.setitem(REGISTRY, "sampled_toy", SampledToy)
    common = ["strategy.name=sampled_toy", "train.steps=4", "train.log_every=1", "eval.splits=[dev]"]
    diag = ["diagnostics.grad_variance_every=2", "diagnostics.grad_variance_draws=3"]
    off = run.train_and_evaluate(tiny_cfg(tmp_path / "off", *common))
    on = run.train_and_evaluate(tiny_cfg(tmp_path / "on", *common, *diag))
    assert off["status"] == on["status"] == "ok"
    assert_same_tensors(final_weights(tmp_path / "off"), final_weights(tmp_path / "on"))
    assert deterministic_cost(off["cost"]) == deterministic_cost(on["cost"])  # never charged as training
    assert off["dev"]["em"] == on["dev"]["em"] and off["dev"]["f1"] == on["dev"]["f1"]
    rows_off, rows_on = step_lines(tmp_path / "off" / "metrics.jsonl"), step_lines(tmp_path / "on" / "metrics.jsonl")
    diag_keys = ("grad_var", "grad_norm_mean", "grad_cov_trace", "grad_rel_var")
    assert [{k: v for k, v in r.items() if not k.startswith(diag_keys)} for r in rows_on] == rows_off
    with_diag = [r for r in rows_on if "grad_var_draws" in r]
    assert [r["step"] for r in with_diag] == [2, 4] and all(r["grad_var_draws"] == 3 for r in with_diag)
    for r in with_diag:
        for comp in ("generator", "query_encoder"):
            assert r[f"grad_cov_trace/{comp}"] > 0 and r[f"grad_norm_mean/{comp}"] > 0
            assert r[f"grad_rel_var/{comp}"] > 0 and r[f"grad_var/{comp}"] >= 0
    # a resumed run logs the same diagnostics (its RNG is restored by the checkpoint)
    with pytest.raises(KeyboardInterrupt):
        run.train_and_evaluate(tiny_cfg(tmp_path / "cut", *common, *diag, "train.save_every=1", "debug.stop_after=3"))
    run.train_and_evaluate(tiny_cfg(tmp_path / "cut", *common, *diag, "train.save_every=1"))
    assert step_lines(tmp_path / "cut" / "metrics.jsonl") == rows_on
    assert_same_tensors(final_weights(tmp_path / "off"), final_weights(tmp_path / "cut"))
