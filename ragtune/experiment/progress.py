"""Progress of an experiment: a line per finished run, and on a terminal a live status line.

What: `Progress.line` prints a permanent line (a run finished, a warning); on a TTY a status line
below it is redrawn in place about once a second while runs are going: runs done of total with
an ETA, and the current run's step, phase and loss read from the tail of its step log
(`ragtune.rundir.metrics_tail`). Without a TTY (a log file, CI) only the plain lines are
written, each with the count and the ETA. Why from the step log: runs are subprocesses, and the
file they already write is the one channel every launcher shares (local or Ray with a shared
filesystem).
"""

from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Optional

from ragtune import rundir


def fmt_duration(s: Optional[float]) -> str:
    """'45s', '3m05s', '2h07m'; '?' when unknown."""
    if s is None:
        return "?"
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def eta_seconds(done: int, total: int, durations: List[float], width: int = 1) -> Optional[float]:
    """Remaining time: the mean duration of the runs launched so far times the runs left, over the
    number of runs going at once. None before any launched run has finished."""
    if done >= total:
        return 0.0
    if not durations:
        return None
    return sum(durations) / len(durations) * (total - done) / max(1, width)


def run_status(label: str, tail: Optional[dict]) -> str:
    """'joint all generator=0.001 seed=0: step 40 phase all loss 2.314' (or 'starting')."""
    if not tail:
        return f"{label}: starting"
    loss = tail.get("loss")
    loss_s = f" loss {loss:.4g}" if isinstance(loss, (int, float)) else ""
    return f"{label}: step {tail.get('step', '?')} phase {tail.get('phase', '?')}{loss_s}"


def status_line(done: int, total: int, eta: Optional[float], current: str = "", width: int = 120) -> str:
    """'[3/13 runs, ETA 4m10s] <current>', cut to `width` characters."""
    line = f"[{done}/{total} runs, ETA {fmt_duration(eta)}]" + (f" {current}" if current else "")
    return line if len(line) <= width else line[: width - 1] + "…"


def current_run(running: Dict[str, str]) -> Optional[str]:
    """Of the runs still going ({run_dir: label}), the one whose step log moved last."""
    if not running:
        return None
    return max(running, key=rundir.last_activity)


class Progress:
    def __init__(
        self,
        total: int,
        width: int = 1,
        echo: Optional[Callable[[str], None]] = None,
        stream=None,
        interval: float = 1.0,
    ):
        """`echo` given (tests, callers collecting lines): plain lines to it, never a live line."""
        self.stream = stream or sys.stdout
        self.live = echo is None and hasattr(self.stream, "isatty") and self.stream.isatty()
        self._echo = echo or (lambda s: print(s, file=self.stream, flush=True))
        self.total, self.width, self.interval = total, width, interval
        self.done, self.durations, self.t0 = 0, [], time.time()
        self.running: Dict[str, str] = {}
        self._lock = threading.Lock()
        self._shown = False

    # ---- counting -------------------------------------------------------------------------------
    def finished(self, secs: Optional[float], run_dir: str = "") -> None:
        """A run is done; `secs` is None when it was done before (it says nothing about the ETA)."""
        with self._lock:
            self.done += 1
            if secs is not None:
                self.durations.append(secs)
            self.running.pop(run_dir, None)

    def skip(self, n: int) -> None:
        with self._lock:
            self.total -= n

    def unfinish(self, n: int) -> None:
        """`n` runs counted as finished turned out to be running elsewhere: they will finish again."""
        with self._lock:
            self.done -= n

    def counter(self) -> str:
        """' 3/13': runs done of total, padded to the width of the total."""
        return f"{self.done:>{len(str(self.total))}}/{self.total}"

    def eta(self) -> Optional[float]:
        return eta_seconds(self.done, self.total, self.durations, self.width)

    def elapsed(self) -> float:
        return time.time() - self.t0

    # ---- output ---------------------------------------------------------------------------------
    def line(self, text: str) -> None:
        """A permanent line (above the live status line on a terminal)."""
        with self._lock:
            self._clear()
            self._echo(text)
            self._draw()

    def _clear(self) -> None:
        if self.live and self._shown:
            self.stream.write("\r\x1b[2K")
            self._shown = False

    def _draw(self) -> None:
        if not self.live or not self.running:
            return
        cur = current_run(self.running)
        text = status_line(
            self.done, self.total, self.eta(), run_status(self.running[cur], rundir.metrics_tail(cur)) if cur else ""
        )
        self.stream.write("\r\x1b[2K" + text)
        self.stream.flush()
        self._shown = True

    @contextmanager
    def watching(self, running: Dict[str, str]) -> Iterator[None]:
        """While the block runs, the runs of `running` ({run_dir: label}) not yet `finished` are
        shown on the live line, redrawn every `interval` seconds."""
        with self._lock:
            self.running = dict(running)
        stop = threading.Event()

        def tick():
            while not stop.wait(self.interval):
                with self._lock:
                    self._draw()

        thread = threading.Thread(target=tick, daemon=True) if self.live else None
        if thread:
            thread.start()
        try:
            yield
        finally:
            stop.set()
            if thread:
                thread.join()
            with self._lock:
                self._clear()
                self.running = {}
