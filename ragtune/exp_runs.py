"""What happened to each run of an experiment, read back from its run directory.

What: a `RunRecord` (status, reason, scores, cost) per grid run, and the cost arithmetic the
leaderboard needs. Only a result.json marks a run finished: a run killed before writing it is
recorded as failed with the tail of its log as the reason, and the next `ragtune experiment`
re-launches it (which resumes from its checkpoint). A result.json with status "failed" (a crash
the core caught) is retried the same way, as `ragtune train` itself does; "diverged" is final. Why flat costs: a phase-2 run's cost must
include its phase-1 parent (sum FLOPs per kind, wall seconds, device-hours; max peak memory),
which is easiest on one flat dict per run.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from ragtune.exp_grid import RunSpec

FLOP_KINDS = ("train", "score", "generate", "index", "total_train")
EXIT_STATUS = {0: "ok", 1: "failed", 2: "bad config", 3: "diverged", 130: "interrupted"}


@dataclass
class RunRecord:
    spec: RunSpec
    status: str                 # ok | failed | diverged | bad config | interrupted | pending
    reason: str
    result: Optional[dict]      # result.json content, None if the run never finished

    @property
    def finished(self) -> bool:
        """ok or diverged (deterministic: it would diverge again); a failed run is retried like the core does."""
        return self.result is not None and self.status != "failed"

    def score(self, split: str, metric: str) -> Optional[float]:
        s = (self.result or {}).get(split) if self.status == "ok" else None
        v = s.get(metric) if s else None
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)

    def cost(self) -> Optional[dict]:
        return flat_cost((self.result or {}).get("cost"))


def read_record(spec: RunSpec, rc: Optional[int] = None) -> RunRecord:
    """The record of a run from its directory; `rc` is the exit code if it was just launched."""
    d = Path(spec.run_dir)
    path = d / "result.json"
    if path.exists():
        try:
            res = json.loads(path.read_text())
        except ValueError as e:
            return RunRecord(spec, "failed", f"unreadable result.json: {e}", None)
        return RunRecord(spec, res.get("status", "failed"), res.get("reason", ""), res)
    if rc is None:
        return RunRecord(spec, "pending", "", None)
    status = "interrupted" if rc in (130, -2) else EXIT_STATUS.get(rc, "failed")
    if status == "ok":
        status = "failed"
    return RunRecord(spec, status, f"exit code {rc}, no result.json: {log_tail(d / 'log.txt')}", None)


_BAR = re.compile(r"\d+%\|")


def log_tail(path: Path, lines: int = 3, width: int = 300) -> str:
    """Last meaningful lines of a run's log (progress bars dropped), joined on one line."""
    if not path.exists():
        return "no log"
    text = path.read_text(errors="replace").replace("\r", "\n").splitlines()
    keep = [t.strip() for t in text if t.strip() and not _BAR.search(t)]
    return " | ".join(keep[-lines:])[-width:] or "empty log"


def flat_cost(cost: Optional[dict]) -> Optional[dict]:
    """result.json cost -> {flops_<kind>, wall_s, device_hours, peak_cpu_bytes, peak_gpu_bytes, device}."""
    if not cost:
        return None
    fl = cost.get("flops", {})
    out = {f"flops_{k}": int(fl.get(k, 0)) for k in FLOP_KINDS}
    peak = cost.get("peak_memory_bytes", {})
    walls = cost.get("wall_seconds", {})
    # training wall-clock: evaluation is reported apart, like its FLOPs
    out.update(wall_s=float(walls.get("total", 0.0)) - float(walls.get("eval", 0.0)),
               device_hours=float(cost.get("device_hours", 0.0)),
               peak_cpu_bytes=int(peak.get("cpu", 0)), peak_gpu_bytes=int(peak.get("gpu", 0)),
               device=str(cost.get("device", "")))
    return out


def add_costs(a: Optional[dict], b: Optional[dict]) -> Optional[dict]:
    """Cost of running a then b: sums, except peak memory (max) and device (both names)."""
    if a is None or b is None:
        return a or b
    out = {k: a[k] + b[k] for k in a if k.startswith("flops_") or k in ("wall_s", "device_hours")}
    out.update(peak_cpu_bytes=max(a["peak_cpu_bytes"], b["peak_cpu_bytes"]),
               peak_gpu_bytes=max(a["peak_gpu_bytes"], b["peak_gpu_bytes"]),
               device=" + ".join(dict.fromkeys(x for x in (a["device"], b["device"]) if x)))
    return out


def chained_cost(rec: RunRecord, by_dir: Dict[str, RunRecord]) -> Optional[dict]:
    """A run's own cost plus that of every run it started from (train.init_from chain)."""
    cost, seen = rec.cost(), {rec.spec.run_dir}
    parent = rec.spec.parent
    while parent and parent in by_dir and parent not in seen:
        seen.add(parent)
        cost = add_costs(by_dir[parent].cost(), cost)
        parent = by_dir[parent].spec.parent
    return cost


def sum_costs(costs: List[Optional[dict]]) -> Optional[dict]:
    """Total over runs, each counted once (runs without a cost, e.g. crashes, add nothing)."""
    total = None
    for c in costs:
        total = add_costs(total, c)
    return total
