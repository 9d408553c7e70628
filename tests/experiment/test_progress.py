"""Experiment progress: formatting of the status line, the ETA, which run is current, and the
live line on a terminal (a fake TTY stream) versus plain lines otherwise."""

import io
import json
import os

from ragtune import rundir
from ragtune.experiment.progress import Progress, current_run, eta_seconds, fmt_duration, run_status, status_line


def test_formatting():
    assert [fmt_duration(s) for s in (None, 4.4, 65, 3 * 3600 + 7 * 60)] == ["?", "4s", "1m05s", "3h07m"]
    assert eta_seconds(3, 13, [], 1) is None and eta_seconds(13, 13, [], 1) == 0.0
    assert eta_seconds(3, 13, [10.0, 30.0], 2) == 100.0  # mean 20 s x 10 runs left / 2 at once
    tail = {"step": 40, "phase": "generator", "loss": 2.31416}
    assert (
        run_status("joint all generator=0.001 seed=0", tail)
        == "joint all generator=0.001 seed=0: step 40 phase generator loss 2.314"
    )
    assert run_status("x", None) == "x: starting"
    assert status_line(3, 13, 250, "x: starting") == "[3/13 runs, ETA 4m10s] x: starting"
    assert len(status_line(3, 13, None, "y" * 500, width=80)) == 80


def test_current_run_is_the_one_whose_metrics_moved_last(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d, t in ((a, 1_000), (b, 2_000)):
        d.mkdir()
        rundir.metrics_path(d).write_text(json.dumps({"step": 1, "phase": "all", "loss": 1.0}) + "\n")
        os.utime(rundir.metrics_path(d), (t, t))
    assert current_run({str(a): "a", str(b): "b"}) == str(b)
    assert current_run({str(a): "a", str(tmp_path / "new"): "new"}) == str(a)
    assert current_run({}) is None


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_live_line_on_a_tty_and_plain_lines_otherwise(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    rundir.metrics_path(d).write_text(json.dumps({"step": 7, "phase": "retriever", "loss": 0.5}) + "\n")
    tty = _Tty()
    p = Progress(2, stream=tty, interval=0.01)
    assert p.live
    with p.watching({str(d): "s all seed=0"}):
        p.line("a finished run")
        p.finished(3.0, str(d))
    out = tty.getvalue()
    assert (
        "a finished run\n" in out and "\r\x1b[2K[0/2 runs, ETA ?] s all seed=0: step 7 phase retriever loss 0.5" in out
    )
    lines = []
    plain = Progress(2, echo=lines.append)
    assert not plain.live
    with plain.watching({str(d): "s"}):
        plain.line("done")
    assert lines == ["done"]
    assert not Progress(1, stream=io.StringIO()).live  # not a terminal: plain lines only
