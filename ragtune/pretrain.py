"""One-off LM pre-training of the tiny generator on the corpus text, cached on disk.

The embedded default needs a generator that can read (a stand-in for a pretrained LLM) but is
not tuned for question answering. It is trained once with a plain next-token loss on the
passages only (never on questions or answers), saved under the cache directory keyed by a hash
of the corpus and the config, and shared by every strategy so that all comparisons start from
the same model. Its compute is a fixed sunk cost, like a downloaded checkpoint: it is not
charged to any strategy's ledger.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import List

import torch
from omegaconf import OmegaConf
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from ragtune import modelzoo


def _key(cfg, texts: List[str]) -> str:
    spec = {
        "tiny": OmegaConf.to_container(cfg.tiny),
        "pretrain": OmegaConf.to_container(cfg.pretrain),
        "texts": modelzoo.texts_fingerprint(texts),
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def pretrained_tiny_generator(cfg, texts: List[str], cache_dir: str):
    """Return (model, tokenizer), training and caching them on first use."""
    folder = Path(cache_dir).expanduser() / "generators" / _key(cfg, texts)
    if (folder / "done").exists():
        return LlamaForCausalLM.from_pretrained(folder), PreTrainedTokenizerFast.from_pretrained(folder)
    tok = modelzoo.train_bpe(texts, cfg.tiny.vocab_size)
    model = modelzoo.tiny_decoder(cfg.tiny, tok, cfg.pretrain.seed)
    lm_pretrain(model, tok, texts, cfg.pretrain)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    (folder / "done").write_text("ok\n")
    return model, tok


def lm_pretrain(model, tok, texts: List[str], pcfg, block: int = 64) -> List[float]:
    """Next-token training on shuffled passages packed into blocks of `block` tokens."""
    ids: List[int] = []
    rng = random.Random(pcfg.seed)
    order = list(range(len(texts)))
    rng.shuffle(order)
    if pcfg.grouped:  # "title. text": sorting groups an entity's passages, so its name recurs in a block
        order = sorted(order, key=lambda i: texts[i])
    for i in order:
        ids += tok(texts[i], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    data = torch.tensor(ids[: len(ids) // block * block]).view(-1, block)  # (N_blocks, block)
    gen = torch.Generator().manual_seed(pcfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=pcfg.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * (1 - s / pcfg.steps))
    losses = []
    model.train()
    for _ in range(pcfg.steps):
        batch = data[torch.randint(len(data), (pcfg.batch_size,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses
