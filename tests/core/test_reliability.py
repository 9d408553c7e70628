"""Reliability as a user meets it: every bad input is one line and the right exit code (no
traceback), torn files are survived or named, one trainer per run directory, strict JSON.

Marked `reliability` (`pytest -m reliability` runs just these); they are part of `make test`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from ragtune import cli, fileio, run, rundir
from ragtune.experiment.leaderboard import read_csv, write_csv

from helpers import ROOT, TINY, cache_dir, step_lines, tiny_cfg

pytestmark = pytest.mark.reliability


def _cli(capsys, *args):
    rc = cli.main(list(args))
    err = capsys.readouterr().err
    return rc, err


def _yaml(tmp_path, name, content: bytes):
    p = tmp_path / name
    p.write_bytes(content)
    return str(p)


# (extra args or a callable(tmp_path) -> args, expected exit code, fragment of the one-line error)
BAD_TRAIN = [
    (["train.lr.query_encoder=inf"], 2, "train.lr.query_encoder"),
    (["train.clip_norm=nan"], 2, "train.clip_norm"),
    (["train.weight_decay=nan"], 2, "train.weight_decay"),
    (["eval.k=100000"], 2, "eval.k"),
    (["eval.k=-1"], 2, "eval.k"),
    (["eval.recall_k=[0]"], 2, "eval.recall_k[0]"),
    (["eval.splits=[bogus]"], 2, "eval.splits[0]"),
    (["train.threads=-1"], 2, "train.threads"),
    (["index.batch_size=0"], 2, "index.batch_size"),
    (["generator.tiny.heads=3"], 2, "generator.tiny.heads"),
    (["generator.prompt_template={passage}{title}"], 2, "generator.prompt_template"),
    (["train.steps=[1"], 2, "overrides"),
    (["strategy.name=joint", "strategy.reduction=median"], 2, "strategy.reduction"),
    (["strategy.name=joint", "strategy.reduction=meen"], 2, "strategy.reduction"),
    (["data.field_map.bogus=x"], 2, "data.field_map.bogus"),
    (["generator.model=models/minilm"], 2, "model path not found"),
    (["strategy.name=no.such.module:Cls"], 2, "strategy.name"),
    (lambda d: [f"run_dir={_touch(d / 'afile')}"], 2, "run_dir"),
    (lambda d: [_yaml(d, "bad.yaml", b"train: [1, 2\n")], 2, "malformed YAML"),
    (lambda d: [_yaml(d, "list.yaml", b"- a\n- b\n")], 2, "top level must be a mapping"),
    (lambda d: [_yaml(d, "latin1.yaml", b"note: caf\xe9\n")], 2, "not UTF-8"),
    (
        lambda d: ["data.source=files", f"data.dir={_files(d, corpus=None)}"],
        1,
        "corpus.jsonl:0: <file>: file not found",
    ),
    (lambda d: ["data.source=files", f"data.dir={_files(d)}", "data.corpus=corpus.csv"], 1, "unsupported format"),
    (lambda d: ["data.source=files", f"data.dir={_files(d, bad_byte=True)}"], 1, "train.jsonl:2: <text>: not UTF-8"),
    (lambda d: ["data.source=files", f"data.dir={_files(d, leak=True)}"], 1, "also in the train split"),
]


def _touch(p):
    p.write_text("")
    return p


def _files(d, corpus="corpus.jsonl", bad_byte=False, leak=False):
    d = d / "data"
    d.mkdir(exist_ok=True)
    if corpus:
        (d / corpus).write_text(json.dumps({"id": "p1", "text": "Ann was born in Oslo."}) + "\n")
        (d / "corpus.csv").write_text("id,text\np1,x\n")
    rows = [
        {"id": f"q{i}", "question": f"Question {i}?", "answers": ["Oslo"], "gold_passage_ids": ["p1"]} for i in range(3)
    ]
    lines = [json.dumps(r).encode() for r in rows]
    if bad_byte:
        lines[1] = lines[1].replace(b"Question 1", b"Qu\xe9stion 1")
    (d / "train.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    for split in ("dev", "test"):
        r = rows[0] if leak and split == "test" else {**rows[0], "id": f"{split}1", "question": f"{split} question?"}
        (d / f"{split}.jsonl").write_text(json.dumps(r) + "\n")
    return d


@pytest.mark.parametrize("args, code, fragment", BAD_TRAIN, ids=lambda v: str(v)[:40] if not callable(v) else "file")
def test_bad_input_is_one_clear_line(tmp_path, capsys, args, code, fragment):
    args = args(tmp_path) if callable(args) else args
    files = [a for a in args if a.endswith(".yaml")]
    overrides = [a for a in args if not a.endswith(".yaml")]
    if not any(a.startswith("run_dir=") for a in overrides):
        overrides.append(f"run_dir={tmp_path / 'run'}")
    rc, err = _cli(capsys, "train", TINY, *files, f"data.cache_dir={cache_dir()}", *overrides)
    assert rc == code, err
    assert fragment in err and "Traceback" not in err, err


def test_torn_metrics_line_is_dropped_on_resume(tmp_path, capsys):
    common = ["strategy.name=joint", "train.steps=4", "train.save_every=2", "train.log_every=1", "eval.splits=[]"]
    with pytest.raises(KeyboardInterrupt):
        run.train_and_evaluate(tiny_cfg(tmp_path, *common, "debug.stop_after=3"))
    path = rundir.metrics_path(tmp_path)
    with open(path, "a") as f:
        f.write('{"step": 4, "loss": 1.2')  # a kill in the middle of a write
    res = run.train_and_evaluate(tiny_cfg(tmp_path, *common))
    assert res["status"] == "ok"
    assert "dropped 1 torn line" in capsys.readouterr().out
    assert [r["step"] for r in step_lines(path) if "loss" in r] == [1, 2, 3, 4]


def test_truncated_files_give_one_line_errors(tmp_path, capsys):
    cfg = tiny_cfg(tmp_path / "run", "strategy.name=joint", "train.steps=1", "eval.splits=[test]")
    assert run.train_and_evaluate(cfg)["status"] == "ok"
    final, result = rundir.final_path(cfg.run_dir), rundir.result_path(cfg.run_dir)
    final.write_bytes(final.read_bytes()[:1000])
    rc, err = _cli(capsys, "eval", cfg.run_dir)
    assert rc != 0 and "final.pt: unreadable" in err and "Traceback" not in err
    result.write_text(result.read_text()[:50])
    rc, err = _cli(capsys, "compare", cfg.run_dir)
    assert rc == 1 and "result.json: unreadable" in err and "Traceback" not in err
    board = tmp_path / "leaderboard.csv"
    write_csv(board, [{"strategy": "a", "test_em": 0.5}, {"strategy": "b", "test_em": 0.25}])
    assert [r["strategy"] for r in read_csv(board)] == ["a", "b"]
    board.write_text(board.read_text()[:-6])  # torn mid-row
    with pytest.raises(fileio.CorruptFile, match="leaderboard.csv"):
        read_csv(board)


def test_result_json_is_strict_json(tmp_path):
    rundir.write_result(tmp_path, {"status": "ok", "test": {"em": float("nan"), "x": float("inf"), "y": 0.5}})
    text = rundir.result_path(tmp_path).read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text)["test"] == {"em": None, "x": None, "y": 0.5}


def test_one_trainer_per_run_directory(tmp_path, capsys):
    lock = rundir.lock(tmp_path).acquire()  # as if another trainer held it
    try:
        assert lock.held_elsewhere()
        rc, err = _cli(capsys, "train", TINY, f"data.cache_dir={cache_dir()}", f"run_dir={tmp_path}")
        assert rc == rundir.EXIT["busy"] and "another process" in err
        assert not rundir.result_path(tmp_path).exists()
    finally:
        lock.release()
    assert not rundir.lock(tmp_path).held_elsewhere()
    rc, _ = _cli(capsys, "train", TINY, f"data.cache_dir={cache_dir()}", f"run_dir={tmp_path}", "train.steps=1")
    assert rc == 0


def test_lock_is_released_when_the_holder_is_killed(tmp_path):
    code = (
        f"from ragtune import rundir; rundir.lock({str(tmp_path)!r}).acquire(); print('held', flush=True); "
        "import time; time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    assert rundir.lock(tmp_path).held_elsewhere()
    proc.kill()
    proc.wait()
    deadline = time.time() + 10
    while rundir.lock(tmp_path).held_elsewhere() and time.time() < deadline:
        time.sleep(0.05)
    assert not rundir.lock(tmp_path).held_elsewhere()


def _experiment(out, *extra):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "ragtune.cli",
        "experiment",
        str(ROOT / "experiments" / "smoke.yaml"),
        f"out={out}",
        "strategies=[joint,two_phase]",
        f"overrides=[train.steps=4,data.cache_dir={cache_dir()}]",
        *extra,
    ]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)


def _board(out):
    rows = read_csv(out / "leaderboard.csv")
    measured = ("seconds", "wall", "device_hours", "peak_")  # timings and memory differ run to run
    rows = [{**r, "run_dirs": r["run_dirs"].replace(str(out), "OUT")} for r in rows]
    return [{k: v for k, v in r.items() if not any(m in k for m in measured)} for r in rows]


@pytest.mark.slow
def test_two_runners_on_one_experiment_equal_one_runner(tmp_path):
    single = _experiment(tmp_path / "single")
    assert single.wait(timeout=600) == 0
    a, b = _experiment(tmp_path / "shared"), _experiment(tmp_path / "shared")
    assert a.wait(timeout=600) == 0 and b.wait(timeout=600) == 0
    assert _board(tmp_path / "shared") == _board(tmp_path / "single")
    for d in (tmp_path / "shared" / "runs").rglob(rundir.RESULT):  # each run trained once: one line per step
        steps = [r["step"] for r in step_lines(d.parent / rundir.METRICS) if "loss" in r]
        assert steps == sorted(set(steps)), d.parent
    ref = {p.relative_to(tmp_path / "single"): p for p in (tmp_path / "single" / "runs").rglob(rundir.FINAL)}
    for rel, p in ref.items():
        other = torch.load(tmp_path / "shared" / rel, weights_only=False)["weights"]
        mine = torch.load(p, weights_only=False)["weights"]
        assert all(torch.equal(other[k], mine[k]) for k in mine), rel


def test_kill_during_a_checkpoint_write_leaves_the_previous_checkpoint(tmp_path):
    """A kill in the middle of `save` leaves a partial temporary file beside the old last.pt (the
    rename never happened): the resume ignores it and ends as an undisturbed run."""
    common = ["strategy.name=joint", "train.steps=4", "train.save_every=1", "eval.splits=[]"]
    a = run.train_and_evaluate(tiny_cfg(tmp_path / "a", *common))
    with pytest.raises(KeyboardInterrupt):
        run.train_and_evaluate(tiny_cfg(tmp_path / "b", *common, "debug.stop_after=2"))
    ckpt = rundir.checkpoints_dir(tmp_path / "b")
    (ckpt / ".last.pt.99999.tmp").write_bytes(b"PK\x03\x04 torn")  # what a kill mid-write leaves
    b = run.train_and_evaluate(tiny_cfg(tmp_path / "b", *common))
    assert a["status"] == b["status"] == "ok"
    wa = torch.load(rundir.final_path(tmp_path / "a"), weights_only=False)["weights"]
    wb = torch.load(rundir.final_path(tmp_path / "b"), weights_only=False)["weights"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def _children(pid: int) -> list:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def test_trainers_die_with_a_killed_runner(tmp_path):
    runner = _experiment(tmp_path / "exp")
    deadline, kids = time.time() + 120, []
    while not kids and time.time() < deadline and runner.poll() is None:
        kids = _children(runner.pid)
        time.sleep(0.1)
    assert kids, "the runner launched no trainer"
    runner.kill()  # SIGKILL: the runner cannot clean up; the kernel tells its children
    runner.wait()
    deadline = time.time() + 20
    while time.time() < deadline and any(os.path.exists(f"/proc/{k}") for k in kids):
        time.sleep(0.1)
    alive = [k for k in kids if os.path.exists(f"/proc/{k}") and "zombie" not in _state(k)]
    assert not alive, f"orphaned trainers still running: {alive}"


def _state(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/status").read().split("State:")[1].split("\n")[0].lower()
    except OSError:
        return "gone"
