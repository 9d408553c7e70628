"""What happened to each run of an experiment, and the cost arithmetic over runs.

What: a `RunRecord` (status, reason, result) per grid run, read through `ragtune.rundir`, and the
one place that adds run costs: `flat_cost` flattens a result's `cost`, `add_costs` is "a then
b" (sums, max peak memory, both device names), `chained_cost` adds every run a run started from
(the `train.init_from` chain), `sum_costs` totals a grid. Why flat costs: a phase-2 run's cost
must include its phase-1 parent, which is easiest on one flat dict per run.
A run killed before writing its result is recorded as failed with the tail of its log as the
reason; a result with status "failed" (a crash the core caught) is retried by the next
`ragtune experiment`, as `ragtune train` itself does; "diverged" is final.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

from ragtune import rundir
from ragtune.experiment.grid import RunSpec
from ragtune.ledger import TRAINING_KINDS, join_device_names

FLOP_KINDS = tuple(TRAINING_KINDS) + ("total_train",)


@dataclass
class RunRecord:
    spec: RunSpec
    status: str  # ok | failed | diverged | bad config | interrupted | pending
    reason: str
    result: Optional[dict]  # the run's result, None if it never finished

    @property
    def finished(self) -> bool:
        """ok or diverged (deterministic: it would diverge again); a failed run is retried like the core does."""
        return self.result is not None and self.status in rundir.FINAL_STATUSES

    def score(self, split: str, metric: str) -> Optional[float]:
        s = (self.result or {}).get(split) if self.status == "ok" else None
        v = s.get(metric) if s else None
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)

    def cost(self) -> Optional[dict]:
        return flat_cost((self.result or {}).get("cost"))


def read_record(spec: RunSpec, rc: Optional[int] = None) -> RunRecord:
    """The record of a run from its directory; `rc` is the exit code if it was just launched."""
    try:
        res = rundir.read_result(spec.run_dir)
    except ValueError as e:
        return RunRecord(spec, "failed", str(e), None)
    if res is not None:
        return RunRecord(spec, res.get("status", "failed"), res.get("reason", ""), res)
    if rc is None:
        return RunRecord(spec, "pending", "", None)
    status = rundir.status_of_exit(rc)
    if status == "ok":
        status = "failed"
    return RunRecord(spec, status, f"exit code {rc}, no {rundir.RESULT}: {rundir.log_tail(spec.run_dir)}", None)


def flat_cost(cost: Optional[dict]) -> Optional[dict]:
    """A result's cost -> {flops_<kind>, wall_s, device_hours, peak_cpu_bytes, peak_gpu_bytes, device}."""
    if not cost:
        return None
    fl = cost.get("flops", {})
    out = {f"flops_{k}": int(fl.get(k, 0)) for k in FLOP_KINDS}
    peak = cost.get("peak_memory_bytes", {})
    walls = cost.get("wall_seconds", {})
    # training wall-clock: evaluation is reported apart, like its FLOPs
    out.update(
        wall_s=float(walls.get("total", 0.0)) - float(walls.get("eval", 0.0)),
        device_hours=float(cost.get("device_hours", 0.0)),
        peak_cpu_bytes=int(peak.get("cpu", 0)),
        peak_gpu_bytes=int(peak.get("gpu", 0)),
        device=str(cost.get("device", "")),
    )
    return out


def add_costs(a: Optional[dict], b: Optional[dict]) -> Optional[dict]:
    """Cost of running a then b: sums, except peak memory (max) and device (both names)."""
    if a is None or b is None:
        return a or b
    out = {k: a[k] + b[k] for k in a if k.startswith("flops_") or k in ("wall_s", "device_hours")}
    out.update(
        peak_cpu_bytes=max(a["peak_cpu_bytes"], b["peak_cpu_bytes"]),
        peak_gpu_bytes=max(a["peak_gpu_bytes"], b["peak_gpu_bytes"]),
        device=join_device_names(a["device"], b["device"]),
    )
    return out


def run_cost(d) -> Optional[dict]:
    """The flat cost recorded in a run directory's result (None without one)."""
    try:
        return flat_cost((rundir.read_result(d) or {}).get("cost"))
    except ValueError:
        return None


def chained_cost(d) -> Optional[dict]:
    """A run's own cost plus that of every run it started from (the `train.init_from` chain)."""
    return sum_costs([run_cost(x) for x in rundir.init_chain(d)])


def sum_costs(costs: List[Optional[dict]]) -> Optional[dict]:
    """Total over runs, each counted once (runs without a cost, e.g. crashes, add nothing)."""
    total = None
    for c in costs:
        total = add_costs(total, c)
    return total


def devices(costs: List[Optional[dict]]) -> str:
    """Every device name of `costs`, joined once each."""
    out = ""
    for c in costs:
        out = join_device_names(out, (c or {}).get("device", ""))
    return out
