"""The shipped real-model configs (configs/models/*.yaml) validate layered on the default, and their
loading path runs offline end to end on a Qwen2-architecture model with an instruct-style tokenizer
(chat template, <|im_end|> and <|endoftext|>) that the test builds and saves: loaded from a local
folder in bf16 with LoRA on every projection, float32 adapters, trained and evaluated."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from ragtune import modelzoo, run
from ragtune.config import load_config

from helpers import ROOT, build, tiny_cfg

MODELS = sorted(p.name for p in (ROOT / "configs/models").glob("*.yaml"))
CHAT = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.mark.parametrize("name", MODELS)
def test_model_configs_validate_on_the_default(name):
    cfg = load_config([str(ROOT / "configs/default.yaml"), str(ROOT / "configs/models" / name)], ["run_dir=/tmp/x"])
    if name.startswith("qwen"):
        g = cfg.generator
        assert g.dtype == "bfloat16" and g.lora.enabled and g.chat_template and cfg.train.precision == "bf16"
        assert list(g.eos_tokens) == ["<|im_end|>", "<|endoftext|>"]
    else:
        assert cfg.retriever.query_prefix.strip() and cfg.retriever.normalize


def _instruct_folder(path, texts):
    tok = modelzoo.train_bpe(texts, 300)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]})
    tok.eos_token, tok.pad_token = "<|im_end|>", "<|endoftext|>"
    tok.chat_template = CHAT
    torch.manual_seed(0)
    conf = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
        max_position_embeddings=512,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    Qwen2ForCausalLM(conf).save_pretrained(path)
    tok.save_pretrained(path)


def test_an_instruct_model_loads_in_bf16_with_lora_trains_and_evaluates(tmp_path):
    probe, _, _ = build(tiny_cfg(tmp_path / "probe"))
    texts = [probe.corpus.passage_text(p) for p in probe.corpus]
    _instruct_folder(tmp_path / "qwen", texts)
    over = [
        f"generator.model={tmp_path / 'qwen'}",
        "generator.dtype=bfloat16",
        "generator.chat_template=true",
        "generator.eos_tokens=[<|im_end|>,<|endoftext|>]",
        "generator.lora.enabled=true",
        "generator.lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]",
        "generator.max_prompt_length=160",
        "strategy.name=joint",
        "train.steps=2",
    ]
    cfg = tiny_cfg(tmp_path / "run", *over)
    _, m, _ = build(cfg)
    g = m.generator
    assert g.eos_ids == {g.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}
    lora = [p for n, p in g.model.named_parameters() if "lora_" in n]
    base = [p for n, p in g.model.named_parameters() if "lora_" not in n]
    assert lora and all(p.dtype == torch.float32 for p in lora)
    assert base and all(p.dtype == torch.bfloat16 for p in base)
    ids = g.render_prompt("q?", ["a passage"])
    start = g.tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids[0] == start and ids.count(start) == 2  # the chat template: user turn, then assistant
    res = run.train_and_evaluate(cfg)
    assert res["status"] == "ok" and res["test"]["em"] is not None
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    assert saved["status"] == "ok"
