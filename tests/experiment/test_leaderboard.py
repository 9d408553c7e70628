"""Leaderboard statistics and rows: bootstrap CIs, the paired test, seed aggregation, cost columns."""

import json
import math

import numpy as np
import pytest

from ragtune.experiment.leaderboard import read_csv, sort_rows, summarize, write_leaderboard
from ragtune.experiment.records import add_costs, flat_cost
from ragtune.experiment.stats import bootstrap_ci, paired_permutation_test, per_question


def test_bootstrap_ci_contains_mean_and_is_deterministic():
    rng = np.random.default_rng(1)
    x = (rng.random(200) < 0.3).astype(float)
    lo, hi = bootstrap_ci(x, 1000, seed=0)
    assert lo < x.mean() < hi and 0.15 < lo and hi < 0.45
    assert bootstrap_ci(x, 1000, seed=0) == (lo, hi)
    assert bootstrap_ci(x, 1000, seed=1) != (lo, hi)
    lo4, hi4 = bootstrap_ci(np.tile(x, 4), 1000, seed=0)  # 4x the questions: about half the width
    assert (hi4 - lo4) < 0.7 * (hi - lo)
    assert bootstrap_ci([1.0] * 10) == (1.0, 1.0)
    assert all(math.isnan(v) for v in bootstrap_ci([]))


def test_paired_test_identical_vs_different():
    rng = np.random.default_rng(0)
    a = (rng.random(300) < 0.5).astype(float)
    assert paired_permutation_test(a, a) == 1.0
    b = a.copy()
    flip = np.where(a == 0)[0][:60]  # b right on 60 more questions than a
    b[flip] = 1.0
    assert paired_permutation_test(b, a) < 0.001
    assert paired_permutation_test(b, a) == paired_permutation_test(b, a)  # seeded
    noisy = a.copy()
    idx = rng.choice(300, 20, replace=False)
    noisy[idx] = 1 - noisy[idx]  # 20 random flips both ways: no real difference
    assert paired_permutation_test(noisy, a) > 0.05
    # exact for few differences: 3 differences all in one direction -> 2 of 8 sign patterns as extreme
    assert paired_permutation_test([1, 1, 1, 0], [0, 0, 0, 0]) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        paired_permutation_test([1, 0], [1, 0, 1])
    for short, long in (([1.0], [1.0, 0.0, 1.0]), ([1.0, 0.0, 1.0], [1.0])):  # never broadcast one element
        with pytest.raises(ValueError, match="equally long"):
            paired_permutation_test(short, long)


def _run(tmp_path, name, ems, em_dev, flops, decoder="greedy_rescore"):
    d = tmp_path / name
    d.mkdir()
    for split, vals in (("test", ems), ("dev", ems)):
        fname = "predictions.jsonl" if split == "test" else "predictions_dev.jsonl"
        (d / fname).write_text(
            "".join(json.dumps({"id": f"q{i}", "em": v, "f1": v}) + "\n" for i, v in enumerate(vals))
        )
    cost = flat_cost(
        {
            "flops": {"train": flops, "score": 1, "generate": 2, "index": 3, "total_train": flops + 6},
            "wall_seconds": {"total": 10.0},
            "device_hours": 0.5,
            "device": "cpu: test",
            "peak_memory_bytes": {"cpu": 2**21, "gpu": 0},
        }
    )
    m = sum(ems) / len(ems)
    scores = {
        "dev": {"em": em_dev, "f1": em_dev, "n": len(ems), "normalization": "squad_v1.1", "recall@1": 0.5},
        "test": {"em": m, "f1": m, "n": len(ems), "normalization": "squad_v1.1", "recall@1": 0.25},
    }
    for split in scores.values():
        split["decoder"] = decoder
    return {"dir": str(d), "scores": scores, "cost": cost}


def test_summarize_aggregates_seeds_and_costs(tmp_path):
    r0 = _run(tmp_path, "s0", [1, 1, 0, 0], 0.5, 100)
    r1 = _run(tmp_path, "s1", [1, 0, 0, 0], 0.25, 100)
    grid = [r0["cost"], r1["cost"], r0["cost"], None]  # a crashed run adds no cost
    row = summarize("x", {"generator": 1e-3}, [r0, r1], grid, n_runs=4, n_failed=1, splits=["dev", "test"])
    assert row["test_em_mean"] == pytest.approx(0.375) and row["test_em_std"] == pytest.approx(
        np.std([0.5, 0.25], ddof=1)
    )
    assert row["test_em_ci_lo"] <= row["test_em_mean"] <= row["test_em_ci_hi"]
    assert per_question([r0["dir"], r1["dir"]], "test", "em") == {"q0": 1.0, "q1": 0.5, "q2": 0.0, "q3": 0.0}
    assert row["test_recall@1_mean"] == 0.25 and row["dev_recall@1_mean"] == 0.5
    assert row["flops_total_train"] == 106 and row["flops_index"] == 3
    assert row["grid_flops_total_train"] == 3 * 106 and row["grid_device_hours"] == pytest.approx(1.5)
    assert row["device"] == "cpu: test" and row["peak_cpu_mb"] == 2.0 and row["lr_generator"] == 1e-3
    assert row["n_runs"] == 4 and row["n_failed"] == 1 and row["normalization"] == "squad_v1.1"
    one = summarize("y", {}, [r0], [r0["cost"]], 1, 0, ["test"])
    assert math.isnan(one["test_em_std"]) and "dev_em_mean" not in one


def test_chained_cost_sums_and_keeps_peak():
    a = flat_cost(
        {
            "flops": {"train": 1, "total_train": 1},
            "wall_seconds": {"total": 1.0},
            "device_hours": 1.0,
            "peak_memory_bytes": {"cpu": 5, "gpu": 1},
            "device": "d",
        }
    )
    b = flat_cost(
        {
            "flops": {"train": 2, "total_train": 3},
            "wall_seconds": {"total": 2.0},
            "device_hours": 2.0,
            "peak_memory_bytes": {"cpu": 3, "gpu": 7},
            "device": "d",
        }
    )
    c = add_costs(a, b)
    assert c["flops_train"] == 3 and c["flops_total_train"] == 4 and c["wall_s"] == 3.0 and c["device_hours"] == 3.0
    assert c["peak_cpu_bytes"] == 5 and c["peak_gpu_bytes"] == 7 and c["device"] == "d"
    assert add_costs(None, b) == b


def test_leaderboard_files_sorted_with_normalization(tmp_path):
    good = summarize("good", {}, [_run(tmp_path, "g", [1, 1, 1, 0], 0.7, 10)], [None], 1, 0, ["dev", "test"])
    bad = summarize("bad", {}, [_run(tmp_path, "b", [1, 0, 0, 0], 0.9, 10)], [None], 1, 0, ["dev", "test"])
    fail = summarize("broken", {}, [], [None], 2, 2, ["dev", "test"], status="failed", reason="all runs failed")
    out = tmp_path / "out"
    out.mkdir()
    write_leaderboard(out, [fail, bad, good], "t", ["dev", "test"], "em", [0], {"samples": 100, "seed": 0}, "local")
    rows = read_csv(out / "leaderboard.csv")
    assert [r["strategy"] for r in rows] == ["good", "bad", "broken"]  # test EM, not dev EM; failed last
    assert float(rows[0]["test_em_mean"]) == 0.75
    md = (out / "leaderboard.md").read_text()
    assert "squad_v1.1" in md and "dev em" in md and "broken: failed: all runs failed" in md
    assert md.index("| good") < md.index("| bad") and "75.0" in md
    assert [r["strategy"] for r in sort_rows([good, bad], "em", ("dev",))] == ["bad", "good"]


def test_strategy_reported_metrics_and_eval_cost_are_shown(tmp_path):
    from ragtune.experiment.leaderboard import eval_cost_table, markdown_table, multi_hop_table

    r = _run(tmp_path, "m", [1, 0, 1, 0], 0.5, 10)
    for split, secs in (("dev", 0.02), ("test", 0.03)):
        r["scores"][split].update(
            hops=2.5,
            rounds=2.0,
            queries_per_round=1.5,
            seconds_per_question=secs,
            flops_per_question=1.5e9,
            errors=0,
            eval_batch_size=32,
            **{"sp_recall/bridge": 0.75, "rounds/bridge": 2.0, "em/single": 0.5},
        )
    plain = summarize("plain", {}, [_run(tmp_path, "p", [1, 0, 0, 0], 0.2, 10)], [None], 1, 0, ["dev", "test"])
    multi = summarize("multi", {}, [r], [None], 1, 0, ["dev", "test"])
    assert multi["test_hops_mean"] == 2.5 and multi["dev_seconds_per_question_mean"] == 0.02
    # per-kind numbers: only the multi-hop kinds of the kept metrics reach the row
    assert multi["test_sp_recall/bridge_mean"] == 0.75 and "test_em/single_mean" not in multi
    md = markdown_table([multi, plain], ["dev", "test"])
    head = md.splitlines()[0]
    # a strategy-reported metric is in the main table; rounds and seconds are in the cost table
    assert "test hops" in head and "seconds" not in head and "rounds" not in head
    assert "| 2.5 |" in md.splitlines()[2] and "| – |" in md.splitlines()[3]
    ev = eval_cost_table([multi, plain], ["dev", "test"])
    assert "dev s/question" in ev and "test eval FLOPs/question" in ev and "test errors" in ev
    assert "test rounds" in ev and "test queries/round" in ev and "| 2.00 | 1.50 |" in ev
    assert "0.03" in ev and "1.5e+09" in ev
    hop = multi_hop_table([multi, plain], "test")
    assert "test sp recall bridge" in hop and "| multi | 75.0 | 2.00 |" in hop and "| plain | – | – |" in hop
    assert eval_cost_table([plain], ["dev", "test"]) == ""  # nothing reported: no table
    out = tmp_path / "out"
    out.mkdir()
    write_leaderboard(out, [multi, plain], "t", ["dev", "test"], "em", [0], {"samples": 10, "seed": 0}, "local")
    assert "## Evaluation cost per question" in (out / "leaderboard.md").read_text()
    assert "test_rounds_mean" in read_csv(out / "leaderboard.csv")[0]
    assert "## Multi-hop questions (test)" in (out / "leaderboard.md").read_text()


def test_decoder_column_per_strategy(tmp_path):
    from ragtune.experiment.leaderboard import markdown_table

    tok = summarize(
        "tok", {}, [_run(tmp_path, "t", [1, 0, 0, 0], 0.2, 10, "token_mixture(beams=4)")], [None], 1, 0, ["dev", "test"]
    )
    seq = summarize(
        "seq", {}, [_run(tmp_path, "s", [1, 1, 0, 0], 0.5, 10, "thorough(beams=2)")], [None], 1, 0, ["dev", "test"]
    )
    assert tok["test_decoder"] == tok["dev_decoder"] == "token_mixture(beams=4)"
    mixed = _run(tmp_path, "x", [1, 0, 1, 0], 0.5, 10)
    mixed["scores"]["test"]["decoder"] = "mixed.predict"
    mix = summarize("mix", {}, [mixed], [None], 1, 0, ["dev", "test"])
    old = summarize("old", {}, [_run(tmp_path, "o", [0, 0, 0, 0], 0.0, 10, "")], [None], 1, 0, ["dev", "test"])
    lines = markdown_table([seq, tok, mix, old], ["dev", "test"]).splitlines()
    col = [c.strip() for c in lines[0].split("|")].index("decoder")
    cells = [[c.strip() for c in line.split("|")][col] for line in lines[2:]]
    assert cells == ["thorough(beams=2)", "token_mixture(beams=4)", "dev: greedy_rescore; test: mixed.predict", "–"]
    out = tmp_path / "out"
    out.mkdir()
    write_leaderboard(out, [seq, tok], "t", ["dev", "test"], "em", [0], {"samples": 10, "seed": 0}, "local")
    assert {r["strategy"]: r["test_decoder"] for r in read_csv(out / "leaderboard.csv")} == {
        "seq": "thorough(beams=2)",
        "tok": "token_mixture(beams=4)",
    }
