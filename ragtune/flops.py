"""FLOP formulas: what one transformer call costs, from its shape and the real token counts.

What: `ModelShape` (the matmul weights of a model, split into body, LM head and once-per-sequence
pooler) and three formulas over (padded) sequence lengths: `forward_flops`, `backward_flops`
(`train_flops` = both) and `generate_flops` (KV-cached decoding); `search_flops` estimates an index
search per backend. The LM head is handled here
once: every formula takes the number of positions per sequence the head runs on
(`head_positions`; all of them by default), so a wrapper that scores only the answer positions or
a prefill that keeps one logit never re-derives the head's share.

Why a formula and not a profiler: it is free at run time, deterministic (a resumed run ends with a
bit-identical ledger), identical across hardware, and `tests/core/test_cost.py` checks it against
`torch.utils.flop_counter.FlopCounterMode` (exact for forward, full training and generation; an
upper bound for LoRA / partially frozen training). Results are exact Python ints. The derivation
is in docs/cost.md.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Iterable, List, Optional, Sequence

import torch

__all__ = ["ModelShape", "forward_flops", "backward_flops", "train_flops", "generate_flops", "search_flops"]


@dataclass(frozen=True)
class ModelShape:
    """What the formulas need to know about one transformer.

    `matmul_params`: weights of every matmul applied at every position (all `nn.Linear` and
    transformers `Conv1D`, including the LM head and peft `lora_A` / `lora_B`); embeddings, biases
    and norms do no matmul and are excluded. `head_params`: the LM head's share of them.
    `pooler_params`: matmuls applied once per sequence (BERT's pooler), NOT in `matmul_params`.
    Each has a `trainable_*` part (weights with requires_grad).
    """

    n_layers: int
    d_attn: int  # n_heads * head_dim: width of Q/K/V inside the attention matmuls
    matmul_params: int
    trainable_matmul_params: int
    head_params: int = 0
    pooler_params: int = 0
    trainable_pooler_params: int = 0
    trainable_head_params: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"ModelShape.{f.name} must be a non-negative int, got {v!r}")
        for part, whole in (
            ("trainable_matmul_params", "matmul_params"),
            ("head_params", "matmul_params"),
            ("trainable_head_params", "head_params"),
            ("trainable_head_params", "trainable_matmul_params"),
            ("trainable_pooler_params", "pooler_params"),
        ):
            if getattr(self, part) > getattr(self, whole):
                raise ValueError(f"ModelShape.{part} exceeds {whole}")

    @property
    def trainable(self) -> bool:
        """Some matmul weight requires grad (a forward under grad mode is then a training call)."""
        return self.trainable_matmul_params + self.trainable_pooler_params > 0

    @classmethod
    def of(
        cls,
        model: torch.nn.Module,
        n_layers: Optional[int] = None,
        d_attn: Optional[int] = None,
        *,
        pooler_names: Iterable[str] = ("pooler",),
    ) -> ModelShape:
        """Count the matmul weights of `model` (deduplicated modules: one call site each).

        `n_layers` / `d_attn` default to `model.config`. Modules under a submodule named in
        `pooler_names` are per-sequence; `model.get_output_embeddings()` is the LM head.
        """
        try:  # GPT-2 style Conv1D (weight stored in x out)
            from transformers.pytorch_utils import Conv1D
        except Exception:  # pragma: no cover - transformers is a dependency
            Conv1D = torch.nn.Linear
        cfg = getattr(model, "config", None)
        n_layers = _config_n_layers(cfg) if n_layers is None else n_layers
        d_attn = _config_d_attn(cfg) if d_attn is None else d_attn
        get_out = getattr(model, "get_output_embeddings", None)
        try:
            head_module = get_out() if callable(get_out) else None
        except Exception:
            head_module = None
        pooler_names = set(pooler_names)
        # (all, trainable) weight counts per group
        c = {"matmul": [0, 0], "head": [0, 0], "pooler": [0, 0]}
        for name, module in model.named_modules():
            if not isinstance(module, (torch.nn.Linear, Conv1D)):
                continue
            n = weight_numel(module.weight)
            t = n if module.weight.requires_grad else 0
            groups = (
                ["pooler"]
                if pooler_names.intersection(name.split("."))
                else ["matmul", "head"]
                if module is head_module
                else ["matmul"]
            )
            for g in groups:
                c[g][0] += n
                c[g][1] += t
        return cls(
            int(n_layers),
            int(d_attn),
            c["matmul"][0],
            c["matmul"][1],
            head_params=c["head"][0],
            pooler_params=c["pooler"][0],
            trainable_pooler_params=c["pooler"][1],
            trainable_head_params=c["head"][1],
        )


def weight_numel(w: torch.Tensor) -> int:
    """Elements of a weight as the model computes with it: a ZeRO-3 parameter that is partitioned
    at the time of counting holds an empty local tensor, and `ds_numel` is its full size."""
    return int(getattr(w, "ds_numel", w.numel()))


def _config_n_layers(cfg: Any) -> int:
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(getattr(cfg, attr, None), int):
            return getattr(cfg, attr)
    raise ValueError("n_layers not given and not found in model.config")


def _config_d_attn(cfg: Any) -> int:
    heads = next(
        (getattr(cfg, a) for a in ("num_attention_heads", "n_head") if isinstance(getattr(cfg, a, None), int)), None
    )
    hidden = next(
        (getattr(cfg, a) for a in ("hidden_size", "n_embd", "d_model") if isinstance(getattr(cfg, a, None), int)), None
    )
    head_dim = getattr(cfg, "head_dim", None)
    if heads is None or (not isinstance(head_dim, int) and hidden is None):
        raise ValueError("d_attn not given and not found in model.config")
    return heads * (head_dim if isinstance(head_dim, int) else hidden // heads)


def _lens(seq_lens: Sequence[int]) -> List[int]:
    out = []
    for L in seq_lens:
        if int(L) != L or L < 0:
            raise ValueError(f"sequence lengths must be non-negative integers, got {L!r}")
        out.append(int(L))
    return out


def _head_rows(L: int, head_positions: Optional[int]) -> int:
    return L if head_positions is None else min(int(head_positions), L)


def forward_flops(shape: ModelShape, seq_lens: Sequence[int], head_positions: Optional[int] = None) -> int:
    """One forward pass, summed over sequences of (padded) length L:

        2*(N - H)*L + 2*H*h + 4*n_layers*d_attn*L^2 + 2*N_pool

    N = matmul_params, H = head_params, h = positions the LM head runs on (`head_positions`,
    default all L). The attention term is QK^T and AV (2*L*L*d_attn each, per layer), the full
    square even under a causal mask (eager attention computes it).
    """
    P, H, A = shape.matmul_params, shape.head_params, shape.n_layers * shape.d_attn
    return sum(
        2 * (P - H) * L + 2 * H * _head_rows(L, head_positions) + 4 * A * L * L + 2 * shape.pooler_params
        for L in _lens(seq_lens)
        if L
    )


def backward_flops(shape: ModelShape, seq_lens: Sequence[int], head_positions: Optional[int] = None) -> int:
    """One backward pass, summed over sequences: input grads of every matmul (as forward), two
    matmuls per attention matmul, and weight grads of the trainable weights:

        2*(N - H)*L + 2*H*h + 8*n_layers*d_attn*L^2 + 2*(N_t - H_t)*L + 2*H_t*h
        + 2*N_pool + 2*N_pool_t

    Fully trainable: exactly 2 x forward (the "6N" rule). When the earliest layers' inputs need no
    grad (frozen embeddings + frozen first layers, LoRA) autograd skips some input-grad matmuls,
    so this is an upper bound there (within 35% on a LoRA-adapted tiny Llama, tested).
    """
    P, H, A = shape.matmul_params, shape.head_params, shape.n_layers * shape.d_attn
    Pt, Ht = shape.trainable_matmul_params, shape.trainable_head_params
    total = 0
    for L in _lens(seq_lens):
        if L:
            h = _head_rows(L, head_positions)
            total += (
                2 * (P - H) * L
                + 2 * H * h
                + 8 * A * L * L
                + 2 * (Pt - Ht) * L
                + 2 * Ht * h
                + 2 * shape.pooler_params
                + 2 * shape.trainable_pooler_params
            )
    return total


def train_flops(shape: ModelShape, seq_lens: Sequence[int], head_positions: Optional[int] = None) -> int:
    """forward + backward."""
    return forward_flops(shape, seq_lens, head_positions) + backward_flops(shape, seq_lens, head_positions)


def generate_flops(
    shape: ModelShape, prompt_lens: Sequence[int], new_tokens: Sequence[int], *, logits_to_keep: Optional[int] = 1
) -> int:
    """KV-cached decoding of n >= 1 new tokens after a prompt of padded length p, per sequence:

        prefill  = forward over p positions, LM head on the last `logits_to_keep` (HF passes 1;
                   None = all); it yields the first new token
        step i   = 2*N + 4*n_layers*d_attn*(p + i)   for i = 1 .. n-1 (one token, context p+i)

    The last new token is never fed back. In a batch every row runs as many steps as the longest
    one: pass the padded prompt length and the number of steps for every row.
    """
    A = shape.n_layers * shape.d_attn
    plens, nlens = _lens(prompt_lens), _lens(new_tokens)
    if len(plens) != len(nlens):
        raise ValueError("prompt_lens and new_tokens must have the same length")
    total = 0
    for p, n in zip(plens, nlens):
        if n and not p:
            raise ValueError("generation needs a non-empty prompt")
        if not n:
            continue
        steps = n - 1
        ctx_sum = steps * p + steps * (steps + 1) // 2  # sum_{i=1..steps} (p + i)
        total += forward_flops(shape, [p], logits_to_keep) + steps * 2 * shape.matmul_params + 4 * A * ctx_sum
    return total


def search_flops(backend: str, n_queries: int, n_passages: int, dim: int, cfg: Any = None) -> int:
    """Estimated FLOPs of one index search of `n_queries` queries over `n_passages` of width `dim`
    (2 FLOPs per multiply-add of the inner products; the top-k selection is not counted).
    `backend` is the one searched: `auto` is resolved first (`DenseIndex.plan`, whose parameters
    `cfg` may be: it has `ivf_nlist`, `ivf_nprobe` and `hnsw_m`).

    - exact / faiss_flat: every passage is scored: 2 * Q * N * d.
    - faiss_ivf: the query against the `nlist` centroids, then the `nprobe` probed lists of about
      N / nlist passages each: 2 * Q * d * (nlist + nprobe * N / nlist), with nlist as
      `DenseIndex` builds it (min(ivf_nlist, N // 39); `auto`: the power of two nearest sqrt(N),
      nprobe = auto_nprobe). An estimate: real lists are unequal, and faiss skips nothing inside
      a probed list.
    - faiss_hnsw: a graph walk of about efSearch (faiss's default 16) candidates whose 2 * M
      bottom-layer neighbours are scored each, plus one per upper layer (log2 N): an estimate,
      2 * Q * d * (16 * 2 * M + log2 N), not a count.
    """
    q, n, d = int(n_queries), int(n_passages), int(dim)
    if backend in ("exact", "faiss_flat"):
        return 2 * q * n * d
    if backend == "faiss_ivf":
        nlist = min(int(cfg.ivf_nlist), max(1, n // 39))
        nprobe = min(int(cfg.ivf_nprobe), nlist)
        return 2 * q * d * (nlist + -(-nprobe * n // nlist))
    if backend == "faiss_hnsw":
        return 2 * q * d * (16 * 2 * int(cfg.hnsw_m) + max(1, n).bit_length())
    if backend == "auto":
        raise ValueError("search_flops needs the backend searched: resolve 'auto' first (DenseIndex.plan)")
    raise ValueError(f"unknown index backend {backend!r}")
