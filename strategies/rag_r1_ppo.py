"""`rag_r1` stage 2 by PPO with a critic (`strategy.algorithm=ppo`): PPO (Schulman et al. 2017,
"Proximal Policy Optimization Algorithms", arXiv 1707.06347) with generalised advantage estimation
(GAE; Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage
Estimation", arXiv 1506.02438), as RAG-R1 and Search-R1 train it in veRL. Everything else (the
rollouts, the reward, the reference model, the SFT stage) is `strategies/rag_r1.py`'s.

The critic: a trainable part `critic` (`strategies/value_model.py`: a copy of the generator's
decoder plus a scalar value head; `lr_like="generator"`, so `train.lr.critic` may override the
rate). Built in `setup` (the head drawn from the seeded RNG there); its trunk is copied from the
generator in `on_phase_start` of the rl phase when the phase is not resumed, i.e. from the SFT
result, exactly when the `reference` part is snapshotted, and never re-copied on resume (the
checkpoint restored it). The rl phase trains {generator, critic}; the sft phase never touches the
critic. Under `algorithm=grpo` no critic exists (no part, no parameter, no RNG draw).

Collection (`experience`, no grad), per kept rollout (one with at least one generated token):
- values V(s_t) from the critic at every model token (loss mask 1), charged as `score` under
  "critic"; V(s_t) is read at the position whose state chose token t, aligned with the log-probs;
- token rewards: the rollout's reward (EM + format term, computed as for GRPO) on its LAST model
  token; with `kl_in_reward=true` also -beta * (log pi_old - log pi_ref) on every model token (the
  k1 estimator of TRL's PPOTrainer and veRL's `kl_penalty="kl"`), and then no KL term in the loss;
  with the default `kl_in_reward=false` the KL stays the loss term GRPO uses (beta * k3 to the
  reference), so grpo and ppo differ in the advantage estimator only;
- GAE (`losses.gae`, `gamma`, `lam`) over the model tokens only: retrieved <information> tokens and
  the forced "<answer>" are part of the environment's transition, not actions, so they are not
  discount steps; the next model token's value bootstraps across them. With the defaults gamma =
  lam = 1 (Search-R1 / veRL's PPO settings) the advantage of a token is the return minus its value,
  which is the same whether observation tokens count as steps or not (telescoping); gamma or lam
  below 1 discount per model token only;
- advantages whitened (`whiten_advantages`, default true as in veRL / TRL) over every model token
  of the collection, across ranks (`rag.gather`): (A - mean) / sqrt(var + 1e-8), unbiased var;
  returns R = A_raw + V are never whitened.

Loss (`loss`, with grad): the clipped surrogate over the model tokens (`losses.grpo_loss` with
per-token advantages: clip `eps_low` / `eps_high`, plus beta * k3 unless `kl_in_reward`) plus
`vf_coef` x the clipped value loss (`losses.clipped_value_loss`, `cliprange_value`; 0 disables the
clipping), both reduced by the same `reduction` (see rag_r1's docstring) into one
`LossSum(total, count)`, so any split into micro-batches and ranks (gradient accumulation 2x4)
equals one large batch (1x8). Observation and forced tokens are selected away in both terms
(exactly zero gradient). At one update per collection the old policy and the old values are the
current ones (`logp.detach()`, `values.detach()`): the ratio is exactly 1 and the value clipping
is inactive, whatever float noise separates them from the collection-time numbers; with
`updates` > 1 the sampling log-probs and the collection-time values are the anchors.

Logged per collection: value (mean V), return (mean R), explained_variance (1 - Var(R - V) /
Var(R), veRL's vf_explained_var), kl_reward (mean k1, with kl_in_reward); per step the policy
stats of `grpo_loss` (kl, clip_fraction, ratio), value_loss (the per-token clipped value loss
averaged over model tokens), value_clip_fraction and model_tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ragtune import losses
from ragtune.strategy import LossSum

from .value_model import ValueModel

CRITIC = "critic"  # the part's name: its parameters, checkpoint prefix and ledger component


@dataclass
class PPOExperience:
    """One collected rollout with its per-token targets (lists of len(ids), 0 off the model tokens)."""

    qid: str
    prompt_ids: List[int]
    ids: List[int]
    loss_mask: List[int]
    old_logprobs: List[float]  # sampling log-probs
    ref_logprobs: Optional[List[float]]  # the frozen reference's (None when beta = 0)
    old_values: List[float]  # V(s_t) at collection time
    advantages: List[float]  # GAE, whitened when whiten_advantages
    returns: List[float]  # value targets A_raw + V
    reward: float


def build_critic(rag) -> ValueModel:
    """The critic part: a copy of the generator's decoder and a fresh value head."""
    return ValueModel.from_generator(rag.generator, CRITIC)


# ---- pure functions ---------------------------------------------------------------------------
def token_rewards(reward: torch.Tensor, mask: torch.Tensor, kl: Optional[torch.Tensor], beta: float) -> torch.Tensor:
    """Per-token rewards: `reward[n]` on row n's last model token (a row without one gets none),
    plus -beta * kl on every model token when `kl` is given; 0 off the model tokens.

    reward (N,), mask (N, T), kl (N, T) | None -> (N, T)
    """
    keep = mask != 0
    zero = torch.zeros((), dtype=torch.float32)
    r = torch.zeros(mask.shape, dtype=torch.float32)
    if kl is not None:
        r = torch.where(keep, -beta * kl.float(), zero)
    if r.numel() == 0:
        return r
    T = mask.shape[1]
    last = T - 1 - keep.flip(-1).int().argmax(-1)  # (N,): index of the last model token
    has = keep.any(-1)  # (N,)
    rows = torch.arange(mask.shape[0])[has]
    r[rows, last[has]] += reward.float()[has]
    return r


def whiten(adv: torch.Tensor, mask: torch.Tensor, gather: Callable[[object], list] = lambda x: [x]) -> torch.Tensor:
    """(A - mean) / sqrt(var + 1e-8) with the mean and unbiased variance over the model tokens of
    every rank's collection (`gather`: rag.gather; one call per statistic, made by every rank even
    with no tokens); one token overall is only centred. 0 off the model tokens.

    adv (N, T), mask (N, T) -> (N, T)
    """
    keep = mask != 0
    a = adv.double()[keep]  # (M,)
    stats = gather((float(a.sum()), int(a.numel())))
    n = sum(c for _, c in stats)
    if n == 0:
        return torch.zeros_like(adv)
    mean = sum(s for s, _ in stats) / n
    sq = sum(gather(float(((a - mean) ** 2).sum())))
    out = adv.double() - mean
    if n > 1:
        out = out / math.sqrt(sq / (n - 1) + 1e-8)
    return torch.where(keep, out.to(adv.dtype), torch.zeros((), dtype=adv.dtype))


def value_loss_sum(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
    reduction: str,
    max_len: int,
) -> Tuple[torch.Tensor, float]:
    """`losses.clipped_value_loss` (a token mean) as (total, count) with the policy loss's
    `reduction`, so that sum(total) / sum(count) over any split of the rows is that reduction over
    all of them: `sequence` sums the per-row means (count rows), `token` the per-token losses
    (count tokens), `constant` the per-token losses / max_len (count rows), `sum` the per-token
    losses (count rows).

    values, old_values, returns, mask (N, T) -> (scalar, float)
    """
    keep = mask != 0
    n_rows, n_tok = float(values.shape[0]), float(keep.sum())
    if reduction == "sequence":
        rows = [
            losses.clipped_value_loss(
                values[i : i + 1], old_values[i : i + 1], returns[i : i + 1], keep[i : i + 1], clip
            )
            for i in range(values.shape[0])
        ]
        return (torch.stack(rows).sum() if rows else values.sum() * 0.0), n_rows
    summed = losses.clipped_value_loss(values, old_values, returns, keep, clip) * n_tok
    if reduction == "token":
        return summed, n_tok
    if reduction == "constant":
        return summed / max_len, n_rows
    if reduction == "sum":
        return summed, n_rows
    raise ValueError(f"reduction must be one of {losses.RL_REDUCTIONS}, got {reduction!r}")


def ppo_loss_sum(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: Optional[torch.Tensor],
    adv: torch.Tensor,
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float,
    eps_low: float,
    eps_high: float,
    vf_coef: float,
    cliprange_value: float,
    reduction: str,
    max_len: int,
) -> Tuple[torch.Tensor, float, Dict[str, float]]:
    """Clipped surrogate (+ beta * k3 when `ref_logp` is given) + vf_coef * clipped value loss, as
    (total, count, stats) exact under any split of the rows (both terms share the count).

    logp, old_logp, ref_logp, adv, values, old_values, returns, mask (N, T) -> (scalar, float, dict)
    """
    from .rag_r1 import policy_loss_sum  # rag_r1 imports this module: resolved at call time

    beta = beta if ref_logp is not None else 0.0
    total, count, stats = policy_loss_sum(
        logp, old_logp, ref_logp, adv, mask, beta, eps_low, eps_high, reduction, max_len
    )
    v_total, _ = value_loss_sum(values, old_values, returns, mask, cliprange_value, reduction, max_len)
    with torch.no_grad():
        keep = mask != 0
        n_tok = max(float(keep.sum()), 1.0)
        v, old, ret = values.detach(), old_values.detach().to(values.dtype), returns.to(values.dtype)
        clipped = old + torch.clamp(v - old, -cliprange_value, cliprange_value)
        wins = ((clipped - ret) ** 2 > (v - ret) ** 2) & keep if cliprange_value > 0 else torch.zeros_like(keep)
        stats.update(
            value_loss=float(losses.clipped_value_loss(v, old, ret, keep, cliprange_value)),
            value_clip_fraction=float(wins.sum()) / n_tok,
            value=float(torch.where(keep, v, torch.zeros_like(v)).sum()) / n_tok,
        )
    return total + vf_coef * v_total, count, stats


def _padded(rows: Sequence[Sequence[float]], N: int, T: int) -> torch.Tensor:
    """(N, T) float32, rows left-aligned, 0 after each row."""
    out = torch.zeros((N, T), dtype=torch.float32)
    for n, row in enumerate(rows):
        out[n, : len(row)] = torch.tensor(list(row), dtype=torch.float32)
    return out


def _masked_mean(x: torch.Tensor, keep: torch.Tensor) -> float:
    return float(x[keep].double().mean()) if bool(keep.any()) else 0.0


# ---- the strategy's PPO steps -----------------------------------------------------------------
def experience(s, rag, batch, trajs, keep: List[int], rewards: List[float], ref: Dict[int, List[float]]):
    """PPOExperience of the kept rollouts `keep` of a collection (no grad) and its logs."""
    o, G = s.opts, s.opts.group_size
    rows = [trajs[j] for j in keep]
    if rows:
        values, mask = s.critic.values([t.prompt_ids for t in rows], [t.ids for t in rows], [t.loss_mask for t in rows])
        values, mask = values.float().cpu(), mask.cpu()  # (N, T)
    else:
        values = mask = torch.zeros((0, 0))
    N, T = mask.shape
    on = mask != 0
    kl = None
    if o.kl_in_reward and o.beta > 0 and rows:
        old = _padded([t.logprobs for t in rows], N, T)
        kl = torch.where(on, old - _padded([ref[j] for j in keep], N, T), torch.zeros(()))  # k1, (N, T)
    r = token_rewards(torch.tensor([rewards[j] for j in keep], dtype=torch.float32), mask, kl, o.beta)
    adv, ret = losses.gae(r, values, mask, o.gamma, o.lam)  # (N, T) each, 0 off the model tokens
    white = whiten(adv, mask, rag.gather) if o.whiten_advantages else adv
    items = [
        PPOExperience(
            batch[j // G].id,
            t.prompt_ids,
            t.ids,
            t.loss_mask,
            t.logprobs,
            ref.get(j),
            values[n, : len(t.ids)].tolist(),
            white[n, : len(t.ids)].tolist(),
            ret[n, : len(t.ids)].tolist(),
            rewards[j],
        )
        for n, (j, t) in enumerate(zip(keep, rows))
    ]
    var_r = float(ret[on].double().var()) if int(on.sum()) > 1 else 0.0
    var_e = float((ret - values)[on].double().var()) if int(on.sum()) > 1 else 0.0
    logs = {
        "value": _masked_mean(values, on),
        "return": _masked_mean(ret, on),
        "explained_variance": 1.0 - var_e / (var_r + 1e-5),
    }
    if kl is not None:
        logs["kl_reward"] = _masked_mean(kl, on)
    return items, logs


def loss(s, items: List[PPOExperience], rag):
    """The PPO loss of a micro-batch of experience, as a LossSum (see the module docstring)."""
    o = s.opts
    contexts, targets, masks = [e.prompt_ids for e in items], [e.ids for e in items], [e.loss_mask for e in items]
    logp, mask = rag.generator.token_logprobs(contexts, targets, masks, temperature=o.temperature)
    values, _ = s.critic.values(contexts, targets, masks)  # (N, T)
    N, T = logp.shape

    def padded(rows, like):
        return _padded(rows, N, T).to(device=like.device, dtype=like.dtype)

    # one update per collection: the old policy and values are the current ones (ratio exactly 1,
    # value clipping inactive); the collection-time numbers agree only to float noise
    old = logp.detach() if o.updates == 1 else padded([e.old_logprobs for e in items], logp)
    old_v = values.detach() if o.updates == 1 else padded([e.old_values for e in items], values)
    kl_loss = o.beta > 0 and not o.kl_in_reward
    ref = padded([e.ref_logprobs for e in items], logp) if kl_loss else None
    total, count, stats = ppo_loss_sum(
        logp,
        old,
        ref,
        padded([e.advantages for e in items], logp),
        values,
        old_v,
        padded([e.returns for e in items], values),
        mask,
        beta=o.beta,
        eps_low=o.eps_low,
        eps_high=o.eps_high,
        vf_coef=o.vf_coef,
        cliprange_value=o.cliprange_value,
        reduction=o.reduction,
        max_len=(o.max_turns + 1) * o.max_turn_tokens,
    )
    return LossSum(total, count), {**stats, "model_tokens": float((mask != 0).sum()) / N}
