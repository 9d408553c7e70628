"""A LoRA run saves its generator's adapters only (final.pt and checkpoints): the frozen base is
rebuilt from `generator.model` by every run, so storing it per run would duplicate the model in
every run directory. Resume and re-evaluation from such files are exact."""

from __future__ import annotations

import pytest
import torch

from ragtune import run

from helpers import assert_same_tensors, final_weights, step_lines, timeless, tiny_cfg

LORA = ["strategy.name=joint", "generator.lora.enabled=true", "generator.lora.target_modules=[q_proj,v_proj]"]
COMMON = [*LORA, "train.steps=4", "train.save_every=1"]


def test_lora_files_hold_adapters_only_and_resume_and_re_evaluation_are_exact(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    ra = run.train_and_evaluate(tiny_cfg(a, *COMMON))
    gen = {k for k in final_weights(a) if k.startswith("generator.")}
    assert gen and all(".lora_" in k for k in gen), sorted(gen - {k for k in gen if ".lora_" in k})[:3]
    assert any(k.startswith("retriever.query_encoder.") for k in final_weights(a))  # the rest is kept
    last = torch.load(a / "checkpoints" / "last.pt", weights_only=False)
    assert {k for k in last["weights"] if k.startswith("generator.")} == gen
    with pytest.raises(KeyboardInterrupt):
        run.train_and_evaluate(tiny_cfg(b, *COMMON, "debug.stop_after=2"))
    rb = run.train_and_evaluate(tiny_cfg(b, *COMMON))
    assert_same_tensors(final_weights(a), final_weights(b))
    assert step_lines(a / "metrics.jsonl") == step_lines(b / "metrics.jsonl")
    assert timeless(ra["test"]) == timeless(rb["test"])
    again = run.eval_run(a)  # a fresh pipeline: the base from generator.model, the adapters from final.pt
    assert timeless(again["test"]) == timeless(ra["test"])


def test_without_lora_the_whole_generator_is_saved(tmp_path):
    run.train_and_evaluate(tiny_cfg(tmp_path, "strategy.name=joint", "train.steps=2"))
    gen = [k for k in final_weights(tmp_path) if k.startswith("generator.")]
    assert gen and not any(".lora_" in k for k in gen) and any("embed_tokens" in k for k in gen)
