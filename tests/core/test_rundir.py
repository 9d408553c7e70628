"""The run-directory contract (ragtune.rundir): names, readers, status <-> exit code, the
`train.init_from` chain, freshness of scores and the metrics tail the progress line reads."""

import json
import os

import pytest

from ragtune import fileio, rundir
from ragtune.config import ConfigError


def _touch(path, t):
    os.utime(path, (t, t))


def test_file_names_and_predictions_per_split(tmp_path):
    assert rundir.predictions_path(tmp_path, "test").name == "predictions.jsonl"
    assert rundir.predictions_path(tmp_path, "dev").name == "predictions_dev.jsonl"
    assert rundir.result_path(tmp_path).name == "result.json" and rundir.final_path(tmp_path).name == "final.pt"
    rows = [{"id": "q1", "em": 1.0}, {"id": "q2", "em": 0.0}]
    rundir.write_predictions(tmp_path, "dev", rows)
    assert rundir.read_predictions(tmp_path, "dev") == rows and rundir.read_predictions(tmp_path, "test") is None


def test_result_reader_writer_and_finished(tmp_path):
    assert rundir.read_result(tmp_path) is None and not rundir.is_run_dir(tmp_path)
    rundir.write_result(tmp_path, {"status": "ok", "dev": {"em": 0.5}})
    assert rundir.read_result(tmp_path)["dev"] == {"em": 0.5} and rundir.is_run_dir(tmp_path)
    assert not list(tmp_path.glob("*.tmp"))  # written atomically
    assert rundir.finished_result(tmp_path)["status"] == "ok"
    rundir.write_result(tmp_path, {"status": "diverged"})
    assert rundir.finished_result(tmp_path)["status"] == "diverged"
    rundir.write_result(tmp_path, {"status": "failed"})
    assert rundir.finished_result(tmp_path) is None and not rundir.result_path(tmp_path).exists()  # retried
    rundir.result_path(tmp_path).write_text("{torn")
    with pytest.raises(ValueError, match="unreadable"):
        rundir.read_result(tmp_path)


def test_status_and_exit_codes():
    assert [rundir.exit_code({"status": s}) for s in ("ok", "failed", "diverged")] == [0, 1, 3]
    assert [rundir.status_of_exit(c) for c in (0, 1, 2, 3, 130, -2, 137)] == [
        "ok",
        "failed",
        "bad config",
        "diverged",
        "interrupted",
        "interrupted",
        "failed",
    ]
    assert all(rundir.status_of_exit(rundir.exit_code({"status": s})) == s for s in rundir.STATUS_EXIT)


def test_init_from_chain_first_phase_first(tmp_path):
    a, b, c = (tmp_path / n for n in "abc")
    for d in (a, b, c):
        d.mkdir()
    (b / "config.yaml").write_text(f"train:\n  init_from: {a}\n")
    (c / "config.yaml").write_text(f"train:\n  init_from: {b}\n")
    (a / "config.yaml").write_text("train:\n  init_from: ''\n")
    assert rundir.init_from(c) == b and rundir.init_from(a) is None
    assert rundir.init_chain(c) == [a, b, c] and rundir.init_chain(tmp_path / "nothing") == [tmp_path / "nothing"]
    (a / "config.yaml").write_text(f"train:\n  init_from: {c}\n")  # a cycle is cut, not followed forever
    assert rundir.init_chain(c) == [a, b, c]


def test_scores_freshness_and_all_scores(tmp_path):
    rundir.write_result(tmp_path, {"status": "ok", "dev": {"em": 0.5}, "test": None})
    assert not rundir.scores_fresh(tmp_path, "test") and rundir.all_scores(tmp_path) == {"dev": {"em": 0.5}}
    rundir.write_scores(tmp_path, {"test": {"em": 0.25}})
    assert rundir.scores_fresh(tmp_path, "test") and not rundir.scores_fresh(tmp_path, "dev")
    assert rundir.all_scores(tmp_path) == {"dev": {"em": 0.5}, "test": {"em": 0.25}}
    _touch(rundir.scores_path(tmp_path), 1_000_000)  # scores older than a re-trained result
    assert not rundir.scores_fresh(tmp_path, "test") and "test" not in rundir.all_scores(tmp_path)
    rundir.scores_path(tmp_path).write_text("{torn")
    with pytest.raises(fileio.CorruptFile, match="scores.json"):  # named, never silently empty
        rundir.read_scores(tmp_path)


def test_metrics_tail_reads_the_last_training_row(tmp_path):
    assert rundir.metrics_tail(tmp_path) is None
    rows = [{"time": 1, "step": i, "phase": "generator", "loss": 3.0 - i / 10} for i in range(1, 400)]
    rows.append({"time": 2, "step": 399, "phase": "generator", "dev/em": 0.1})  # a dev row has no loss
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"time": 3, "step": 40'  # a half-written line
    rundir.metrics_path(tmp_path).write_text(text)
    tail = rundir.metrics_tail(tmp_path)
    assert tail["step"] == 399 and tail["phase"] == "generator" and tail["loss"] == pytest.approx(3.0 - 39.9)
    assert rundir.last_activity(tmp_path) > 0 and rundir.last_activity(tmp_path / "x") == 0.0


def test_log_tail_and_read_final_errors(tmp_path):
    assert rundir.log_tail(tmp_path) == "no log"
    rundir.log_path(tmp_path).write_text("loading\n 50%|#####     | 1/2\nTraceback\nRuntimeError: boom\n")
    assert rundir.log_tail(tmp_path) == "loading | Traceback | RuntimeError: boom"
    with pytest.raises(ConfigError, match="config key 'train.init_from': no final.pt"):
        rundir.read_final(tmp_path, "train.init_from")
