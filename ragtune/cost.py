"""Compute ledger: analytic FLOPs, token counts, wall-clock and memory per phase.

What
----
Every *model wrapper* (retriever ``encode``, generator log-probs / ``generate``,
index refresh) charges each call it makes to a :class:`Ledger`; strategies
never charge anything themselves.  A charge is keyed by ``(component, kind)``
where ``kind`` is one of :data:`KINDS`:

* ``train``    - forward + backward of a component that is being trained;
* ``score``    - no-grad forward (proposal scoring, reference models, ...);
* ``generate`` - autoregressive decoding (prefill + KV-cached steps);
* ``index``    - corpus (re-)embedding;
* ``eval``     - anything charged inside :meth:`Ledger.evaluating`; reported,
  but kept out of the training cost (``total_train``).

The leaderboard reads :meth:`Ledger.totals`: FLOPs per kind and in total,
seconds per kind, wall seconds per trainer phase, peak memory and
device-hours together with the device name.

Why an analytic formula
-----------------------
FLOPs come from a documented formula over the real token counts of each call
(:func:`forward_flops`, :func:`backward_flops`, :func:`generate_flops`), not
from a profiler: it is free at run time, deterministic (so resumed runs end
with bit-identical ledgers), identical across hardware, and it is checked in
``tests/test_cost.py`` against ``torch.utils.flop_counter.FlopCounterMode``
(exact for forward, full training and generation; an upper bound for LoRA /
partially frozen training, see :func:`backward_flops`).  FLOPs are reported
*next to* wall-clock, never merged into one number: decoding reaches far fewer
FLOP/s than batched training, so neither measure stands in for the other.
See ``docs/cost.md`` for the full definitions.

Exactness
---------
The formula functions return exact Python ``int`` values (usable wherever a
float is expected).  The ledger stores integral FLOPs as ``int`` so sums are
exact and independent of summation / merge order; ``state_dict`` contains only
plain ``str`` / ``int`` / ``float`` / ``list`` / ``dict`` values and survives
``json`` and ``torch.save(..., weights_only=True)`` unchanged.
"""

from __future__ import annotations

import math
import os
import platform
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import torch

__all__ = [
    "KINDS",
    "TRAINING_KINDS",
    "ModelShape",
    "forward_flops",
    "backward_flops",
    "train_flops",
    "generate_flops",
    "flops_for",
    "batch_lengths",
    "ChargeRecord",
    "Ledger",
    "device_name",
]

KINDS: tuple[str, ...] = ("train", "score", "generate", "index", "eval")
# Kinds that make up the training cost ("total_train"); "eval" is reported separately.
TRAINING_KINDS: tuple[str, ...] = ("train", "score", "generate", "index")

_STATE_VERSION = 1


# --------------------------------------------------------------------------- #
# Model shape and FLOP formulas
# --------------------------------------------------------------------------- #


def _is_matmul_module(module: torch.nn.Module, conv1d_cls: type | None) -> bool:
    if isinstance(module, torch.nn.Linear):
        return True
    return conv1d_cls is not None and isinstance(module, conv1d_cls)


@dataclass(frozen=True)
class ModelShape:
    """What the FLOP formula needs to know about one transformer.

    ``matmul_params`` counts the weights of every matmul applied at *every*
    position: all ``nn.Linear`` and transformers ``Conv1D`` layers, including
    the LM head and peft LoRA ``lora_A`` / ``lora_B`` layers; embeddings,
    biases and norms are excluded (they do no matmul).

    Two refinements keep the formula exact on real HF models:

    * ``head_params`` - the part of ``matmul_params`` that is the output
      embedding (LM head).  ``generate`` computes logits only for the last
      prompt position during prefill (``logits_to_keep=1``).
    * ``pooler_params`` - matmul weights applied once per *sequence* (BERT's
      pooler acts on the first token only).  They are **not** part of
      ``matmul_params``.
    """

    n_layers: int
    d_attn: int  # n_heads * head_dim: width of Q/K/V inside the attention matmuls
    matmul_params: int  # per-position matmul weights (incl. LM head and LoRA A/B)
    trainable_matmul_params: int  # those with requires_grad
    head_params: int = 0  # LM head weights (subset of matmul_params)
    pooler_params: int = 0  # once-per-sequence matmul weights (NOT in matmul_params)
    trainable_pooler_params: int = 0

    def __post_init__(self) -> None:
        for name in (
            "n_layers",
            "d_attn",
            "matmul_params",
            "trainable_matmul_params",
            "head_params",
            "pooler_params",
            "trainable_pooler_params",
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"ModelShape.{name} must be a non-negative int, got {v!r}")
        if self.trainable_matmul_params > self.matmul_params:
            raise ValueError("trainable_matmul_params exceeds matmul_params")
        if self.head_params > self.matmul_params:
            raise ValueError("head_params exceeds matmul_params")
        if self.trainable_pooler_params > self.pooler_params:
            raise ValueError("trainable_pooler_params exceeds pooler_params")

    @classmethod
    def of(
        cls,
        model: torch.nn.Module,
        n_layers: int | None = None,
        d_attn: int | None = None,
        *,
        pooler_names: Iterable[str] = ("pooler",),
    ) -> "ModelShape":
        """Count matmul weights of ``model``.

        ``n_layers`` / ``d_attn`` default to ``model.config`` values
        (``num_hidden_layers``; ``num_attention_heads * head_dim``).  Every
        ``nn.Linear`` / ``Conv1D`` module counts once per call site (modules
        are deduplicated, so a module reused twice in a forward would be
        under-counted - no HF model used here does that).  Modules under a
        submodule whose name is in ``pooler_names`` are per-sequence; the
        module returned by ``model.get_output_embeddings()`` is the LM head.
        Trainable = ``weight.requires_grad``.
        """
        try:  # transformers' GPT-2 style "Conv1D" (weight stored as in x out)
            from transformers.pytorch_utils import Conv1D as conv1d_cls  # type: ignore
        except Exception:  # pragma: no cover - transformers always present in ragtune
            conv1d_cls = None

        cfg = getattr(model, "config", None)
        if n_layers is None:
            n_layers = _config_n_layers(cfg)
        if d_attn is None:
            d_attn = _config_d_attn(cfg)

        head_module = None
        get_out = getattr(model, "get_output_embeddings", None)
        if callable(get_out):
            try:
                head_module = get_out()
            except Exception:
                head_module = None

        pooler_names = set(pooler_names)
        matmul = trainable = head = pooler = trainable_pooler = 0
        for name, module in model.named_modules():
            if not _is_matmul_module(module, conv1d_cls):
                continue
            n = int(module.weight.numel())
            req = bool(module.weight.requires_grad)
            if pooler_names.intersection(name.split(".")):
                pooler += n
                trainable_pooler += n if req else 0
                continue
            matmul += n
            trainable += n if req else 0
            if module is head_module:
                head += n
        return cls(
            n_layers=int(n_layers),
            d_attn=int(d_attn),
            matmul_params=matmul,
            trainable_matmul_params=trainable,
            head_params=head,
            pooler_params=pooler,
            trainable_pooler_params=trainable_pooler,
        )

    def frozen(self) -> "ModelShape":
        """The same shape with nothing trainable (e.g. a reference model)."""
        return ModelShape(
            n_layers=self.n_layers,
            d_attn=self.d_attn,
            matmul_params=self.matmul_params,
            trainable_matmul_params=0,
            head_params=self.head_params,
            pooler_params=self.pooler_params,
            trainable_pooler_params=0,
        )


def _config_n_layers(cfg: Any) -> int:
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int):
            return v
    raise ValueError("n_layers not given and not found in model.config")


def _config_d_attn(cfg: Any) -> int:
    heads = None
    for attr in ("num_attention_heads", "n_head"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int):
            heads = v
            break
    hidden = None
    for attr in ("hidden_size", "n_embd", "d_model"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int):
            hidden = v
            break
    if heads is None:
        raise ValueError("d_attn not given and not found in model.config")
    head_dim = getattr(cfg, "head_dim", None)
    if not isinstance(head_dim, int):
        if hidden is None:
            raise ValueError("d_attn not given and not found in model.config")
        head_dim = hidden // heads
    return heads * head_dim


def _lens(seq_lens: Sequence[int] | torch.Tensor | int) -> list[int]:
    if isinstance(seq_lens, torch.Tensor):
        seq_lens = seq_lens.reshape(-1).tolist()
    elif isinstance(seq_lens, int):
        seq_lens = [seq_lens]
    out = []
    for L in seq_lens:
        Li = int(L)
        if Li != L or Li < 0:
            raise ValueError(f"sequence lengths must be non-negative integers, got {L!r}")
        out.append(Li)
    return out


def forward_flops(shape: ModelShape, seq_lens: Sequence[int]) -> int:
    """FLOPs of one forward pass, summed over sequences of length ``L``.

    per sequence:  2 * matmul_params * L          (every Linear, incl. LM head)
                 + 4 * n_layers * d_attn * L**2   (QK^T and AV: 2*L*L*d each, per layer;
                                                   the full square even under a causal mask)
                 + 2 * pooler_params              (once-per-sequence matmuls)

    ``L`` is the *padded* length (positions actually computed).
    """
    P, A = shape.matmul_params, shape.n_layers * shape.d_attn
    total = 0
    for L in _lens(seq_lens):
        if L == 0:
            continue
        total += 2 * P * L + 4 * A * L * L + 2 * shape.pooler_params
    return total


def backward_flops(shape: ModelShape, seq_lens: Sequence[int]) -> int:
    """FLOPs of one backward pass, summed over sequences.

    per sequence:  2 * matmul_params * L            activation (input) grads of every Linear
                 + 8 * n_layers * d_attn * L**2     two matmuls per attention matmul
                 + 2 * trainable_matmul_params * L  weight grads
                 + 2 * pooler_params + 2 * trainable_pooler_params

    For a fully trainable model this is exactly 2x :func:`forward_flops`
    (forward + backward = the "6N" rule).  When the earliest layers' inputs
    need no gradient (frozen embeddings and frozen first layers, LoRA),
    autograd skips some input-grad matmuls, so the formula is an *upper bound*
    there (tests: within 35% on a LoRA-adapted tiny Llama).  It also assumes
    every output (incl. the pooler) feeds the loss.
    """
    P, A = shape.matmul_params, shape.n_layers * shape.d_attn
    total = 0
    for L in _lens(seq_lens):
        if L == 0:
            continue
        total += (
            2 * P * L
            + 8 * A * L * L
            + 2 * shape.trainable_matmul_params * L
            + 2 * shape.pooler_params
            + 2 * shape.trainable_pooler_params
        )
    return total


def train_flops(shape: ModelShape, seq_lens: Sequence[int]) -> int:
    """forward + backward."""
    return forward_flops(shape, seq_lens) + backward_flops(shape, seq_lens)


def generate_flops(
    shape: ModelShape,
    prompt_lens: Sequence[int],
    new_tokens: Sequence[int],
    *,
    logits_to_keep: int | None = 1,
) -> int:
    """FLOPs of KV-cached greedy/sampled decoding, summed over sequences.

    For a prompt of (padded) length ``p`` producing ``n >= 1`` new tokens:

    * prefill: :func:`forward_flops` over ``p`` positions, except that the LM
      head runs only on the last ``logits_to_keep`` positions (HF ``generate``
      passes ``logits_to_keep=1``; ``None`` = all positions).  It yields the
      first new token.
    * then ``n - 1`` decode steps; step ``i`` feeds one token and attends over
      the context ``c = p + i`` (cache + itself):
      ``2 * matmul_params + 4 * n_layers * d_attn * c``.
      The last generated token is never fed back.

    In a batch every row runs as many steps as the longest one, so pass the
    padded prompt length and the number of decoding steps for every row.
    """
    P, A, H = shape.matmul_params, shape.n_layers * shape.d_attn, shape.head_params
    plens, nlens = _lens(prompt_lens), _lens(new_tokens)
    if len(plens) != len(nlens):
        raise ValueError("prompt_lens and new_tokens must have the same length")
    total = 0
    for p, n in zip(plens, nlens):
        if n == 0 or p == 0:
            if n and not p:
                raise ValueError("generation needs a non-empty prompt")
            continue
        head_rows = p if logits_to_keep is None else min(int(logits_to_keep), p)
        total += 2 * (P - H) * p + 2 * H * head_rows + 4 * A * p * p
        steps = n - 1
        # sum_{i=1..steps} (p + i) = steps * p + steps * (steps + 1) / 2
        ctx_sum = steps * p + steps * (steps + 1) // 2
        total += steps * 2 * P + 4 * A * ctx_sum
    return total


def flops_for(
    kind: str,
    shape: ModelShape,
    seq_lens: Sequence[int],
    new_tokens: Sequence[int] | None = None,
) -> int:
    """The formula that goes with a kind: train -> forward+backward,
    generate -> :func:`generate_flops` (``seq_lens`` are prompt lengths),
    score / index / eval -> forward."""
    _check_kind(kind)
    if kind == "train":
        return train_flops(shape, seq_lens)
    if kind == "generate":
        if new_tokens is None:
            raise ValueError("kind 'generate' needs new_tokens")
        return generate_flops(shape, seq_lens, new_tokens)
    return forward_flops(shape, seq_lens)


def batch_lengths(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> tuple[list[int], int]:
    """(padded per-row lengths, number of real tokens) of a ``[B, L]`` batch.

    Padded lengths are what the FLOP formulas take (positions computed);
    real tokens go to ``real_tokens`` so padding waste stays visible.
    """
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    B, L = int(input_ids.shape[0]), int(input_ids.shape[-1])
    real = B * L if attention_mask is None else int(attention_mask.bool().sum().item())
    return [L] * B, real


# --------------------------------------------------------------------------- #
# Device description
# --------------------------------------------------------------------------- #


def _cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def _cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # cores this process may use
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def device_name(device: torch.device | str) -> str:
    """Human-readable hardware name: ``"cpu: <model name> x N cores"`` or the
    CUDA device name (``torch.cuda.get_device_name``)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev.index if dev.index is not None else torch.cuda.current_device())
    if dev.type == "cpu":
        return f"cpu: {_cpu_model_name()} x {_cpu_cores()} cores"
    if dev.type == "mps":
        return f"mps: {platform.machine() or 'apple'}"
    return str(dev)


def _default_device_name() -> str:
    if torch.cuda.is_available():
        return device_name("cuda")
    return device_name("cpu")


# --------------------------------------------------------------------------- #
# Ledger
# --------------------------------------------------------------------------- #


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown cost kind {kind!r}; expected one of {KINDS}")


def _exact(x: Any, what: str) -> int | float:
    """int when integral (exact, order-independent sums), float otherwise."""
    if isinstance(x, torch.Tensor):
        x = x.item()
    if isinstance(x, bool):
        raise TypeError(f"{what} must be a number, got bool")
    if isinstance(x, int):
        v: int | float = int(x)
    else:
        f = float(x)
        if not math.isfinite(f):
            raise ValueError(f"{what} must be finite, got {x!r}")
        v = int(f) if f.is_integer() else f
    if v < 0:
        raise ValueError(f"{what} must be non-negative, got {x!r}")
    return v


def _count(x: Any, what: str) -> int:
    v = _exact(x, what)
    if not isinstance(v, int):
        raise ValueError(f"{what} must be an integer, got {x!r}")
    return v


@dataclass
class _Acc:
    flops: int | float = 0
    tokens: int = 0
    real_tokens: int = 0
    calls: int = 0
    seconds: float = 0.0

    def add(self, other: "_Acc") -> None:
        self.flops += other.flops
        self.tokens += other.tokens
        self.real_tokens += other.real_tokens
        self.calls += other.calls
        self.seconds += other.seconds


@dataclass
class ChargeRecord:
    """Mutable record yielded by :meth:`Ledger.timer`; the wrapper fills it in.
    ``seconds`` is measured by the timer and set on exit."""

    component: str
    kind: str
    tokens: int = 0
    flops: int | float = 0
    real_tokens: int | None = None
    calls: int = 1
    seconds: float = 0.0
    skip: bool = False  # set True to charge nothing (e.g. the call turned out to be a no-op)


_FIELDS = ("flops", "tokens", "real_tokens", "calls", "seconds")


class Ledger:
    """Accumulates compute per ``(component, kind)`` plus trainer wall-clock
    per phase and peak memory.  Thread-safe for concurrent ``charge`` calls."""

    def __init__(self, device_name: str | None = None, n_devices: int = 1):
        self.device_name: str = device_name if device_name is not None else _default_device_name()
        if int(n_devices) < 1:
            raise ValueError("n_devices must be >= 1")
        self.n_devices: int = int(n_devices)
        self._records: dict[tuple[str, str], _Acc] = {}
        self._wall: dict[str, float] = {}
        self._wall_total = 0.0  # time with at least one wall() phase open
        self._device_seconds = 0.0  # wall_total weighted by n_devices at the time
        self._wall_depth = 0
        self._wall_t0 = 0.0
        self._peak = {"cpu": 0, "gpu": 0}
        self._eval_depth = 0
        self._lock = threading.RLock()

    # ------------------------------------------------------------- charging
    @property
    def is_evaluating(self) -> bool:
        return self._eval_depth > 0

    def charge(
        self,
        component: str,
        kind: str,
        *,
        tokens: int,
        flops: float,
        seconds: float = 0.0,
        calls: int = 1,
        real_tokens: int | None = None,
    ) -> None:
        """Add one (or ``calls``) model call(s).

        ``tokens``: positions actually computed (padded tensor size);
        ``real_tokens``: non-pad tokens (defaults to ``tokens``).  Inside
        :meth:`evaluating` the record goes to kind ``"eval"`` whatever
        ``kind`` was given.
        """
        _check_kind(kind)
        if not isinstance(component, str) or not component:
            raise ValueError("component must be a non-empty string")
        acc = _Acc(
            flops=_exact(flops, "flops"),
            tokens=_count(tokens, "tokens"),
            real_tokens=_count(tokens if real_tokens is None else real_tokens, "real_tokens"),
            calls=_count(calls, "calls"),
            seconds=float(seconds),
        )
        if acc.seconds < 0 or not math.isfinite(acc.seconds):
            raise ValueError(f"seconds must be finite and non-negative, got {seconds!r}")
        with self._lock:
            key = (component, "eval" if self._eval_depth > 0 else kind)
            self._records.setdefault(key, _Acc()).add(acc)

    def charge_model(
        self,
        component: str,
        kind: str,
        shape: ModelShape,
        seq_lens: Sequence[int],
        *,
        new_tokens: Sequence[int] | None = None,
        real_tokens: int | None = None,
        seconds: float = 0.0,
        calls: int = 1,
    ) -> int:
        """Charge with the formula that goes with ``kind`` (see :func:`flops_for`).
        ``tokens`` = sum of ``seq_lens`` (+ ``new_tokens`` for generate).
        Returns the FLOPs charged."""
        lens = _lens(seq_lens)
        flops = flops_for(kind, shape, lens, new_tokens)
        tokens = sum(lens) + (sum(_lens(new_tokens)) if new_tokens is not None else 0)
        self.charge(
            component, kind, tokens=tokens, flops=flops, seconds=seconds, calls=calls,
            real_tokens=real_tokens,
        )
        return flops

    @contextmanager
    def evaluating(self) -> Iterator["Ledger"]:
        """Everything charged inside goes to kind ``"eval"`` (nestable)."""
        with self._lock:
            self._eval_depth += 1
        try:
            yield self
        finally:
            with self._lock:
                self._eval_depth -= 1

    @contextmanager
    def timer(self, component: str, kind: str, *, sync: bool = True) -> Iterator[ChargeRecord]:
        """Time a model call and charge it on (normal) exit.

        Yields a :class:`ChargeRecord`; set ``rec.tokens``, ``rec.flops`` (and
        optionally ``rec.real_tokens`` / ``rec.calls``) inside the block.  With
        ``sync`` the CUDA stream is synchronised before reading the clock so the
        time covers the kernels, not just their launch.  Nothing is charged if
        the block raises.
        """
        _check_kind(kind)
        rec = ChargeRecord(component=component, kind=kind)
        _sync(sync)
        t0 = time.perf_counter()
        yield rec
        _sync(sync)
        rec.seconds = time.perf_counter() - t0
        if not rec.skip:
            self.charge(
                rec.component, rec.kind, tokens=rec.tokens, flops=rec.flops, seconds=rec.seconds,
                calls=rec.calls, real_tokens=rec.real_tokens,
            )
        self.sample_memory()

    @contextmanager
    def wall(self, phase: str) -> Iterator[None]:
        """Accumulate wall-clock seconds of a trainer phase ("train", "eval",
        "index", ...).  Phases may nest; each phase gets its own elapsed time
        and ``wall_seconds["total"]`` counts time with any phase open once."""
        if not isinstance(phase, str) or not phase or phase == "total":
            raise ValueError(f"invalid wall phase {phase!r}")
        t0 = time.perf_counter()
        with self._lock:
            if self._wall_depth == 0:
                self._wall_t0 = t0
            self._wall_depth += 1
        try:
            yield
        finally:
            t1 = time.perf_counter()
            with self._lock:
                self._wall[phase] = self._wall.get(phase, 0.0) + (t1 - t0)
                self._wall_depth -= 1
                if self._wall_depth == 0:
                    dt = t1 - self._wall_t0
                    self._wall_total += dt
                    self._device_seconds += dt * self.n_devices
            self.sample_memory()

    def sample_memory(self) -> None:
        """Update peak memory: CPU peak RSS of this process (``ru_maxrss``,
        KiB on Linux -> bytes) and ``torch.cuda.max_memory_allocated()`` when
        CUDA is in use."""
        cpu = _peak_rss_bytes()
        gpu = 0
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            try:
                gpu = int(torch.cuda.max_memory_allocated())
            except Exception:  # pragma: no cover
                gpu = 0
        with self._lock:
            self._peak["cpu"] = max(self._peak["cpu"], cpu)
            self._peak["gpu"] = max(self._peak["gpu"], gpu)

    # ------------------------------------------------------------- reporting
    def totals(self, include_time: bool = True) -> dict:
        """Leaderboard view.

        ``flops`` / ``tokens`` / ``real_tokens`` / ``calls`` (and ``seconds``
        with ``include_time``): ``{kind: x for every kind, "total_train": x,
        "total": x}`` where ``total_train`` sums train+score+generate+index
        (eval excluded).  ``*_by_component``: ``{component: {kind: x}}`` for
        charged pairs.  With ``include_time`` also ``wall_seconds`` (per phase
        + ``"total"``), ``peak_memory_bytes``, ``device_hours``.
        """
        with self._lock:
            fields = _FIELDS if include_time else _FIELDS[:-1]
            out: dict[str, Any] = {}
            for f in fields:
                per_kind: dict[str, Any] = {k: (0.0 if f == "seconds" else 0) for k in KINDS}
                by_comp: dict[str, dict[str, Any]] = {}
                for (comp, kind), acc in sorted(self._records.items()):
                    v = getattr(acc, f)
                    per_kind[kind] += v
                    by_comp.setdefault(comp, {})[kind] = v
                per_kind["total_train"] = sum(per_kind[k] for k in TRAINING_KINDS)
                per_kind["total"] = per_kind["total_train"] + per_kind["eval"]
                out[f] = per_kind
                out[f"{f}_by_component"] = by_comp
            out["device"] = self.device_name
            out["n_devices"] = self.n_devices
            if include_time:
                wall = dict(sorted(self._wall.items()))
                wall["total"] = self._wall_total
                out["wall_seconds"] = wall
                out["peak_memory_bytes"] = dict(self._peak)
                out["device_hours"] = self._device_seconds / 3600.0
            return out

    def deterministic_view(self) -> dict:
        """Everything except times and memory: equal across a resumed and an
        uninterrupted run of the same schedule."""
        return self.totals(include_time=False)

    # ------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """Plain-data state (JSON and ``torch.save(weights_only)`` friendly)."""
        with self._lock:
            return {
                "version": _STATE_VERSION,
                "device_name": self.device_name,
                "n_devices": self.n_devices,
                "records": [
                    [comp, kind, acc.flops, acc.tokens, acc.real_tokens, acc.calls, acc.seconds]
                    for (comp, kind), acc in sorted(self._records.items())
                ],
                "wall_seconds": dict(sorted(self._wall.items())),
                "wall_total": self._wall_total,
                "device_seconds": self._device_seconds,
                "peak_memory_bytes": dict(self._peak),
            }

    def load_state_dict(self, d: dict) -> None:
        """Replace this ledger's state with ``d`` (from :meth:`state_dict`)."""
        if int(d.get("version", -1)) != _STATE_VERSION:
            raise ValueError(f"unsupported ledger state version {d.get('version')!r}")
        records: dict[tuple[str, str], _Acc] = {}
        for comp, kind, flops, tokens, real_tokens, calls, seconds in d["records"]:
            _check_kind(kind)
            records[(str(comp), str(kind))] = _Acc(
                flops=_exact(flops, "flops"),
                tokens=_count(tokens, "tokens"),
                real_tokens=_count(real_tokens, "real_tokens"),
                calls=_count(calls, "calls"),
                seconds=float(seconds),
            )
        with self._lock:
            self.device_name = str(d["device_name"])
            self.n_devices = int(d["n_devices"])
            self._records = records
            self._wall = {str(k): float(v) for k, v in d["wall_seconds"].items()}
            self._wall_total = float(d["wall_total"])
            self._device_seconds = float(d["device_seconds"])
            self._peak = {k: int(d["peak_memory_bytes"].get(k, 0)) for k in ("cpu", "gpu")}

    def merge(self, other: "Ledger", concurrent: bool = False) -> "Ledger":
        """Add ``other`` into this ledger (counts, seconds and device-seconds
        add; peak memory is the max; differing device names are joined).
        ``concurrent``: ``other`` ran at the same time (another rank of the
        same run), so its wall-clock is not added, only its device-seconds.
        Returns ``self``."""
        if other is self:
            other = other.copy()
        o = other.state_dict()
        with self._lock:
            for comp, kind, flops, tokens, real_tokens, calls, seconds in o["records"]:
                self._records.setdefault((comp, kind), _Acc()).add(
                    _Acc(flops, tokens, real_tokens, calls, seconds)
                )
            for k, v in o["wall_seconds"].items():
                self._wall[k] = max(self._wall.get(k, 0.0), v) if concurrent else self._wall.get(k, 0.0) + v
            self._wall_total = max(self._wall_total, o["wall_total"]) if concurrent else self._wall_total + o["wall_total"]
            self._device_seconds += o["device_seconds"]
            for k in ("cpu", "gpu"):
                self._peak[k] = max(self._peak[k], o["peak_memory_bytes"][k])
            names = self.device_name.split(" + ")
            for n in o["device_name"].split(" + "):
                if n not in names:
                    names.append(n)
            self.device_name = " + ".join(names)
        return self

    def copy(self) -> "Ledger":
        new = Ledger(device_name=self.device_name, n_devices=self.n_devices)
        new.load_state_dict(self.state_dict())
        return new

    def __repr__(self) -> str:
        t = self.totals(include_time=False)
        return f"Ledger(device={self.device_name!r}, flops={t['flops']})"


def _sync(enabled: bool) -> None:
    if enabled and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _peak_rss_bytes() -> int:
    try:
        import resource
    except ImportError:  # pragma: no cover - non-POSIX
        return 0
    rss = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    # Linux reports KiB, macOS bytes.
    return rss if sys.platform == "darwin" else rss * 1024
