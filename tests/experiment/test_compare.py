"""`ragtune compare`: tables that match leaderboard.csv, the paired test, the plot, and clear
non-zero exits for missing, unfinished or failed directories."""

import csv
import io
import json
from contextlib import redirect_stdout

import pytest

from ragtune.cli import main as cli_main
from ragtune.experiment.runner import run_experiment
from ragtune.experiment.spec import load_experiment

from experiment_fakes import FakeLauncher, write_experiment


def _run_dir(tmp_path, name, ems, status="ok", strategy="s"):
    d = tmp_path / name
    d.mkdir()
    m = sum(ems) / len(ems)
    res = {
        "strategy": strategy,
        "status": status,
        "reason": "" if status == "ok" else "non-finite loss",
        "lr": {"generator": 1e-3},
        "dev": {"em": m, "f1": m, "n": len(ems), "normalization": "squad_v1.1"},
        "test": {"em": m, "f1": m, "n": len(ems), "normalization": "squad_v1.1"},
        "cost": {
            "flops": {"train": 10, "total_train": 10 * (1 + len(name))},
            "wall_seconds": {"total": 1.0},
            "device_hours": 0.1,
            "peak_memory_bytes": {"cpu": 1, "gpu": 0},
            "device": "cpu",
        },
    }
    (d / "result.json").write_text(json.dumps(res))
    for fname in ("predictions.jsonl", "predictions_dev.jsonl"):
        (d / fname).write_text("".join(json.dumps({"id": f"q{i}", "em": v, "f1": v}) + "\n" for i, v in enumerate(ems)))
    return d


def _call(args):
    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = cli_main(["compare", *(str(a) for a in args)])
    return rc, buf.getvalue()


def test_compare_csv_matches_leaderboard(tmp_path):
    path = write_experiment(tmp_path)
    assert run_experiment(load_experiment(str(path)), launcher=FakeLauncher(), echo=lambda s: None) == 0
    out = tmp_path / "out"
    rc, text = _call([out, "--format", "csv"])
    assert rc == 0
    printed = list(csv.DictReader(io.StringIO(text)))
    with open(out / "leaderboard.csv") as f:
        board = list(csv.DictReader(f))
    assert [r["strategy"] for r in printed] == [r["strategy"] for r in board]
    for p, b in zip(printed, board):
        assert {k: p[k] for k in b} == b
    rc, md = _call([out])
    assert rc == 0 and "paired test" in md and all(r["strategy"] in md for r in board)


def test_paired_test_between_top_two_runs(tmp_path, capsys):
    a = _run_dir(tmp_path, "a", [1.0] * 80 + [0.0] * 20)
    b = _run_dir(tmp_path, "b", [1.0] * 30 + [0.0] * 70)
    c = _run_dir(tmp_path, "c", [1.0] * 30 + [0.0] * 70)
    rc, md = _call([b, a, "--metric", "em"])
    assert rc == 0
    assert md.index("s (a)") < md.index("s (b)")  # sorted best first
    line = next(x for x in md.splitlines() if x.startswith("paired test"))
    assert "s (a) vs s (b)" in line and "+50.00" in line and float(line.split("p = ")[1].split()[0]) < 0.001
    rc, md = _call([b, c])
    line = next(x for x in md.splitlines() if x.startswith("paired test"))
    assert "p = 1 " in line


def test_pair_tests_named_rows_and_an_unknown_name_exits_1(tmp_path, capsys):
    a = _run_dir(tmp_path, "a", [1.0] * 80 + [0.0] * 20)
    b = _run_dir(tmp_path, "b", [1.0] * 50 + [0.0] * 50)
    c = _run_dir(tmp_path, "c", [1.0] * 30 + [0.0] * 70)
    rc, md = _call([a, b, c, "--pair", "s (c)", "s (b)"])
    lines = [x for x in md.splitlines() if x.startswith("paired test")]
    assert rc == 0 and len(lines) == 2  # the top two, then the requested pair
    assert "s (a) vs s (b)" in lines[0] and "s (c) vs s (b)" in lines[1] and "-20.00" in lines[1]
    rc, md = _call([a, b, c, "--pair", "s (a)", "s (b)"])  # the top two themselves: printed once
    assert rc == 0 and [x for x in md.splitlines() if x.startswith("paired test")] == lines[:1]
    rc, _ = _call([a, b, "--pair", "s (a)", "nope"])
    assert rc == 1 and "no finished row named nope" in capsys.readouterr().err


def test_plot_written(tmp_path):
    pytest.importorskip("matplotlib")
    a = _run_dir(tmp_path, "a", [1.0, 0.0, 1.0])
    b = _run_dir(tmp_path, "bb", [0.0, 0.0, 1.0])
    png = tmp_path / "plot.png"
    rc, _ = _call([a, b, "--plot", png])
    assert rc == 0 and png.stat().st_size > 1000


def test_missing_and_failed_dirs_exit_nonzero_naming_them(tmp_path, capsys):
    ok = _run_dir(tmp_path, "good", [1.0, 0.0])
    bad = _run_dir(tmp_path, "broken", [0.0, 0.0], status="diverged")
    rc, out = _call([ok, tmp_path / "nope"])
    err = capsys.readouterr().err
    assert rc == 1 and str(tmp_path / "nope") in err and "no such directory" in err and "s (good)" in out
    rc, _ = _call([ok, bad])
    err = capsys.readouterr().err
    assert rc == 1 and str(bad) in err and "diverged" in err
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text("run_dir: x\n")
    rc, _ = _call([unfinished])
    assert rc == 1 and "no result.json" in capsys.readouterr().err
    rc, _ = _call([ok, "--metric", "bleu"])
    assert rc == 2


def test_experiment_with_failed_strategy_exits_nonzero(tmp_path, capsys):
    path = write_experiment(tmp_path, grids={"default": {"query_encoder": [1e6], "generator": [1e6]}})
    assert run_experiment(load_experiment(str(path)), launcher=FakeLauncher(), echo=lambda s: None) == 1
    rc, _ = _call([tmp_path / "out"])
    err = capsys.readouterr().err
    assert rc == 1 and str(tmp_path / "out") in err and "failed" in err


def test_run_dir_cost_includes_the_init_from_chain(tmp_path):
    first = _run_dir(tmp_path, "p1", [1.0, 0.0])
    second = _run_dir(tmp_path, "p2", [1.0, 1.0])
    (second / "config.yaml").write_text(f"train:\n  init_from: {first}\n")
    rc, text = _call([second, "--format", "csv"])
    row = next(csv.DictReader(io.StringIO(text)))
    own = 10 * (1 + len("p2"))
    assert rc == 0 and int(float(row["flops_total_train"])) == own + 10 * (1 + len("p1"))
    assert float(row["wall_s"]) == 2.0


def test_kind_restricts_the_paired_test_to_those_questions(tmp_path):
    """--kind: the paired test reads only questions of that kind (and skips undefined values)."""
    a = _run_dir(tmp_path, "a", [1.0] * 60 + [0.0] * 40)
    b = _run_dir(tmp_path, "b", [0.0] * 60 + [1.0] * 40)
    for d in (a, b):  # q0-q59 bridge, q60-q89 single, q90-q99 comparison with an undefined value
        for fname in ("predictions.jsonl", "predictions_dev.jsonl"):
            rows = [json.loads(x) for x in (d / fname).read_text().splitlines()]
            for i, r in enumerate(rows):
                r["kind"] = "bridge" if i < 60 else ("single" if i < 90 else "comparison")
                if i >= 90:
                    r["em"] = None
            (d / fname).write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, md = _call([a, b, "--pair", "s (b)", "s (a)", "--kind", "bridge", "--kind", "comparison"])
    lines = [x for x in md.splitlines() if x.startswith("paired test")]
    assert "on bridge+comparison questions" in lines[0] and "over 60 questions" in lines[0]
    assert "+100.00" in lines[0] and "-100.00" in lines[1]
    _, md = _call([a, b, "--kind", "single"])
    line = next(x for x in md.splitlines() if x.startswith("paired test"))
    assert "over 30 questions" in line and "-100.00" in line
