"""End to end: held-out sets in the NQ-open and HotpotQA field layouts load through the presets,
train with the tiny models of configs/tiny.yaml, evaluate, and result.json records the provenance."""

import json

import preset_fixtures as fx

from ragtune import cli, rundir

from helpers import TINY, cache_dir


def _train(run_dir, *overrides):
    rc = cli.main(["train", TINY, f"data.cache_dir={cache_dir()}", *overrides, f"run_dir={run_dir}"])
    return rc, rundir.read_result(run_dir)


def test_nq_open_layout_trains_and_evaluates(tmp_path, pinned_tokenizers):
    data = fx.nq_folder(tmp_path / "nq")
    corpus = fx.wiki_tsv(tmp_path / "psgs_w100.tsv")
    run = tmp_path / "run-nq"
    args = ["data.preset=nq_open", f"data.hf_name={data}", f"data.corpus_path={corpus}"]
    rc, res = _train(run, *args, "strategy.name=joint", "train.steps=3")
    assert rc == 0 and res["status"] == "ok" and res["steps"] == 3
    assert res["test"]["n"] == len(fx.NQ_VALIDATION) and res["dev"]["n"] == 1
    assert res["test"]["recall@1"] is None  # NQ-open has no gold passages
    prov = res["data"]
    assert prov["preset"] == "nq_open" and prov["source"]["kind"] == "files"
    assert prov["corpus"]["encoding"] == "dpr_tsv" and prov["corpus"]["path"] == str(corpus)
    assert prov["splits"]["test"]["from"] == "validation" and prov["splits"]["dev"]["from"] == "carved from train"
    assert prov["carving"]["fractions"] == {"dev": 0.1} and prov["carving"]["seed"] == 0
    preds = rundir.read_predictions(run, "test")
    assert [p["id"] for p in preds] == ["validation-1", "validation-2", "validation-3"]
    assert preds[1]["answers"] == ["France", "the Alps"]
    # a later `ragtune eval` reloads the same data through the preset
    assert cli.main(["eval", str(run), "eval.splits=[test]"]) == 0
    assert json.loads(rundir.scores_path(run).read_text())["test"]["n"] == 3


def test_hotpotqa_layout_trains_with_gold_labels_and_evaluates(tmp_path, pinned_tokenizers):
    data = fx.hotpot_folder(tmp_path / "hotpot", n_train=4)
    run = tmp_path / "run-hotpot"
    rc, res = _train(run, "data.preset=hotpotqa", f"data.hf_name={data}", "strategy.name=independent", "train.steps=4")
    assert rc == 0 and res["status"] == "ok"
    assert res["test"]["n"] == 3 and res["test"]["recall@2"] is not None  # gold ids from supporting facts
    assert {"em/bridge", "em/comparison"} <= set(res["test"])
    prov = res["data"]
    assert prov["preset"] == "hotpotqa" and prov["source"]["config"] == "distractor"
    assert prov["corpus"]["encoding"] == "dataset_paragraphs" and prov["corpus"]["passages"] == 6
    assert prov["splits"]["train"]["with_gold"] == prov["splits"]["train"]["questions"] > 0
    preds = rundir.read_predictions(run, "test")
    assert all(len(p["gold_passage_ids"]) == 2 for p in preds)


def test_a_bad_row_fails_the_run_with_file_line_and_field(tmp_path, capsys):
    data = fx.nq_folder(tmp_path / "nq")
    fx.jsonl(data / "validation.jsonl", [{"question": "q", "answer": "not a list"}])
    corpus = fx.wiki_contents(tmp_path / "wiki-18.jsonl", quoted=True)
    rc = cli.main(
        ["train", TINY, "data.preset=nq_open", f"data.hf_name={data}", f"data.corpus_path={corpus}"]
        + [f"data.cache_dir={cache_dir()}", f"run_dir={tmp_path / 'run'}"]
    )
    err = capsys.readouterr().err
    assert rc == 1 and f"{data / 'validation.jsonl'}:1: answer: expected a list of strings, got str" in err


def test_a_missing_corpus_is_a_config_error_before_any_data(tmp_path, capsys):
    rc = cli.main(["train", TINY, "data.preset=nq_open", f"run_dir={tmp_path / 'run'}"])
    assert rc == 2 and "config key 'data.corpus_path'" in capsys.readouterr().err
