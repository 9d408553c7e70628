"""Launchers: execute a batch of separate jobs (each a `ragtune` subprocess) and report exits.

What: a `Job` is a command line plus its log file. `LocalLauncher` runs jobs one after the other
on CPU, or one per visible GPU in parallel (CUDA_VISIBLE_DEVICES set per subprocess).
`RayLauncher` submits the same job function as Ray tasks, for grids larger than one machine
(every node needs the same install and a shared filesystem for the results folder). Why
subprocesses: a crash, divergence or OOM in one run cannot take the experiment down, and a
killed run resumes from its own checkpoints when re-launched.
Both call `on_done(job, exit_code, seconds)` in the calling thread as each job finishes.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

OnDone = Callable[["Job", int, float], None]


@dataclass(frozen=True)
class Job:
    key: str  # unique id (the run directory)
    cmd: List[str]
    log: str  # stdout+stderr are appended here
    env: Dict[str, str] = field(default_factory=dict)


def ragtune_cmd(*args: str) -> List[str]:
    """`ragtune ARGS` with this interpreter (no dependence on PATH)."""
    return [sys.executable, "-m", "ragtune.cli", *args]


def execute(job: Job, extra_env: Optional[Dict[str, str]] = None) -> int:
    """Run one job to completion; its output goes to job.log. Returns the exit code."""
    Path(job.log).parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **job.env, **(extra_env or {})}
    env.setdefault("PYTHONUNBUFFERED", "1")
    with open(job.log, "a") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(job.cmd)}\n")
        log.flush()
        return subprocess.run(
            job.cmd, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent
        ).returncode


def _die_with_parent() -> None:
    """In the child (Linux): SIGTERM when the launching runner dies, even by `kill -9`, so no
    orphaned trainer keeps training a run directory (it resumes from its checkpoint next time)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: a re-run waits on the run directory's lock instead
        pass


def visible_gpus() -> List[str]:
    """Ids of the GPUs this process may use (honouring CUDA_VISIBLE_DEVICES)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # no torch / no driver: CPU
        return []


class LocalLauncher:
    """Sequential on CPU; with GPUs, one job per GPU at a time. `parallel` > 0 forces a width."""

    def __init__(self, parallel: int = 0):
        self.gpus = visible_gpus()
        self.width = parallel or max(1, len(self.gpus))

    def run(self, jobs: List[Job], on_done: OnDone) -> None:
        if self.width == 1:
            env = {"CUDA_VISIBLE_DEVICES": self.gpus[0]} if self.gpus else None
            for job in jobs:
                t = time.time()
                on_done(job, execute(job, env), time.time() - t)
            return
        slots: queue.Queue[Optional[str]] = queue.Queue()
        for i in range(self.width):
            slots.put(self.gpus[i % len(self.gpus)] if self.gpus else None)

        def work(job: Job):
            slot, t = slots.get(), time.time()
            try:
                return execute(job, {"CUDA_VISIBLE_DEVICES": slot} if slot is not None else None), time.time() - t
            finally:
                slots.put(slot)

        with ThreadPoolExecutor(self.width) as pool:
            pending = {pool.submit(work, j): j for j in jobs}
            try:
                while pending:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for f in done:
                        rc, secs = f.result()
                        on_done(pending.pop(f), rc, secs)
            except KeyboardInterrupt:
                for f in pending:
                    f.cancel()
                raise

    def close(self) -> None:
        pass


def _ray_job(job: Job):
    t = time.time()
    return execute(job), time.time() - t


class RayLauncher:
    """Jobs as Ray tasks (`ray.init` locally with num_cpus, or on `address`)."""

    def __init__(self, opts):
        import ray

        self.ray = ray
        kw = dict(include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
        if opts.address:
            kw["address"] = opts.address
        elif opts.num_cpus:
            kw["num_cpus"] = int(opts.num_cpus)
        self.started = not ray.is_initialized()
        ray.init(**kw)
        gpus = opts.gpus_per_run if opts.gpus_per_run >= 0 else (1.0 if visible_gpus() else 0.0)
        self.task = ray.remote(num_cpus=opts.cpus_per_run, num_gpus=gpus)(_ray_job)
        res = ray.cluster_resources()
        self.width = max(
            1,
            int(
                min(
                    res.get("CPU", 1) / max(opts.cpus_per_run, 1e-9), res.get("GPU", 0) / gpus if gpus else float("inf")
                )
            ),
        )

    def run(self, jobs: List[Job], on_done: OnDone) -> None:
        refs = {self.task.remote(j): j for j in jobs}
        try:
            while refs:
                done, _ = self.ray.wait(list(refs), num_returns=1)
                rc, secs = self.ray.get(done[0])
                on_done(refs.pop(done[0]), rc, secs)
        except KeyboardInterrupt:
            for r in refs:
                self.ray.cancel(r, force=True)
            raise

    def close(self) -> None:
        if self.started and self.ray.is_initialized():
            self.ray.shutdown()


def make_launcher(spec):
    return RayLauncher(spec.ray) if spec.launcher == "ray" else LocalLauncher(spec.parallel)
