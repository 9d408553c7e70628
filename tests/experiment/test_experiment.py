"""Experiment runner logic with faked runs: grid expansion, phase-wise search, selection, failures,
resume and cost accounting (no training; see test_experiment_real.py for real subprocesses)."""

import csv
import json
import os

import pytest

from ragtune.cli import main as cli_main
from ragtune.config import ConfigError
from ragtune.experiment.grid import make_plan, select, stage_runs
from ragtune.experiment.runner import run_experiment
from ragtune.experiment.spec import load_experiment, strategy_names
from ragtune.strategies import REGISTRY
from ragtune.strategy import Phase, Strategy

from experiment_fakes import RUN_FLOPS, FakeLauncher, phase_lrs, write_experiment


def _plans(tmp_path):
    spec = load_experiment(str(write_experiment(tmp_path)))
    return spec, {n: make_plan(spec, n) for n in REGISTRY}


def _two_component(plans):
    """A registered single-phase strategy that trains two components at once."""
    found = [n for n, p in plans.items() if not p.phasewise and len(p.stages) == 1 and len(p.stages[0].axes) == 2]
    assert found, "no registered strategy trains two components in one phase"
    return found[0]


def _phased(plans):
    found = [n for n, p in plans.items() if p.phasewise and all(len(st.axes) == 1 for st in p.stages)]
    assert found, "no registered multi-phase strategy with one component per phase"
    return found[0]


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_strategies_all_is_the_registry(tmp_path):
    spec = load_experiment(str(write_experiment(tmp_path)))
    assert strategy_names(spec) == list(REGISTRY)
    spec = load_experiment(str(write_experiment(tmp_path)), [f"strategies=[{list(REGISTRY)[0]}]"])
    assert strategy_names(spec) == [list(REGISTRY)[0]]


def test_two_component_strategy_gets_2d_product(tmp_path):
    spec, plans = _plans(tmp_path)
    plan = plans[_two_component(plans)]
    assert plan.stages[0].phase == "all" and {a.name for a in plan.stages[0].axes} == {"query_encoder", "generator"}
    runs = stage_runs(plan, 0, [0, 1], tmp_path)
    assert len(runs) == 2 * 2 * 2 and plan.n_runs(2) == 8
    assert len({r.run_dir for r in runs}) == 8
    assert {r.lrs for r in runs} == {
        (("generator", g), ("query_encoder", q)) for g in (1e-3, 3e-3) for q in (1e-5, 3e-5)
    }
    assert all("eval.splits=[dev]" in r.overrides and not any("only_phase" in o for o in r.overrides) for r in runs)
    # every value is set per phase (a strategy's own phase defaults cannot shadow the grid)
    assert all(sum(o.startswith("train.phase.") for o in r.overrides) == 2 for r in runs)


def test_no_trainable_component_is_one_run(tmp_path):
    spec, plans = _plans(tmp_path)
    empty = [n for n, p in plans.items() if not p.axes]
    if not empty:
        pytest.skip("no registered strategy trains nothing")
    for n in empty:
        assert plans[n].n_runs(3) == 3 and [(st.phase, st.axes) for st in plans[n].stages] == [("all", ())]
        assert [r.run_dir.rsplit("/", 2)[-2:] for r in stage_runs(plans[n], 0, [0], tmp_path)] == [["all", "seed-0"]]


def test_search_product_forces_full_product(tmp_path):
    spec, plans = _plans(tmp_path)
    name = _phased(plans)
    spec = load_experiment(str(write_experiment(tmp_path, search="product")))
    plan = make_plan(spec, name)
    assert not plan.phasewise and [st.phase for st in plan.stages] == ["all"] and plan.n_runs(1) == 4
    assert [a.name for a in plan.stages[0].axes] == sorted(plan.axes)


def test_phasewise_search_starts_phase_2_from_best_phase_1(tmp_path):
    spec, plans = _plans(tmp_path)
    name = _phased(plans)
    (p1, c1), (p2, c2) = [(st.phase, st.axes[0].name) for st in plans[name].stages]
    path = write_experiment(tmp_path, strategies=[name], seeds=[0, 1])
    fake = FakeLauncher()
    assert run_experiment(load_experiment(str(path)), launcher=fake, echo=lambda s: None) == 0
    assert len(fake.launched) == (2 + 2) * 2 + 1  # 1-D per phase, per seed; + one test-eval job
    runs = _rows(tmp_path / "out" / "runs.csv")
    first = [r for r in runs if r["phase"] == p1]
    second = [r for r in runs if r["phase"] == p2]
    assert len(first) == 4 and len(second) == 4
    best1 = max(first, key=lambda r: float(r[f"lr_{c1}"]))  # the fake score prefers the larger lr
    for r in second:
        assert float(r[f"lr_{c1}"]) == float(best1[f"lr_{c1}"])
        parent = next(x for x in first if x["run_dir"] == r["parent"])
        assert parent["seed"] == r["seed"] and parent[f"lr_{c1}"] == best1[f"lr_{c1}"]
        res = json.loads(open(os.path.join(r["run_dir"], "result.json")).read())
        assert res["overrides"]["train.init_from"] == r["parent"]
        assert res["overrides"]["train.only_phase"] == p2
    sel = json.loads((tmp_path / "out" / "selected.json").read_text())["strategies"][name]
    assert sel["lrs"] == {c1: 3e-3 if c1 == "generator" else 3e-5, c2: 3e-3 if c2 == "generator" else 3e-5}
    assert all(len(chain) == 2 for chain in sel["chain"])
    row = _rows(tmp_path / "out" / "leaderboard.csv")[0]
    # selected cost = phase-2 run + its phase-1 parent; grid cost = every run once
    assert int(float(row["flops_total_train"])) == 2 * RUN_FLOPS["total_train"]
    assert int(float(row["flops_train"])) == 2 * RUN_FLOPS["train"]
    assert int(row["grid_flops_total_train"]) == 8 * RUN_FLOPS["total_train"]
    assert row["n_runs"] == "8" and row["n_failed"] == "0" and row["n_seeds"] == "2"


def test_selection_uses_metric_direction_and_seed_mean():
    from ragtune.experiment.grid import RunSpec

    a = [RunSpec("s", 0, "all", (("generator", g),), seed, f"d{g}{seed}", ()) for g in (1, 2) for seed in (0, 1)]
    score = {"d10": 0.5, "d11": 0.1, "d20": 0.4, "d21": 0.4}  # means: g=1 -> 0.3, g=2 -> 0.4
    assert select(a, score, True)[0].lrs == (("generator", 2),)
    assert select(a, score, False)[0].lrs == (("generator", 1),)
    score["d21"] = None  # a failed seed drops its point
    assert select(a, score, True)[0].lrs == (("generator", 1),)


def test_diverged_and_crashed_runs_are_recorded_and_grid_goes_on(tmp_path):
    spec, plans = _plans(tmp_path)
    name = _two_component(plans)
    path = write_experiment(
        tmp_path, strategies=[name], grids={"default": {"query_encoder": [1e-5, 3e-5], "generator": [1e-3, 2e-3, 1e6]}}
    )
    how = {(1e-3, 3e-5): "kill", (2e-3, 1e-5): "error"}  # killed: no result.json; error: status failed

    def crash(ov):
        lrs = {c: v for (_, c), v in phase_lrs(ov).items()}
        return how.get((lrs["generator"], lrs["query_encoder"]))

    fake = FakeLauncher(crash=crash)
    assert run_experiment(load_experiment(str(path)), launcher=fake, echo=lambda s: None) == 0
    runs = {(r["lr_generator"], r["lr_query_encoder"]): r for r in _rows(tmp_path / "out" / "runs.csv")}
    assert (
        runs[("1000000.0", "1e-05")]["status"] == "diverged" and "non-finite" in runs[("1000000.0", "1e-05")]["reason"]
    )
    killed, errored = runs[("0.001", "3e-05")], runs[("0.002", "1e-05")]
    assert (
        killed["status"] == "failed" and "RuntimeError: boom" in killed["reason"] and "exit code 1" in killed["reason"]
    )
    assert errored["status"] == "failed" and "RuntimeError: boom" in errored["reason"]
    row = _rows(tmp_path / "out" / "leaderboard.csv")[0]
    assert row["status"] == "ok" and row["lrs"] == "generator=0.002 query_encoder=3e-05"
    assert row["n_runs"] == "6" and row["n_failed"] == "4"
    # diverged and errored runs have a cost and count in the grid; the killed one recorded none
    assert int(row["grid_flops_total_train"]) == 5 * RUN_FLOPS["total_train"]
    # failed runs are retried by a re-run (they resume from their checkpoints); diverged ones are final
    fake2 = FakeLauncher()
    assert run_experiment(load_experiment(str(path)), launcher=fake2, echo=lambda s: None) == 0
    assert fake2.launched == [killed["run_dir"], errored["run_dir"]]
    assert _rows(tmp_path / "out" / "leaderboard.csv")[0]["n_failed"] == "2"


def test_stop_after_n_runs_then_resume_skips_finished(tmp_path):
    path = write_experiment(tmp_path)
    spec = load_experiment(str(path))
    total = sum(make_plan(spec, n).n_runs(1) for n in REGISTRY)
    first = FakeLauncher(limit=3)  # a Ctrl-C before the 4th launch
    assert run_experiment(spec, launcher=first, echo=lambda s: None) == 130
    assert len(first.launched) == 3
    assert not (tmp_path / "out" / "leaderboard.csv").exists()
    assert len(_rows(tmp_path / "out" / "runs.csv")) >= 3
    mtimes = {d: os.stat(os.path.join(d, "result.json")).st_mtime_ns for d in first.launched}
    second = FakeLauncher()
    lines = []
    assert run_experiment(load_experiment(str(path)), launcher=second, echo=lines.append) == 0
    assert len(second.launched) == (total - 3) + 1  # the rest + one test-eval job
    assert not set(first.launched) & set(second.launched[: total - 3])
    assert sum("done before" in line for line in lines) == 3
    assert all(os.stat(os.path.join(d, "result.json")).st_mtime_ns == t for d, t in mtimes.items())
    board = _rows(tmp_path / "out" / "leaderboard.csv")
    assert sorted(r["strategy"] for r in board) == sorted(REGISTRY) and all(r["status"] == "ok" for r in board)
    assert len(_rows(tmp_path / "out" / "runs.csv")) == total
    # a third run launches nothing at all
    third = FakeLauncher()
    assert run_experiment(load_experiment(str(path)), launcher=third, echo=lambda s: None) == 0 and third.launched == []


def test_unknown_key_is_exit_2_naming_the_key(tmp_path, capsys):
    path = write_experiment(tmp_path)
    assert cli_main(["experiment", str(path), "grdis.default.generator=[1]"]) == 2
    assert "grdis" in capsys.readouterr().err
    bad = write_experiment(tmp_path, selct={"metric": "em"})
    assert cli_main(["experiment", str(bad)]) == 2
    assert "selct" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="grids.default.bogus"):
        load_experiment(str(write_experiment(tmp_path, grids={"default": {"bogus": [1.0]}})))
    with pytest.raises(ConfigError, match="strategies"):
        load_experiment(str(write_experiment(tmp_path, strategies=["no_such_strategy"])))


def test_bad_run_override_fails_before_any_run(tmp_path, capsys):
    path = write_experiment(tmp_path, overrides=["train.stepz=3"])
    fake = FakeLauncher()
    with pytest.raises(ConfigError, match="stepz"):
        run_experiment(load_experiment(str(path)), launcher=fake, echo=lambda s: None)
    assert fake.launched == []


def test_progress_line_per_run(tmp_path):
    spec, plans = _plans(tmp_path)
    name = _two_component(plans)
    lines = []
    run_experiment(
        load_experiment(str(write_experiment(tmp_path, strategies=[name]))), launcher=FakeLauncher(), echo=lines.append
    )
    prog = [x for x in lines if x.startswith("[") and "/4]" in x]
    assert len(prog) == 4 and all(name in x and "ok" in x and "dev em" in x and "generator=" in x for x in prog)
    md = (tmp_path / "out" / "leaderboard.md").read_text()
    assert "squad_v1.1" in md and "fake device" in md and "dev em" in md


class SameComponentTwice(Strategy):
    """Test strategy (plugged in by import path): two phases that both train the generator."""

    name = "same_twice"
    summary = "test: warm-up then fine-tune of the generator"

    def phases(self):
        return [Phase("warm", frozenset({"generator"}), 0.5), Phase("tune", frozenset({"generator"}), 0.5)]


SAME = f"{__name__}:SameComponentTwice"


def test_phasewise_grid_per_phase_when_two_phases_train_the_same_component(tmp_path):
    grids = {"default": {"generator": [1e-3, 3e-3]}, SAME: {"tune": {"generator": [1e-4, 3e-4, 1e-3]}}}
    path = write_experiment(tmp_path, strategies=[SAME], grids=grids)
    spec = load_experiment(str(path))
    plan = make_plan(spec, SAME)
    assert [(st.phase, [a.name for a in st.axes]) for st in plan.stages] == [
        ("warm", ["warm.generator"]),
        ("tune", ["tune.generator"]),
    ]
    assert plan.phasewise and plan.n_runs(1) == 2 + 3  # two 1-D grids, not a 2 x 3 product

    def score(by_phase, seed):  # best: warm 3e-3, then tune 3e-4
        return 0.1 + 50 * by_phase[("warm", "generator")] + 0.2 * (by_phase.get(("tune", "generator")) == 3e-4)

    fake = FakeLauncher(phase_score=score)
    assert run_experiment(spec, launcher=fake, echo=lambda s: None) == 0
    assert len(fake.launched) == 5 + 1
    runs = _rows(tmp_path / "out" / "runs.csv")
    warm = [r for r in runs if r["phase"] == "warm"]
    tune = [r for r in runs if r["phase"] == "tune"]
    assert len(warm) == 2 and len(tune) == 3 and len({r["run_dir"] for r in runs}) == 5
    best_warm = next(r for r in warm if float(r["lr_warm.generator"]) == 3e-3)
    for r in tune:
        ov = json.loads(open(os.path.join(r["run_dir"], "result.json")).read())["overrides"]
        assert ov["train.only_phase"] == "tune" and ov["train.init_from"] == best_warm["run_dir"] == r["parent"]
        assert float(ov["train.phase.warm.lr.generator"]) == 3e-3  # the phase-1 choice stays recorded
        assert float(ov["train.phase.tune.lr.generator"]) == float(r["lr_tune.generator"])
    sel = json.loads((tmp_path / "out" / "selected.json").read_text())["strategies"][SAME]
    assert sel["lrs"] == {"warm.generator": 3e-3, "tune.generator": 3e-4}
    assert [len(c) for c in sel["chain"]] == [2] and sel["chain"][0][0] == best_warm["run_dir"]
    row = _rows(tmp_path / "out" / "leaderboard.csv")[0]
    assert row["lrs"] == "tune.generator=0.0003 warm.generator=0.003"
    assert int(float(row["flops_total_train"])) == 2 * RUN_FLOPS["total_train"]  # phase 1's cost included
    assert int(row["grid_flops_total_train"]) == 5 * RUN_FLOPS["total_train"]


def test_phase_grid_key_must_name_a_phase(tmp_path):
    path = write_experiment(tmp_path, strategies=[SAME], grids={SAME: {"nonesuch": {"generator": [1e-3]}}})
    with pytest.raises(ConfigError, match=f"grids.{SAME}.nonesuch"):
        make_plan(load_experiment(str(path)), SAME)


@pytest.mark.parametrize("metric", ["bleu", "loss", "recall@10", "containment@5"])
def test_select_metric_the_runs_do_not_report_is_exit_2(tmp_path, capsys, metric):
    path = write_experiment(tmp_path, strategies=[list(REGISTRY)[0]])
    assert cli_main(["experiment", str(path), f"select.metric={metric}"]) == 2
    err = capsys.readouterr().err
    assert "'select.metric'" in err and metric in err and "Traceback" not in err
    assert not (tmp_path / "out" / "runs").exists()  # nothing was launched


def test_any_recall_is_emitted_so_it_is_a_valid_select_metric():
    """The evaluator now emits any-gold recall (it was advertised but never computed), so
    `select.metric=any_recall@5` is valid: listed in METRICS and computed by the scorer."""
    from ragtune.data.schema import Question
    from ragtune.evaluate import score
    from ragtune.metrics import METRICS, get_metric

    assert get_metric("any_recall@5") is METRICS["any_recall@k"]
    qs = [
        Question("a", "q?", ["x"], gold_passage_ids=["p1", "p2"]),
        Question("b", "q?", ["y"], gold_passage_ids=["p3"]),
    ]
    preds = [
        {"prediction": "x", "retrieved_ids": ["p2", "p9"], "metrics": {}},
        {"prediction": "z", "retrieved_ids": ["p8", "p9"], "metrics": {}},
    ]
    out = score(qs, preds, [["p1"], ["p3"]], [2])
    assert out["any_recall@2"] == 0.5 and out["recall@2"] == 0.0 and out["single_step_recall@2"] == 0.5


def test_strategy_reported_select_metric_needs_a_direction(tmp_path, monkeypatch):
    class Reporter(SameComponentTwice):
        name = "reporter"
        reports = {"hops": "retrieval hops per question"}

    monkeypatch.setitem(REGISTRY, "reporter", Reporter)
    path = write_experiment(tmp_path, strategies=["reporter"])
    with pytest.raises(ConfigError, match="select.higher_is_better"):
        load_experiment(str(path), ["select.metric=hops"])
    spec = load_experiment(str(path), ["select.metric=hops", "select.higher_is_better=false"])
    from ragtune.experiment.spec import metric_direction

    assert metric_direction(spec.select.metric, spec.select.higher_is_better) is False
    with pytest.raises(ConfigError, match="select.higher_is_better"):  # contradicts ragtune.metrics
        load_experiment(str(path), ["select.higher_is_better=false"])


def test_variants_run_a_strategy_with_their_own_options_and_rows(tmp_path):
    """`variants.<name>`: the base strategy's runs with extra overrides, under its own name (row,
    run directories, grid `grids.<name>` else the base strategy's)."""
    path = write_experiment(
        tmp_path,
        strategies=["joint", "joint_mean"],
        variants={"joint_mean": {"strategy": "joint", "overrides": ["strategy.reduction=mean"]}},
        grids={"joint": {"query_encoder": [1e-5], "generator": [1e-3, 3e-3]}, "joint_mean": {"generator": [2e-3]}},
    )
    spec = load_experiment(str(path))
    assert strategy_names(spec) == ["joint", "joint_mean"]
    plan = make_plan(spec, "joint_mean")
    assert "strategy.name=joint" in plan.base_overrides and "strategy.reduction=mean" in plan.base_overrides
    # its own generator grid, the base strategy's query-encoder grid
    assert {a.component: a.values for a in plan.stages[0].axes} == {"query_encoder": (1e-5,), "generator": (2e-3,)}
    assert "strategy.reduction=mean" not in make_plan(spec, "joint").base_overrides
    fake = FakeLauncher()
    assert run_experiment(spec, launcher=fake, echo=lambda s: None) == 0
    rows = {r["strategy"]: r for r in _rows(tmp_path / "out" / "leaderboard.csv")}
    assert set(rows) == {"joint", "joint_mean"} and rows["joint_mean"]["n_runs"] == "1"
    assert all("joint_mean" in d for d in rows["joint_mean"]["run_dirs"].split(";"))
    for names, bad, match in (
        (["joint"], {"joint": {"strategy": "joint"}}, "registered strategy"),
        (["joint_mean"], {"joint_mean": {"strategy": "nope"}}, "variants.joint_mean.strategy"),
        (["joint_mean"], {"joint_mean": {"strategy": "joint", "overrides": ["strategy.name=vrag"]}}, "strategy.name"),
    ):
        p = write_experiment(tmp_path, strategies=names, variants=bad)
        with pytest.raises(ConfigError, match=match):
            load_experiment(str(p))
    # a variant that 'strategies' does not list (a command line selected a subset) is defined, not run
    p = write_experiment(tmp_path, strategies=["joint"], variants={"other": {"strategy": "joint"}})
    assert strategy_names(load_experiment(str(p))) == ["joint"]
