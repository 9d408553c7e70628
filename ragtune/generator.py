"""Generator: any HF causal LM (optionally with LoRA) reading one passage per prompt.

Four methods, precisely specified:
- `score_pairs(questions, passages, answers)`: per-token log p(y_t | prompt(x, z), y_<t) of N ragged
  triples (any number of passages per question) in one batched forward: (N, T) plus mask (N, T).
- `answer_logprobs(questions, passages, answers)`: the same for K passages per question, (B, K, T)
  plus the answer mask (B, T). Answer tokens are identical across k (RAG-Token needs that).
- `generate(questions, passages)`: greedy decoding of one answer per (question, passage).
- `sample(prompts, ...)`: stochastic decoding of raw prompts (rollouts).
The prompt template comes from config (no model-name sniffing). Every call is charged to the
ledger here, from the padded token counts, under `self.component` ("generator" by default; a copy
used as a reference model is charged under its own name, see `copy_as`).
"""

from __future__ import annotations

import copy
from typing import List, Optional, Tuple

import torch
from torch import nn

from ragtune.flops import ModelShape
from ragtune.ledger import Ledger, clock


class Generator(nn.Module):
    def __init__(self, model: nn.Module, tokenizer, cfg, ledger: Ledger, component: str = "generator"):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.ledger = ledger
        self.component = component  # the ledger charges every call of this instance under this name
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id

    def copy_as(self, component: str) -> Generator:
        """An independent copy of the model (same tokenizer, config and ledger) charged as
        `component`, e.g. a frozen reference model for a KL term."""
        return Generator(copy.deepcopy(self.model), self.tokenizer, self.cfg, self.ledger, component)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def prompt(self, question: str, passage: str) -> str:
        return self.cfg.prompt_template.format(question=question, passage=passage)

    def _prompt_ids(self, prompts: List[str]) -> List[List[int]]:
        ids = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        keep = self.cfg.max_prompt_length
        return [x[-keep:] for x in ids]  # left-truncate: the question sits at the end of the prompt

    def _answer_ids(self, answers: List[str]) -> List[List[int]]:
        ids = self.tokenizer([self.cfg.answer_prefix + a for a in answers], add_special_tokens=False)["input_ids"]
        return [x[: self.cfg.max_answer_length - 1] + [self.eos_id] for x in ids]

    def answer_logprobs(
        self, questions: List[str], passages: List[List[str]], answers: List[str]
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """B questions, K passages each, B answers -> tok_lp (B, K, T), mask (B, T)."""
        B, K = len(questions), len(passages[0])
        flat_q = [q for q in questions for _ in range(K)]
        flat_p = [p for ps in passages for p in ps]
        flat_a = [a for a in answers for _ in range(K)]
        tok_lp, mask = self.score_pairs(flat_q, flat_p, flat_a)  # (B*K, T)
        T = tok_lp.shape[-1]
        return tok_lp.view(B, K, T), mask.view(B, K, T)[:, 0]

    def score_pairs(
        self, questions: List[str], passages: List[str], answers: List[str]
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """N ragged (question, passage, answer) triples in one batched forward ->
        tok_lp (N, T) = log p(y_t | prompt(x, z), y_<t) (0 at padding), mask (N, T).
        Sequence log-probs are `(tok_lp * mask).sum(-1)`. Any number of passages per question:
        no padding with duplicates, no per-question loop."""
        N = len(questions)
        if not (N == len(passages) == len(answers)) or N == 0:
            raise ValueError(f"score_pairs needs equal, non-empty lists, got {N}, {len(passages)}, {len(answers)}")
        p_ids = self._prompt_ids([self.prompt(q, p) for q, p in zip(questions, passages)])  # N lists
        a_ids = self._answer_ids(list(answers))  # N lists
        T = max(len(a) for a in a_ids)
        seqs = [p + a for p, a in zip(p_ids, a_ids)]
        L = max(len(s) for s in seqs)
        dev = self.device
        input_ids = torch.full((N, L), self.pad_id, dtype=torch.long)
        attn = torch.zeros((N, L), dtype=torch.long)
        pos = torch.zeros((N, T), dtype=torch.long)  # position predicting answer token t
        targets = torch.full((N, T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((N, T))
        for i, (s, a) in enumerate(zip(seqs, a_ids)):
            input_ids[i, : len(s)] = torch.tensor(s)
            attn[i, : len(s)] = 1
            start = len(p_ids[i]) - 1
            pos[i, : len(a)] = torch.arange(start, start + len(a))
            pos[i, len(a) :] = start  # padding positions point at a valid place; masked below
            targets[i, : len(a)] = torch.tensor(a)
            mask[i, : len(a)] = 1.0
        input_ids, attn, pos = input_ids.to(dev), attn.to(dev), pos.to(dev)
        t0 = clock()
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.trainable()):
            hidden = self._backbone(input_ids, attn)  # (N, L, H)
            idx = pos.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
            h = hidden.gather(1, idx)  # (N, T, H)
            logits = self._lm_head()(h).float()  # (N, T, V)
            lp = torch.log_softmax(logits, dim=-1)
            tok_lp = lp.gather(-1, targets.to(dev).unsqueeze(-1)).squeeze(-1)  # (N, T)
        mask = mask.to(dev)
        tok_lp = tok_lp * mask
        seconds = clock() - t0
        # the LM head ran on the T answer positions of each row only
        self.ledger.charge_model(
            self.component, self.shape(), [L] * N, head_positions=T, real_tokens=int(attn.sum()), seconds=seconds
        )
        return tok_lp, mask

    def trainable(self) -> bool:
        return any(p.requires_grad for p in self.model.parameters())

    def _backbone(self, input_ids, attn):
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return base.get_decoder()(input_ids=input_ids, attention_mask=attn).last_hidden_state

    def _lm_head(self) -> nn.Module:
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return base.get_output_embeddings()

    def shape(self) -> ModelShape:
        conf = self.model.config
        head_dim = getattr(conf, "head_dim", None) or conf.hidden_size // conf.num_attention_heads
        return ModelShape.of(self.model, conf.num_hidden_layers, head_dim * conf.num_attention_heads)

    @torch.no_grad()
    def generate(self, questions: List[str], passages: List[str], max_new_tokens: Optional[int] = None) -> List[str]:
        """Greedy answer for each (question, passage) pair."""
        prompts = [self.prompt(q, p) for q, p in zip(questions, passages)]
        return self.sample(prompts, max_new_tokens=max_new_tokens, do_sample=False)

    @torch.no_grad()
    def sample(
        self,
        prompts: List[str],
        max_new_tokens: Optional[int] = None,
        do_sample: bool = True,
        temperature: float = 1.0,
        stop: Optional[List[str]] = None,
    ) -> List[str]:
        """Decode a continuation of each raw prompt (left-padded batch, KV cache)."""
        max_new = max_new_tokens or self.cfg.max_new_tokens
        p_ids = self._prompt_ids(prompts)
        L = max(len(p) for p in p_ids)
        n = len(p_ids)
        input_ids = torch.full((n, L), self.pad_id, dtype=torch.long)
        attn = torch.zeros((n, L), dtype=torch.long)
        for i, p in enumerate(p_ids):
            input_ids[i, L - len(p) :] = torch.tensor(p)
            attn[i, L - len(p) :] = 1
        t0 = clock()
        out = self.model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attn.to(self.device),
            max_new_tokens=max_new,
            do_sample=do_sample,
            temperature=temperature if do_sample else None,
            top_k=None,
            top_p=None,
            pad_token_id=self.pad_id,
            eos_token_id=self.eos_id,
            stop_strings=stop,
            tokenizer=self.tokenizer if stop else None,
        )
        new = out[:, L:].cpu()
        seconds = clock() - t0
        texts, n_new = [], []
        for row in new.tolist():
            cut = row.index(self.eos_id) + 1 if self.eos_id in row else len(row)
            n_new.append(max(cut, 1))
            texts.append(self.tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
        # every row runs as many decoding steps as the longest one (finished rows keep computing)
        steps = max(new.shape[1], 1)
        self.ledger.charge_model(
            self.component,
            self.shape(),
            [L] * n,
            new_tokens=[steps] * n,
            real_tokens=int(attn.sum()) + sum(n_new),
            seconds=seconds,
        )
        return texts


def build_generator(cfg, texts: List[str], ledger: Ledger, seed: int, cache_dir: str = "") -> Generator:
    """Build from `cfg.generator`: tiny (optionally LM-pretrained on `texts`, cached) or HF name/path."""
    from ragtune import modelzoo
    from ragtune.pretrain import pretrained_tiny_generator

    if cfg.model == "tiny":
        if cfg.pretrain.steps > 0:
            model, tok = pretrained_tiny_generator(cfg, texts, cache_dir)
        else:
            tok = modelzoo.train_bpe(texts, cfg.tiny.vocab_size)
            model = modelzoo.tiny_decoder(cfg.tiny, tok, seed)
    else:
        model, tok = modelzoo.load_hf(cfg.model, "generator.model", causal=True)
    if cfg.lora.enabled:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                r=cfg.lora.r,
                lora_alpha=cfg.lora.alpha,
                lora_dropout=cfg.lora.dropout,
                target_modules=list(cfg.lora.target_modules),
            ),
        )
    return Generator(model, tok, cfg, ledger)
