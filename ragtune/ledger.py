"""The compute ledger: FLOPs, tokens, calls and forward seconds per (component, activity).

What: every model wrapper (retriever `encode`, generator log-probs / decoding, index refresh)
charges each call it makes through ONE method, `Ledger.charge_model`, which picks the FLOP formula
(`ragtune.flops`) and decides train vs score; strategies never charge anything, so no strategy can
count differently. The component is the wrapper's own name (`query_encoder`, `doc_encoder`,
`generator`, or a strategy part such as a posterior tower or a reference model).

An activity (deliberately not "kind", which names question types) is one of `ACTIVITIES`:
  train    - forward + backward of a component being trained (a forward under grad mode with
             trainable weights);
  score    - no-grad forward (proposal scoring, reference / frozen models);
  generate - autoregressive decoding;
  index    - corpus (re-)embedding;
  eval     - anything charged inside `evaluating()`: reported, kept out of `total_train`.

Time is reported beside FLOPs, never merged with them (decoding reaches far fewer FLOP/s than
training): `forward_seconds` is the time spent inside the wrappers' calls, i.e. forward passes and
whole decoding loops; backward passes and optimizer steps are in no component's number, only in
the trainer's `wall_seconds["train"]`. Wall-clock per trainer phase, peak memory and device-hours
with the device name complete `totals()`, which becomes result.json's `cost`.

The cost arithmetic the experiment layer needs lives here once: `TRAINING_KINDS` (the activities
that make up training cost), `join_device_names`, `Ledger.merge`.
"""

from __future__ import annotations

import math
import os
import platform
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import astuple, dataclass
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple

import torch

from ragtune.flops import ModelShape, backward_flops, forward_flops, generate_flops

ACTIVITIES: Tuple[str, ...] = ("train", "score", "generate", "index", "eval")
TRAINING_ACTIVITIES: Tuple[str, ...] = ("train", "score", "generate", "index")  # sum = "total_train"
TRAINING_KINDS = TRAINING_ACTIVITIES  # the name the experiment layer imports
FIELDS = ("flops", "tokens", "real_tokens", "calls", "forward_seconds")
_STATE_VERSION = 1  # records are positional [component, activity, *FIELDS]; unchanged since v1


def join_device_names(a: str, b: str) -> str:
    """'A' + 'B' -> 'A + B': every distinct device name once, in order of first appearance."""
    names = [n for s in (a, b) for n in (s or "").split(" + ") if n]
    return " + ".join(dict.fromkeys(names))


def clock() -> float:
    """perf_counter after the CUDA queue has drained, so a timed span covers the kernels it
    launched, not just their launch."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


def device_name(device) -> str:
    """'cpu: <model name> x N cores', the CUDA device name, or str(device)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev.index if dev.index is not None else torch.cuda.current_device())
    if dev.type == "cpu":
        return f"cpu: {_cpu_model_name()} x {_cpu_cores()} cores"
    if dev.type == "mps":
        return f"mps: {platform.machine() or 'apple'}"
    return str(dev)


@dataclass
class _Acc:
    flops: int = 0
    tokens: int = 0
    real_tokens: int = 0
    calls: int = 0
    forward_seconds: float = 0.0

    def add(self, other: _Acc) -> None:
        for f in FIELDS:
            setattr(self, f, getattr(self, f) + getattr(other, f))


class Ledger:
    """Compute per (component, activity), wall-clock per trainer phase, peak memory.

    Thread-safe. Integral FLOPs stay Python ints, so sums are exact and independent of merge order,
    and `state_dict()` holds plain data only (JSON and `torch.save(weights_only=True)` safe).
    """

    def __init__(self, device_name: Optional[str] = None, n_devices: int = 1):
        self.device_name = device_name if device_name is not None else _default_device_name()
        if int(n_devices) < 1:
            raise ValueError("n_devices must be >= 1")
        self.n_devices = int(n_devices)
        self._records: Dict[Tuple[str, str], _Acc] = {}
        self._wall: Dict[str, float] = {}
        self._wall_total = 0.0  # time with at least one wall() phase open
        self._device_seconds = 0.0  # wall_total weighted by n_devices
        self._wall_depth = 0
        self._wall_t0 = 0.0
        self._peak = {"cpu": 0, "gpu": 0}
        self._eval_depth = 0
        self._lock = threading.RLock()

    # ---- charging ------------------------------------------------------------------------------
    def charge_model(
        self,
        component: str,
        shape: ModelShape,
        seq_lens: Sequence[int],
        *,
        real_tokens: int,
        seconds: float,
        head_positions: Optional[int] = None,
        new_tokens: Optional[Sequence[int]] = None,
        activity: Optional[str] = None,
    ) -> int:
        """THE charging call of every model wrapper; returns the FLOPs charged.

        `seq_lens`: padded length of every row computed (prompt lengths for decoding);
        `real_tokens`: non-pad tokens; `head_positions`: positions per row the LM head ran on (None:
        all); `new_tokens`: decoding steps per row, which makes the call a `generate` charge.
        Without an explicit `activity` a call under grad mode on a shape with trainable weights is
        `train` (forward + backward FLOPs: the backward the caller's loss will run), else `score`.
        """
        if new_tokens is not None:
            activity = activity or "generate"
            flops = generate_flops(shape, seq_lens, new_tokens)
            tokens = sum(seq_lens) + sum(new_tokens)
        else:
            activity = activity or ("train" if torch.is_grad_enabled() and shape.trainable else "score")
            flops = forward_flops(shape, seq_lens, head_positions)
            if activity == "train":
                flops += backward_flops(shape, seq_lens, head_positions)
            tokens = sum(seq_lens)
        self.charge(component, activity, tokens=tokens, real_tokens=real_tokens, flops=flops, seconds=seconds)
        return flops

    def charge(
        self,
        component: str,
        activity: str,
        *,
        tokens: int,
        flops,
        seconds: float = 0.0,
        calls: int = 1,
        real_tokens: Optional[int] = None,
    ) -> None:
        """Add `calls` model call(s) with precomputed FLOPs. Inside `evaluating()` the record goes
        to `eval` whatever `activity` was given."""
        if activity not in ACTIVITIES:
            raise ValueError(f"unknown activity {activity!r}; expected one of {ACTIVITIES}")
        if not isinstance(component, str) or not component:
            raise ValueError("component must be a non-empty string")
        seconds = float(seconds)
        if seconds < 0 or not math.isfinite(seconds):
            raise ValueError(f"seconds must be finite and non-negative, got {seconds!r}")
        acc = _Acc(
            _number(flops, "flops"),
            _count(tokens, "tokens"),
            _count(tokens if real_tokens is None else real_tokens, "real_tokens"),
            _count(calls, "calls"),
            seconds,
        )
        with self._lock:
            key = (component, "eval" if self._eval_depth else activity)
            self._records.setdefault(key, _Acc()).add(acc)

    @contextmanager
    def evaluating(self) -> Iterator[Ledger]:
        """Everything charged inside goes to `eval` (nestable)."""
        with self._lock:
            self._eval_depth += 1
        try:
            yield self
        finally:
            with self._lock:
                self._eval_depth -= 1

    @contextmanager
    def wall(self, phase: str) -> Iterator[None]:
        """Wall-clock of a trainer phase ("train", "eval", "index", ...). Phases may nest; each gets
        its own elapsed time and `wall_seconds["total"]` counts time with any phase open once."""
        if not isinstance(phase, str) or not phase or phase == "total":
            raise ValueError(f"invalid wall phase {phase!r}")
        t0 = clock()
        with self._lock:
            if self._wall_depth == 0:
                self._wall_t0 = t0
            self._wall_depth += 1
        try:
            yield
        finally:
            t1 = clock()
            with self._lock:
                self._wall[phase] = self._wall.get(phase, 0.0) + (t1 - t0)
                self._wall_depth -= 1
                if self._wall_depth == 0:
                    self._wall_total += t1 - self._wall_t0
                    self._device_seconds += (t1 - self._wall_t0) * self.n_devices
            self.sample_memory()

    def sample_memory(self) -> None:
        """Update peak memory: CPU peak RSS of this process, `torch.cuda.max_memory_allocated()`."""
        cpu = _peak_rss_bytes()
        gpu = int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() and torch.cuda.is_initialized() else 0
        with self._lock:
            self._peak["cpu"] = max(self._peak["cpu"], cpu)
            self._peak["gpu"] = max(self._peak["gpu"], gpu)

    # ---- reporting -----------------------------------------------------------------------------
    def totals(self, include_time: bool = True) -> dict:
        """result.json's `cost`. For each of FIELDS (forward_seconds only with `include_time`):
        `{activity: x for every activity, "total_train": x, "total": x}` (total_train sums
        TRAINING_ACTIVITIES, total adds eval) and `<field>_by_component`: `{component: {activity: x}}`.
        Plus `device`, `n_devices` and, with `include_time`, `wall_seconds` (per phase + "total"),
        `peak_memory_bytes` {cpu, gpu} and `device_hours`."""
        with self._lock:
            out: Dict[str, Any] = {}
            for f in FIELDS if include_time else FIELDS[:-1]:
                per: Dict[str, Any] = {a: (0.0 if f == "forward_seconds" else 0) for a in ACTIVITIES}
                by_comp: Dict[str, Dict[str, Any]] = {}
                for (comp, act), acc in sorted(self._records.items()):
                    per[act] += getattr(acc, f)
                    by_comp.setdefault(comp, {})[act] = getattr(acc, f)
                per["total_train"] = sum(per[a] for a in TRAINING_ACTIVITIES)
                per["total"] = per["total_train"] + per["eval"]
                out[f], out[f"{f}_by_component"] = per, by_comp
            out["device"], out["n_devices"] = self.device_name, self.n_devices
            if include_time:
                out["wall_seconds"] = {**dict(sorted(self._wall.items())), "total": self._wall_total}
                out["peak_memory_bytes"] = dict(self._peak)
                out["device_hours"] = self._device_seconds / 3600.0
            return out

    def deterministic_view(self) -> dict:
        """`totals()` without times and memory: equal for a resumed and an uninterrupted run."""
        return self.totals(include_time=False)

    # ---- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        with self._lock:
            return {
                "version": _STATE_VERSION,
                "device_name": self.device_name,
                "n_devices": self.n_devices,
                "records": [[comp, act, *astuple(acc)] for (comp, act), acc in sorted(self._records.items())],
                "wall_seconds": dict(sorted(self._wall.items())),
                "wall_total": self._wall_total,
                "device_seconds": self._device_seconds,
                "peak_memory_bytes": dict(self._peak),
            }

    def load_state_dict(self, d: dict) -> None:
        """Replace this ledger's state with `d` (from `state_dict`, possibly via JSON)."""
        if int(d.get("version", -1)) != _STATE_VERSION:
            raise ValueError(f"unsupported ledger state version {d.get('version')!r}")
        records = {}
        for comp, act, flops, tokens, real, calls, seconds in d["records"]:
            if act not in ACTIVITIES:
                raise ValueError(f"unknown activity {act!r} in ledger state")
            records[(str(comp), str(act))] = _Acc(
                _number(flops, "flops"),
                _count(tokens, "tokens"),
                _count(real, "real_tokens"),
                _count(calls, "calls"),
                float(seconds),
            )
        with self._lock:
            self.device_name, self.n_devices = str(d["device_name"]), int(d["n_devices"])
            self._records = records
            self._wall = {str(k): float(v) for k, v in d["wall_seconds"].items()}
            self._wall_total, self._device_seconds = float(d["wall_total"]), float(d["device_seconds"])
            self._peak = {k: int(d["peak_memory_bytes"].get(k, 0)) for k in ("cpu", "gpu")}

    def merge(self, other: Ledger, concurrent: bool = False) -> Ledger:
        """Add `other` into this ledger: counts, seconds and device-seconds add, peak memory is the
        max, device names are joined. `concurrent`: `other` ran at the same time (another rank of
        the same run), so its wall-clock is not added, only its device-seconds. Returns self."""
        o = other.state_dict()
        with self._lock:
            for comp, act, *vals in o["records"]:
                self._records.setdefault((comp, act), _Acc()).add(_Acc(*vals))
            for k, v in o["wall_seconds"].items():
                self._wall[k] = max(self._wall.get(k, 0.0), v) if concurrent else self._wall.get(k, 0.0) + v
            self._wall_total = (
                max(self._wall_total, o["wall_total"]) if concurrent else self._wall_total + o["wall_total"]
            )
            self._device_seconds += o["device_seconds"]
            for k in ("cpu", "gpu"):
                self._peak[k] = max(self._peak[k], o["peak_memory_bytes"][k])
            self.device_name = join_device_names(self.device_name, o["device_name"])
        return self

    def copy(self) -> Ledger:
        new = Ledger(device_name=self.device_name, n_devices=self.n_devices)
        new.load_state_dict(self.state_dict())
        return new

    def __repr__(self) -> str:
        return f"Ledger(device={self.device_name!r}, flops={self.totals(include_time=False)['flops']})"


def _number(x, what: str):
    """int when integral (exact, order-independent sums), float otherwise; finite, >= 0."""
    if isinstance(x, torch.Tensor):
        x = x.item()
    if isinstance(x, bool):
        raise TypeError(f"{what} must be a number, got bool")
    if not isinstance(x, int):
        if not math.isfinite(float(x)):
            raise ValueError(f"{what} must be finite, got {x!r}")
        x = int(x) if float(x).is_integer() else float(x)
    if x < 0:
        raise ValueError(f"{what} must be non-negative, got {x!r}")
    return x


def _count(x, what: str) -> int:
    v = _number(x, what)
    if not isinstance(v, int):
        raise ValueError(f"{what} must be an integer, got {x!r}")
    return v


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


def _default_device_name() -> str:
    return device_name("cuda" if torch.cuda.is_available() else "cpu")


def _peak_rss_bytes() -> int:
    try:
        import resource
    except ImportError:  # pragma: no cover - non-POSIX
        return 0
    rss = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB
