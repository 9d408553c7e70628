"""`ragtune` command line: exit codes and messages (in-process, plus one real subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ragtune import cli
from ragtune.strategies import REGISTRY

from helpers import ROOT, TINY, cache_dir, load_json  # noqa: F401 (fixture)

TIMING = ("seconds_per_question",)  # measured, so it differs between two evaluations


def _scores(s):
    return {k: v for k, v in s.items() if k not in TIMING}


def _train(tmp_path, *overrides):
    return cli.main(["train", TINY, f"data.cache_dir={cache_dir()}", *overrides, f"run_dir={tmp_path}"])


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.stepz=3", "train.stepz"),
        ("train.steps=abc", "train.steps"),
        ("train.lr.generator=0", "train.lr.generator"),
        ("strategy.name=nonesuch", "strategy.name"),
        ("strategy.name=joint strategy.foo=1", "strategy.foo"),
        ("train.k=100000", "train.k"),
        ("strategy.name=two_phase train.only_phase=nonesuch", "train.only_phase"),
    ],
)
def test_bad_config_exit_2_names_key(tmp_path, capsys, override, key):
    assert _train(tmp_path / "run", *override.split()) == 2
    err = capsys.readouterr().err
    assert f"'{key}'" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "result.json").exists()  # a config error is not a failed run


@pytest.mark.parametrize("key", ["generator.model", "retriever.model"])
def test_missing_model_path_exit_2(tmp_path, capsys, key):
    assert _train(tmp_path / "run", f"{key}=/nonexistent/model") == 2
    err = capsys.readouterr().err
    assert key in err and "/nonexistent/model" in err
    assert not (tmp_path / "run" / "result.json").exists()


def test_usage_exit_codes(capsys):
    assert cli.main([]) == 2
    assert cli.main(["frobnicate"]) == 2
    assert cli.main(["--help"]) == 0
    assert "ragtune train" in capsys.readouterr().out
    assert cli.main(["train"]) == 2
    assert cli.main(["eval"]) == 2


def test_list_prints_every_strategy(capsys):
    assert cli.main(["list"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[1:] if line.strip()}
    assert set(rows) == set(REGISTRY)
    for name, cls in REGISTRY.items():
        assert rows[name][1] == ("yes" if cls.needs_labels else "no")
    assert rows["independent"][1] == "yes" and rows["joint"][1] == "no"


def test_list_a_plug_in_strategy_without_building_models(capsys, monkeypatch):
    from ragtune import modelzoo

    import toy_strategy

    def never(*a, **k):
        pytest.fail("ragtune list built a model")

    for name in ("tiny_encoder", "tiny_decoder", "load_hf"):
        monkeypatch.setattr(modelzoo, name, never)
    monkeypatch.setattr(toy_strategy.PolyakToy, "setup", never)  # setup builds the owned towers
    assert cli.main(["list", "toy_strategy:PolyakToy"]) == 0
    line = capsys.readouterr().out.splitlines()[1]
    assert "posterior" in line and "(+ frozen target)" in line


def test_data_synth_writes_the_files(tmp_path, capsys):
    out = tmp_path / "synth"
    args = [
        "data",
        "synth",
        "--out",
        str(out),
        "--seed",
        "3",
        "--people",
        "10",
        "--train",
        "10",
        "--dev",
        "4",
        "--test",
        "4",
    ]
    assert cli.main(args) == 0
    counts = {s: len((out / f"{s}.jsonl").read_text().splitlines()) for s in ("train", "dev", "test")}
    assert counts == {"train": 10, "dev": 4, "test": 4}
    meta = json.loads((out / "meta.json").read_text())
    assert meta["config"]["seed"] == 3 and meta["counts"]["dev"]["total"] == 4
    assert len((out / "corpus.jsonl").read_text().splitlines()) > 0
    first = {f: (out / f).read_text() for f in ("corpus.jsonl", "train.jsonl", "dev.jsonl", "test.jsonl")}
    # what synth writes passes `data check`, and the same seed writes the same files
    files = [str(out / f) for f in ("train.jsonl", "dev.jsonl", "test.jsonl")]
    assert cli.main(["data", "check", *files, "--corpus", str(out / "corpus.jsonl")]) == 0
    assert cli.main([*args[:3], str(tmp_path / "again"), *args[4:]]) == 0
    assert {f: (tmp_path / "again" / f).read_text() for f in first} == first


def test_data_check_reports_every_bad_row(tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"p{i}", "title": "T", "text": f"text {i}"}) + "\n" for i in (1, 2)))
    rows = [
        json.dumps({"id": "q1", "question": "Q?", "answers": ["a"], "gold_passage_ids": ["p1"]}),  # fine
        json.dumps({"id": "q2", "question": "Q?", "answers": "a"}),  # 2 answers
        json.dumps({"id": "q3", "answers": ["a"]}),  # 3 question
        "{oops",  # 4 json
        json.dumps({"id": "q5", "question": "Q?", "answers": ["a"], "gold_passage_ids": ["p9"]}),  # 5 gold ids
        json.dumps({"id": "q6", "question": "Q?", "answers": ["b"]}),  # fine
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(rows) + "\n")
    assert cli.main(["data", "check", str(bad), "--corpus", str(corpus)]) == 1
    err = capsys.readouterr().err
    for line, field in [(2, "answers"), (3, "question"), (4, "<json>"), (5, "gold_passage_ids")]:
        assert f"{bad}:{line}: {field}" in err, (line, field, err)
    assert f"{bad}:1:" not in err and f"{bad}:6:" not in err
    assert cli.main(["data", "check", str(corpus)]) == 0


@pytest.mark.usefixtures("pinned_tokenizers")
def test_train_interrupt_exit_130_then_resume(tmp_path, capsys, pinned_tokenizers):
    common = ["strategy.name=joint", "train.steps=2", "train.save_every=1", "eval.splits=[test]"]
    assert _train(tmp_path, *common, "debug.stop_after=1") == 130
    assert "interrupted" in capsys.readouterr().err
    assert _train(tmp_path, *common) == 0
    out = capsys.readouterr().out
    assert "joint: ok" in out and str(tmp_path) in out
    assert load_json(tmp_path / "result.json")["steps"] == 2


@pytest.mark.usefixtures("pinned_tokenizers")
def test_eval_reproduces_train_scores(tmp_path, capsys, pinned_tokenizers):
    assert _train(tmp_path, "strategy.name=joint", "train.steps=2") == 0
    result = load_json(tmp_path / "result.json")
    preds = (tmp_path / "predictions.jsonl").read_text()
    (tmp_path / "predictions.jsonl").unlink()
    code = cli.main(["eval", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 0, err
    scores = load_json(tmp_path / "scores.json")
    assert scores["test"]["em"] == result["test"]["em"]
    assert _scores(scores["test"]) == _scores(result["test"]) and _scores(scores["dev"]) == _scores(result["dev"])
    assert (tmp_path / "predictions.jsonl").read_text() == preds


def test_subprocess_bad_config_exit_2(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "ragtune.cli", "train", TINY, "train.stepz=3", f"run_dir={tmp_path / 'run'}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "'train.stepz'" in proc.stderr


@pytest.mark.usefixtures("pinned_tokenizers")
def test_eval_overrides_select_splits_and_bad_key_exit_2(tmp_path, capsys, pinned_tokenizers):
    assert _train(tmp_path, "strategy.name=joint", "train.steps=2") == 0
    result = load_json(tmp_path / "result.json")
    assert cli.main(["eval", str(tmp_path), "eval.splits=[test]"]) == 0
    scores = load_json(tmp_path / "scores.json")
    assert list(scores) == ["test"] and _scores(scores["test"]) == _scores(result["test"])
    assert cli.main(["eval", str(tmp_path), "eval.nope=1"]) == 2
    assert "'eval.nope'" in capsys.readouterr().err


@pytest.mark.usefixtures("pinned_tokenizers")
def test_eval_several_run_dirs_in_one_process(tmp_path, capsys):
    """How the experiment runner evaluates its selected runs on test; grid run dirs contain '='."""
    import shutil

    a = tmp_path / "runs" / "lr-generator=0.001_seed-0"
    assert _train(a, "strategy.name=joint", "train.steps=2", "eval.splits=[dev]") == 0
    b = tmp_path / "runs" / "lr-generator=0.002_seed-0"
    shutil.copytree(a, b)
    capsys.readouterr()
    assert cli.main(["eval", str(a), str(b), "eval.splits=[test]"]) == 0
    out = capsys.readouterr().out
    for d in (a, b):
        assert list(load_json(d / "scores.json")) == ["test"] and f"{d} test: em" in out
        assert load_json(d / "result.json").get("test") is None  # the training result is left as it was
    assert cli.main(["eval", str(tmp_path / "missing"), str(a), "eval.splits=[test]"]) == 2
    captured = capsys.readouterr()
    assert str(tmp_path / "missing") in captured.err and f"{a} test: em" in captured.out
