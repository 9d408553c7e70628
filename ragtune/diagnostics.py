"""On-request diagnostics of a strategy's gradient estimator, usable with any strategy.

`gradient_variance` measures how noisy a strategy's gradient is on FIXED batches: it draws the loss
`draws` times per batch (a stochastic strategy samples passages / answers from the torch RNG inside
`loss`; a deterministic one differs between draws only through dropout) and reports, per trained
component, the spread of the gradient across draws. Comparing strategies on the same batches is
what the variance claims of e.g. JSA (Cao et al. 2025, arXiv 2508.18168) against VRAG and top-K
marginalisation need.

It leaves no trace on training: the RNGs (torch CPU and CUDA, python, numpy), every parameter's
`.grad`, module train/eval modes, buffers, the strategy's `extra_state()` and the ledger are restored
afterwards, and parameters are never updated, so a run with diagnostics on trains bit-identically to
one with them off. Its compute is not charged as training cost; its own FLOPs are returned instead.
A strategy must keep whatever `loss` mutates in `extra_state()` (which exact resume needs anyway).
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Callable, ContextManager, Dict, List, Optional, Sequence

import torch

from ragtune.checkpoint import rng_state, set_rng_state
from ragtune.strategy import LossSum, StepContext

STATS = ("var_norm", "norm_mean", "cov_trace", "rel_var")
# result statistic -> metrics.jsonl key prefix
METRIC_KEYS = {
    "var_norm": "grad_var",
    "norm_mean": "grad_norm_mean",
    "cov_trace": "grad_cov_trace",
    "rel_var": "grad_rel_var",
}


class _Welford:
    """Streaming moments of flattened gradients: O(params) memory whatever the number of draws."""

    def __init__(self):
        self.n, self.mean, self.m2 = 0, None, 0.0  # mean: (P,) float64; m2: sum of ||g - mean||^2
        self.norms: List[float] = []

    def add(self, g: torch.Tensor) -> None:  # g: (P,) float64
        self.n += 1
        self.norms.append(float(torch.linalg.vector_norm(g)))
        if self.mean is None:
            self.mean = g.clone()
            return
        delta = g - self.mean
        self.mean += delta / self.n
        self.m2 += float(torch.dot(delta, g - self.mean))

    def stats(self) -> Dict[str, float]:
        dof = max(1, self.n - 1)  # unbiased across draws; 0 with a single draw
        shift = [x - self.norms[0] for x in self.norms]  # exactly 0 for identical draws
        mean_shift = sum(shift) / self.n
        norm_mean = self.norms[0] + mean_shift
        var_norm = sum((x - mean_shift) ** 2 for x in shift) / dof
        trace = self.m2 / dof
        mean_sq = float(torch.dot(self.mean, self.mean))
        rel = trace / mean_sq if mean_sq > 0 else (0.0 if trace == 0 else math.inf)
        return {"var_norm": var_norm, "norm_mean": norm_mean, "cov_trace": trace, "rel_var": rel}


def _flat(params: List[torch.nn.Parameter]) -> torch.Tensor:
    """(P,) float64: the parameters' gradients concatenated (zeros where a parameter got none)."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).double() for p in params])


@contextlib.contextmanager
def _untouched(rag):
    """Restore afterwards everything a loss/backward draw can change besides the parameters."""
    rng = rng_state()
    grads = [(p, p.grad) for p in rag.parameters()]
    modes = [(m, m.training) for m in rag.modules()]
    buffers = [(b, b.detach().clone()) for b in rag.buffers()]
    ledger = rag.ledger.state_dict()
    extra = copy.deepcopy(rag.strategy.extra_state())
    try:
        yield
    finally:
        set_rng_state(rng)
        for p, g in grads:
            p.grad = g
        for m, mode in modes:
            m.training = mode
        with torch.no_grad():
            for b, v in buffers:
                b.copy_(v)
        rag.ledger.load_state_dict(ledger)
        rag.strategy.load_extra_state(extra)


def _total_flops(ledger) -> float:
    return ledger.totals(include_time=False)["flops"]["total"]


def gradient_variance(
    rag,
    batches: Sequence[Sequence],
    ctx: StepContext,
    draws: int = 8,
    components: Optional[Sequence[str]] = None,
    autocast: Callable[[], ContextManager] = contextlib.nullcontext,
) -> dict:
    """Spread of `rag.strategy.loss`'s gradient over `draws` draws on each of the fixed `batches`.

    rag: the (unwrapped) RAGPipeline, with requires_grad set as the phase trains it (the trainer's
    state); ctx.phase's train modes are applied for the draws (dropout as in training), the others
    restored afterwards. components: the ones to report (default: every component with a parameter
    that requires grad); only parameters that require grad count. A `LossSum` is taken as
    total / count. Per batch and component (g: the flattened gradient of one draw, unbiased across
    draws): var_norm = Var ||g||, norm_mean = E ||g||, cov_trace = E ||g - E g||^2 (the trace of the
    gradient covariance), rel_var = cov_trace / ||E g||^2; each averaged over batches.

    Returns {"components": {component: {var_norm, norm_mean, cov_trace, rel_var}}, "draws": int,
    "batches": int, "flops": the diagnostic's own FLOPs (never charged to the ledger)}.
    """
    if draws < 1 or not batches:
        raise ValueError(f"gradient_variance needs draws >= 1 and at least one batch (got {draws}, {len(batches)})")
    groups = rag.component_params()
    if components is None:
        components = sorted(c for c, ps in groups.items() if any(p.requires_grad for p in ps))
    params = {c: [p for p in groups[c] if p.requires_grad] for c in components}
    params = {c: ps for c, ps in params.items() if ps}
    trainable = [p for p in rag.parameters() if p.requires_grad]
    out = {c: dict.fromkeys(STATS, 0.0) for c in params}
    with _untouched(rag):
        if ctx.phase is not None:
            rag.set_modes(ctx.phase.trains)
        flops0 = _total_flops(rag.ledger)
        state = copy.deepcopy(rag.strategy.extra_state())
        for batch in batches:
            acc = {c: _Welford() for c in params}
            for _ in range(draws):
                # every draw starts from the same strategy state (e.g. a sample cache): draws of a
                # chain that resumes from the previous draw's sample would be correlated, biasing the
                # variance low
                rag.strategy.load_extra_state(copy.deepcopy(state))
                for p in trainable:
                    p.grad = None
                with torch.enable_grad(), autocast():
                    res, _ = rag.strategy.loss(batch, rag, ctx)
                loss = res.total / res.count if isinstance(res, LossSum) else res
                if loss.requires_grad:
                    loss.backward()
                for c, ps in params.items():
                    acc[c].add(_flat(ps))
            for c in params:
                for k, v in acc[c].stats().items():
                    out[c][k] += v / len(batches)
        flops = _total_flops(rag.ledger) - flops0
    return {"components": out, "draws": draws, "batches": len(batches), "flops": flops}


def metrics_row(result: dict) -> Dict[str, float]:
    """`gradient_variance`'s result as metrics.jsonl keys: grad_var/<component> (Var ||g||),
    grad_norm_mean/<component>, grad_cov_trace/<component>, grad_rel_var/<component>,
    grad_var_draws, grad_var_batches and grad_var_flops."""
    row: Dict[str, float] = {}
    for comp, stats in sorted(result["components"].items()):
        row.update({f"{METRIC_KEYS[k]}/{comp}": v for k, v in stats.items()})
    row.update(grad_var_draws=result["draws"], grad_var_batches=result["batches"], grad_var_flops=result["flops"])
    return row
