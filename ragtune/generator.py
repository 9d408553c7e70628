"""Generator: any HF causal LM (optionally with LoRA) reading passages in its prompt.

Text-level methods, precisely specified:
- `score_pairs(questions, passages, answers)`: per-token log p(y_t | prompt(x, z), y_<t) of N ragged
  triples (any number of passages per question) in one batched forward: (N, T) plus mask (N, T).
- `score_multi(questions, passage_lists, answers)`: the same with every prompt reading a list of
  passages (`render_prompt`).
- `answer_logprobs(questions, passages, answers)`: score_pairs for K passages per question, (B, K, T)
  plus the answer mask (B, T). Answer tokens are identical across k (RAG-Token needs that).
- `generate(questions, passages)` / `generate_multi(questions, passage_lists)`: greedy decoding of
  one answer per (question, passage) / per question reading all its passages.
- `sample(prompts, ...)`: stochastic decoding of raw prompt texts.
Prompts (`ragtune.prompts`): a prompt that fits generator.max_prompt_length is the template as is;
one that does not gets its passages cut until it fits, never its instruction or question (a
ValueError names a question that does not fit alone). Raw prompts of `sample` have no passage to
cut and are left-truncated.
Token-level methods (rollouts, policy gradients): `encode_text` / `decode_ids`, `render_prompt`
(prompt ids, see `ragtune.prompts`), `token_logprobs(contexts, targets)` (log-probs of given ids,
LM head in chunks) and `sample_ids(contexts)` (generated ids with their sampling log-probs, never
re-tokenised). Sampling settings come from `generator.*` only, never from the model's own
generation_config. The prompt templates come from config (no model-name sniffing). Every call is
charged to the ledger here, from the padded token counts, under `self.component` ("generator" by
default; a copy used as a reference model is charged under its own name, see `copy_as`).
Under LoRA such a copy is a second adapter in the same peft model (`AdapterCopy`): the base
weights exist once, in memory and in checkpoints.
"""

from __future__ import annotations

import copy
import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from ragtune import prompts as prompting
from ragtune.config import ConfigError
from ragtune.flops import ModelShape, weight_numel
from ragtune.ledger import Ledger, clock
from ragtune.precision import DTYPES


@dataclass
class Sampled:
    """Output of `Generator.sample_ids`, one entry per context row."""

    ids: List[List[int]]  # generated ids, up to and including the eos / the stop string's last token
    logprobs: List[List[float]]  # log p(id | context, ids before) at the sampling temperature
    finish: List[str]  # "eos" | "stop" (a stop string completed) | "length" (token budget spent)
    texts: List[str]  # decode_ids(ids): callers use the ids, never a re-tokenisation of these


class Generator(nn.Module):
    def __init__(self, model: nn.Module, tokenizer, cfg, ledger: Ledger, component: str = "generator"):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.ledger = ledger
        self.component = component  # the ledger charges every call of this instance under this name
        self.eos_id = tokenizer.eos_token_id  # the end appended to training answers
        # every id that ends a generation: the tokenizer's eos and generator.eos_tokens, nothing
        # inherited from the model's generation_config (explicit, like every sampling setting)
        self.eos_ids = _eos_ids(tokenizer, list(getattr(cfg, "eos_tokens", None) or []))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self._copied: set = set()  # ids of the parameters of adapter copies living in self.model

    def copy_as(self, component: str) -> Generator:
        """A copy of the current model (same tokenizer, config and ledger) charged as `component`,
        e.g. a frozen reference model for a KL term; `copy.snapshot_(generator)` makes it a copy of
        the generator's weights again later. Without LoRA: an independent deep copy. Under LoRA: an
        `AdapterCopy`, a second adapter named `component` in this generator's own peft model (the
        base weights are shared, never duplicated in memory or in checkpoints). Make any other copy
        of the model (e.g. a critic's trunk) before an adapter copy, which lives inside it."""
        if _is_peft(self.model):
            return AdapterCopy(self, component)
        return Generator(copy.deepcopy(self.model), self.tokenizer, self.cfg, self.ledger, component)

    @torch.no_grad()
    def snapshot_(self, source: Generator) -> None:
        """This copy's weights become `source`'s current ones (the whole model, for a deep copy)."""
        self.model.load_state_dict(source.model.state_dict())

    def trainable_parameters(self) -> List[nn.Parameter]:
        """The parameters training may update: under LoRA the adapter weights (`lora_` names) except
        those of adapter copies (`copy_as`), never the base; otherwise every parameter."""
        if not _is_peft(self.model):
            return list(self.model.parameters())
        return [p for n, p in self.model.named_parameters() if "lora_" in n and id(p) not in self._copied]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ---- text, ids, prompts -----------------------------------------------------------------------
    def encode_text(self, text: str) -> List[int]:
        """Token ids of `text`, no special tokens added (observations, forced text)."""
        return prompting.encode(self.tokenizer, text)

    def decode_ids(self, ids: Sequence[int]) -> str:
        """The text of token ids, special tokens (eos, pad) left out, nothing stripped."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def prompt(self, question: str, passage: str) -> str:
        """The single-passage prompt text (`ragtune.prompts`): `prompt_template` as is whenever it
        fits max_prompt_length, else with the passage cut until it fits (never the question)."""
        return prompting.render(self.tokenizer, self.cfg, question, [passage])[0]

    def render_prompt(self, question: str, passages: Sequence[str]) -> List[int]:
        """Prompt ids of `question` reading `passages` (`ragtune.prompts`). One passage and no chat
        template: exactly `_prompt_ids([prompt(question, passage)])[0]`, the historical ids."""
        return prompting.render(self.tokenizer, self.cfg, question, passages)[1]

    def _prompt_ids(self, prompts: List[str]) -> List[List[int]]:
        """Ids of raw prompt texts, left-truncated to max_prompt_length: a raw prompt (`sample`) has
        no passage to cut. A prompt from `prompt` always fits, so it is never truncated here."""
        ids = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        keep = self.cfg.max_prompt_length
        return [x[-keep:] for x in ids]  # left-truncate: the question sits at the end of the prompt

    def _answer_ids(self, answers: List[str]) -> List[List[int]]:
        ids = self.tokenizer([self.cfg.answer_prefix + a for a in answers], add_special_tokens=False)["input_ids"]
        return [x[: self.cfg.max_answer_length - 1] + [self.eos_id] for x in ids]

    # ---- scoring ------------------------------------------------------------------------------------
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
        p_ids = prompting.render_pairs(self.tokenizer, self.cfg, questions, passages)  # N lists
        return self._logprobs(p_ids, self._answer_ids(list(answers)))

    def score_multi(
        self, questions: List[str], passage_lists: List[List[str]], answers: List[str]
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """score_pairs with each prompt reading a list of passages (`render_prompt`):
        tok_lp (N, T) = log p(y_t | prompt(x, z_1..z_m), y_<t) (0 at padding), mask (N, T)."""
        N = len(questions)
        if not (N == len(passage_lists) == len(answers)) or N == 0:
            raise ValueError(f"score_multi needs equal, non-empty lists, got {N}, {len(passage_lists)}, {len(answers)}")
        p_ids = [self.render_prompt(q, ps) for q, ps in zip(questions, passage_lists)]
        return self._logprobs(p_ids, self._answer_ids(list(answers)))

    def token_logprobs(
        self,
        contexts: List[List[int]],
        targets: List[List[int]],
        loss_mask: Optional[List[List[float]]] = None,
        temperature: float = 1.0,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """tok_lp (N, T) = log softmax(logits / temperature)[target_t] given context + target_<t, of
        given ids (no tokenisation), and mask (N, T) = loss_mask (1 where None) x validity (0 at
        padding); tok_lp is 0 where mask is 0. The LM head runs only on the positions predicting
        targets, `generator.logprob_chunk` positions at a time (see `_chunked_logprobs`)."""
        check_scored_rows(contexts, targets, loss_mask, "token_logprobs")
        return self._logprobs(contexts, targets, loss_mask, float(temperature), int(self.cfg.logprob_chunk))

    def _logprobs(
        self,
        contexts: List[List[int]],
        targets: List[List[int]],
        loss_mask: Optional[List[List[float]]] = None,
        temperature: float = 1.0,
        chunk: Optional[int] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """The one batched forward of every scoring call: right-padded context + target rows, hidden
        states gathered at the positions predicting targets (N, T, H). chunk None: the LM head on
        all of them at once (score_pairs' computation, bit-identical to what it always was); else
        `_chunked_logprobs`. Charged once: padded rows, the head on the T target positions."""
        N, T = len(contexts), max(len(a) for a in targets)
        dev = self.device
        input_ids, attn, pos, tgt, mask = pack_scored_rows(contexts, targets, loss_mask, self.pad_id)
        L = input_ids.shape[1]
        input_ids, attn, pos = input_ids.to(dev), attn.to(dev), pos.to(dev)
        t0 = clock()
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.trainable()):
            hidden = self._backbone(input_ids, attn)  # (N, L, H)
            idx = pos.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
            h = hidden.gather(1, idx)  # (N, T, H)
            if chunk is None:
                logits = self._lm_head()(h).float()  # (N, T, V)
                lp = torch.log_softmax(logits, dim=-1)
                tok_lp = lp.gather(-1, tgt.to(dev).unsqueeze(-1)).squeeze(-1)  # (N, T)
            else:
                tok_lp = self._chunked_logprobs(h, tgt.to(dev), temperature, chunk)  # (N, T)
        mask = mask.to(dev)
        tok_lp = tok_lp * mask if chunk is None else torch.where(mask != 0, tok_lp, torch.zeros_like(tok_lp))
        seconds = clock() - t0
        # the LM head ran on the T target positions of each row only
        self.ledger.charge_model(
            self.component, self.shape(), [L] * N, head_positions=T, real_tokens=int(attn.sum()), seconds=seconds
        )
        return tok_lp, mask

    def _chunked_logprobs(self, h: torch.Tensor, tgt: torch.Tensor, temperature: float, chunk: int) -> torch.Tensor:
        """h (N, T, H), tgt (N, T) -> (N, T) log softmax(head(h) / temperature)[tgt], `chunk` positions
        at a time, so at most (chunk, V) logits exist at once (never (N, T, V) in fp32); under grad
        each chunk is checkpointed: its logits are recomputed in backward instead of kept."""
        N, T, H = h.shape
        head = self._lm_head()
        flat_h, flat_t = h.reshape(N * T, H), tgt.reshape(N * T)  # (N*T, H), (N*T,)
        grad = torch.is_grad_enabled() and (flat_h.requires_grad or any(p.requires_grad for p in head.parameters()))
        out = []
        for i in range(0, N * T, chunk):
            x, t = flat_h[i : i + chunk], flat_t[i : i + chunk]
            if grad:
                out.append(checkpoint(_target_logprobs, head, x, t, temperature, use_reentrant=False))
            else:
                out.append(_target_logprobs(head, x, t, temperature))
        return torch.cat(out).view(N, T) if out else flat_h.new_zeros((N, T), dtype=torch.float32)

    def trainable(self) -> bool:
        return any(p.requires_grad for p in self.model.parameters())

    def _backbone(self, input_ids, attn):
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return base.get_decoder()(input_ids=input_ids, attention_mask=attn).last_hidden_state

    def _lm_head(self) -> nn.Module:
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return base.get_output_embeddings()

    def shape(self) -> ModelShape:
        """The model as one forward runs it: under LoRA the base and the active adapter only (an
        adapter copy's weights sit idle in the same model while the policy runs, and vice versa)."""
        conf = self.model.config
        head_dim = getattr(conf, "head_dim", None) or conf.hidden_size // conf.num_attention_heads
        shape = ModelShape.of(self.model, conf.num_hidden_layers, head_dim * conf.num_attention_heads)
        idle = [m.weight for m in _idle_adapter_linears(self.model)]
        if not idle:
            return shape
        return dataclasses.replace(
            shape,
            matmul_params=shape.matmul_params - sum(weight_numel(w) for w in idle),
            trainable_matmul_params=shape.trainable_matmul_params
            - sum(weight_numel(w) for w in idle if w.requires_grad),
        )

    # ---- decoding -----------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, questions: List[str], passages: List[str], max_new_tokens: Optional[int] = None) -> List[str]:
        """Greedy answer for each (question, passage) pair."""
        p_ids = prompting.render_pairs(self.tokenizer, self.cfg, questions, passages)
        return [t.strip() for t in self.sample_ids(p_ids, max_new_tokens, do_sample=False).texts]

    @torch.no_grad()
    def generate_multi(
        self, questions: List[str], passage_lists: List[List[str]], max_new_tokens: Optional[int] = None
    ) -> List[str]:
        """Greedy answer of each question reading all its passages in one prompt (`render_prompt`)."""
        p_ids = [self.render_prompt(q, ps) for q, ps in zip(questions, passage_lists)]
        return [t.strip() for t in self.sample_ids(p_ids, max_new_tokens, do_sample=False).texts]

    @torch.no_grad()
    def sample(
        self,
        prompts: List[str],
        max_new_tokens: Optional[int] = None,
        do_sample: bool = True,
        temperature: float = 1.0,
        stop: Optional[List[str]] = None,
    ) -> List[str]:
        """Decode a continuation of each raw prompt (`_prompt_ids`, then `sample_ids`); stripped texts."""
        out = self.sample_ids(self._prompt_ids(prompts), max_new_tokens, do_sample, temperature, stop)
        return [t.strip() for t in out.texts]

    @torch.no_grad()
    def sample_ids(
        self,
        contexts: List[List[int]],
        max_new_tokens: Union[int, Sequence[int], None] = None,
        do_sample: bool = True,
        temperature: Optional[float] = None,
        stop: Optional[List[str]] = None,
    ) -> Sampled:
        """Continue each context (token ids) by HF generate: left-padded batch, KV cache.

        Settings: `_generation_config` (never the model's own generation defaults); `temperature`
        None = generator.temperature; `max_new_tokens` None = generator.max_new_tokens, or one
        budget per row. A row ends at eos, at the token that completes a stop string
        (generator.stop + `stop`, found in the decoded text of its new ids) or when its budget is
        spent; its ids end there. `logprobs` are log softmax(logits / t)[id] of the untruncated
        distribution (top_k / top_p shape the sampling only, as in TRL), recorded during decoding:
        equal to `token_logprobs(contexts, ids, temperature=t)`. A context that, with its budget,
        exceeds the model's positions raises a ValueError. Charged as `generate`.
        """
        n = len(contexts)
        if n == 0:
            return Sampled([], [], [], [])
        new = max_new_tokens or self.cfg.max_new_tokens
        budgets = [int(b) for b in new] if isinstance(new, (list, tuple)) else [int(new)] * n
        t = float(self.cfg.temperature if temperature is None else temperature)
        stops = [s for s in [*self.cfg.stop, *(stop or [])] if s]
        self._check_contexts(contexts, budgets)
        L = max(len(c) for c in contexts)
        input_ids = torch.full((n, L), self.pad_id, dtype=torch.long)
        attn = torch.zeros((n, L), dtype=torch.long)
        for i, c in enumerate(contexts):
            input_ids[i, L - len(c) :] = torch.tensor(c, dtype=torch.long)
            attn[i, L - len(c) :] = 1
        record, ends = _StepLogprobs(t), _RowEnds(L, budgets, stops, self.decode_ids)
        t0 = clock()
        with _without_model_generation_defaults(self.model):
            out = self.model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attn.to(self.device),
                generation_config=self._generation_config(do_sample, max(budgets), t),
                logits_processor=LogitsProcessorList([record]),
                stopping_criteria=StoppingCriteriaList([ends]),
            )
        lp = record.finish(out[:, L:]).cpu()  # (n, S)
        new_ids = out[:, L:].cpu()  # (n, S)
        seconds = clock() - t0
        ids, logprobs, finish = [], [], []
        for i, row in enumerate(new_ids.tolist()):
            cut, why = min(budgets[i], len(row)), "length"
            if ends.stop_at[i] is not None and ends.stop_at[i] <= cut:
                cut, why = ends.stop_at[i], "stop"
            end = next((j for j, tok in enumerate(row[:cut]) if tok in self.eos_ids), None)
            if end is not None:
                cut, why = end + 1, "eos"
            ids.append(row[:cut])
            logprobs.append(lp[i, :cut].tolist())
            finish.append(why)
        # every row runs as many decoding steps as the longest one (finished rows keep computing)
        steps = max(new_ids.shape[1], 1)
        self.ledger.charge_model(
            self.component,
            self.shape(),
            [L] * n,
            new_tokens=[steps] * n,
            real_tokens=int(attn.sum()) + sum(max(len(x), 1) for x in ids),
            seconds=seconds,
        )
        return Sampled(ids, logprobs, finish, [self.decode_ids(x) for x in ids])

    def context_limit(self) -> int:
        """Tokens one sequence may hold: `generator.max_context_length`, at most the model's positions."""
        limit = int(self.cfg.max_context_length)
        positions = getattr(self.model.config, "max_position_embeddings", None)
        return min(limit, int(positions)) if positions else limit

    def _check_contexts(self, contexts: List[List[int]], budgets: List[int]) -> None:
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if len(budgets) != len(contexts):
            raise ValueError(f"sample_ids: {len(budgets)} token budgets for {len(contexts)} contexts")
        for i, (c, b) in enumerate(zip(contexts, budgets)):
            if not c:
                raise ValueError(f"sample_ids: context {i} is empty")
            if b < 1:
                raise ValueError(f"sample_ids: row {i} has a budget of {b} new tokens (>= 1 needed)")
            if limit and len(c) + b > limit:
                raise ValueError(
                    f"sample_ids: context {i} has {len(c)} tokens; with {b} new ones it exceeds the "
                    f"model's {limit} positions"
                )

    def _generation_config(self, do_sample: bool, max_new: int, temperature: float) -> GenerationConfig:
        """The HF generation settings, from ragtune's config alone: every field that shapes the
        next-token distribution is pinned (neutral unless generator.* sets it)."""
        kw = dict(
            max_new_tokens=max_new,
            min_new_tokens=0,
            do_sample=do_sample,
            num_beams=1,
            num_return_sequences=1,
            repetition_penalty=1.0,
            encoder_repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            length_penalty=1.0,
            renormalize_logits=False,
            remove_invalid_values=False,
            use_cache=True,
            pad_token_id=self.pad_id,
            eos_token_id=sorted(self.eos_ids) or None,
        )
        if do_sample:
            kw.update(
                temperature=temperature,
                top_p=float(self.cfg.top_p),
                top_k=int(self.cfg.top_k),  # 0 = off
                typical_p=1.0,
                epsilon_cutoff=0.0,
                eta_cutoff=0.0,
            )
        return GenerationConfig(**kw)


class AdapterCopy(Generator):
    """A frozen copy of a LoRA generator: a second adapter, named after its component, in the SAME
    peft model as the policy adapter (what `Generator.copy_as` returns under LoRA).

    Why: a deep copy of base + adapter doubles the generator's memory and saves the frozen base
    weights again, under the copy's name, in every checkpoint; the copy differs only in its adapter.
    - Weights: its parameters are the copy adapter's alone, registered under `adapter.` with the
      peft model's names minus the adapter's (`adapter.base_model.model.<...>.q_proj.lora_A.weight`);
      the model is the generator's (held, not a submodule), so a checkpoint holds only the adapter
      under the copy's name. The generator's own state dicts, at every level of its model, leave
      the copy adapter out: they are what they were before the copy existed.
    - Frozen: its parameters never require grad and are not the generator's trainable ones
      (`Generator.trainable_parameters`). Every call (all scoring goes through `_logprobs`, all
      decoding through `sample_ids`) runs under no grad with the whole peft model in eval mode and
      the copy adapter active (peft's `set_adapter`; not `disable_adapter`, which would be the
      base), then restores the previously active adapter, every requires_grad flag (peft's
      set_adapter changes them) and every train mode, also when the call raises.
    - Cost: charged under its component; `shape()` counts the base and the active adapter, so a
      call costs a forward of base + one adapter, as a deep copy's did.
    - `snapshot_(generator)` copies the policy adapter's weights into it; it is created as such a
      copy. `ragtune.decoding`'s decoders run `gen.model` directly: they serve the policy only.
    """

    def __init__(self, source: Generator, component: str):
        super().__init__(source.model, source.tokenizer, source.cfg, source.ledger, component)
        model = self._modules.pop("model")  # held, not registered: the base weights stay the generator's
        object.__setattr__(self, "model", model)
        policy = model.active_adapter
        if component in model.peft_config or _adapter_param_names(model, component):
            raise ValueError(f"copy_as: '{component}' already names an adapter or a module of the generator")
        flags = [(p, p.requires_grad) for p in model.parameters()]
        with torch.random.fork_rng(devices=[]):  # peft draws initial values (on the CPU): overwritten below
            model.add_adapter(component, copy.deepcopy(model.peft_config[policy]))
        for p, flag in flags:  # adding an adapter re-marks the active one trainable: undo that
            p.requires_grad_(flag)
        params = dict(model.named_parameters())
        names = _adapter_param_names(model, component)
        mine = {_rename(n, component, None): params[n] for n in names}
        self.adapter = _Shared(mine)
        self.adapter.requires_grad_(False)
        self._pairs = [(params[n], params[_rename(n, component, policy)]) for n in names]  # (copy, policy)
        source._copied.update(id(p) for p in mine.values())
        _hide_from_state_dicts(model, names)
        self.snapshot_(source)

    def copy_as(self, component: str) -> Generator:
        raise NotImplementedError("copy the generator itself, not one of its adapter copies")

    @torch.no_grad()
    def snapshot_(self, source: Generator) -> None:
        """The copy adapter's weights become the policy adapter's current ones."""
        if source.model is not self.model:
            raise ValueError("an adapter copy snapshots the generator whose model it lives in")
        for mine, theirs in self._pairs:
            mine.copy_(theirs)

    def trainable(self) -> bool:
        return False

    @contextmanager
    def _active(self) -> Iterator[None]:
        """No grad, the whole model in eval mode, this adapter active; everything restored after."""
        model = self.model
        previous = model.active_adapter
        flags = [(p, p.requires_grad) for p in model.parameters()]
        modes = [(m, m.training) for m in model.modules()]
        try:
            model.eval()
            model.set_adapter(self.component, inference_mode=True)
            with torch.no_grad():
                yield
        finally:
            model.set_adapter(previous)
            for p, flag in flags:
                p.requires_grad_(flag)
            for m, mode in modes:
                m.training = mode

    def _logprobs(self, *args, **kwargs) -> Tuple[torch.Tensor, torch.Tensor]:
        with self._active():
            return super()._logprobs(*args, **kwargs)

    def sample_ids(self, *args, **kwargs) -> Sampled:
        with self._active():
            return super().sample_ids(*args, **kwargs)


class _Shared(nn.Module):
    """Parameters of another module registered under their dotted names (the same tensors, nothing
    copied), so that they are this module's parameters and state dict."""

    def __init__(self, params: Dict[str, nn.Parameter]):
        super().__init__()
        for name, p in params.items():
            *path, leaf = name.split(".")
            mod = self
            for part in path:
                if part not in mod._modules:
                    mod.add_module(part, nn.Module())
                mod = mod._modules[part]
            mod.register_parameter(leaf, p)


def _is_peft(model: nn.Module) -> bool:
    return hasattr(model, "peft_config")


def _adapter_param_names(model: nn.Module, adapter: str) -> List[str]:
    """Names of a peft adapter's parameters: peft puts the adapter's name as one segment of them."""
    return [n for n, _ in model.named_parameters() if adapter in n.split(".")]


def _rename(name: str, adapter: str, to: Optional[str]) -> str:
    """`name` with its `adapter` segment replaced by `to` (dropped when None)."""
    parts = [to if s == adapter else s for s in name.split(".")]
    return ".".join(s for s in parts if s is not None)


def _hide_from_state_dicts(model: nn.Module, names: Sequence[str]) -> None:
    """Leave the named parameters out of the state dict of `model` and of every submodule holding
    them (a post-hook on each owner). A strict load of such a state dict into a copy of `model`
    made after this fails: copy the model before."""
    owners: Dict[str, List[str]] = {}
    for n in names:
        owner, _, leaf = n.rpartition(".")
        owners.setdefault(owner, []).append(leaf)
    for owner, leaves in owners.items():

        def drop(module, state_dict, prefix, local_metadata, leaves=tuple(leaves)) -> None:
            for leaf in leaves:
                state_dict.pop(prefix + leaf, None)

        model.get_submodule(owner).register_state_dict_post_hook(drop)


def _idle_adapter_linears(model: nn.Module) -> List[nn.Linear]:
    """The nn.Linear modules of a peft model's inactive adapters: they do no work in a forward."""
    if not _is_peft(model):
        return []
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = []
    for layer in model.modules():
        if isinstance(layer, BaseTunerLayer):
            active = set(layer.active_adapters)
            for attr in layer.adapter_layer_names:
                for name, sub in getattr(layer, attr).items():
                    if name not in active and isinstance(sub, nn.Module):
                        out += [m for m in sub.modules() if isinstance(m, nn.Linear)]
    return out


def _target_logprobs(head: nn.Module, x: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    """x (C, H) hidden states, t (C,) targets -> (C,) log softmax(head(x) / temperature)[t], at
    least fp32."""
    logits = head(x)  # (C, V)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, t.unsqueeze(-1)).squeeze(-1)


class _StepLogprobs(LogitsProcessor):
    """Records log softmax(logits / t) of each generated token, leaving the scores unchanged.

    HF calls the processors once per step with the ids so far and the step's fp32 logits; ragtune's
    generation config enables no processor before this one and the sampling warpers (temperature,
    top_k, top_p) run after it, so it sees the raw logits. The token chosen at step s is read at
    step s + 1; `finish` reads the last one."""

    def __init__(self, temperature: float):
        self.t = temperature
        self.prev: Optional[torch.Tensor] = None  # (n, V) log-probs of the last step
        self.rows: List[torch.Tensor] = []  # (n,) per generated token

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.prev is not None:
            self.rows.append(self.prev.gather(1, input_ids[:, -1:]).squeeze(1))
        self.prev = torch.log_softmax(scores.float() / self.t, dim=-1)
        return scores

    def finish(self, new: torch.Tensor) -> torch.Tensor:
        """new (n, S) generated ids -> (n, S) their log-probs."""
        S = new.shape[1]
        if S == 0:
            return torch.zeros(new.shape, dtype=torch.float32)
        if len(self.rows) < S:  # the last token (later steps, if any, were undone by generate)
            self.rows.append(self.prev.gather(1, new[:, S - 1 : S]).squeeze(1))
        return torch.stack(self.rows[:S], dim=1)


class _RowEnds(StoppingCriteria):
    """Ends row i once it has `budgets[i]` new tokens, or as soon as the decoded text of its new ids
    contains a stop string (the number of new ids then is kept in `stop_at[i]`). Checked every
    step, so a stop string is found when its last token arrives: only a tail of the new ids long
    enough to hold any stop string (4 byte-level tokens per character, and a margin) is decoded."""

    def __init__(self, start: int, budgets: List[int], stops: List[str], decode):
        self.start, self.stops, self.decode = start, stops, decode
        self.budgets = torch.tensor(budgets)
        self.stop_at: List[Optional[int]] = [None] * len(budgets)
        self.tail = 4 * max((len(s) for s in stops), default=0) + 8

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        n_new = input_ids.shape[1] - self.start
        done = self.budgets <= n_new  # (n,)
        if self.stops:
            tails = input_ids[:, max(self.start, input_ids.shape[1] - self.tail) :].tolist()
            for i, row in enumerate(tails):
                # a stop string completed by the budget's last token is still a stop, not "length"
                if self.stop_at[i] is None and any(s in self.decode(row) for s in self.stops):
                    self.stop_at[i] = n_new
            done = done | torch.tensor([s is not None for s in self.stop_at])
        return done.to(input_ids.device)


@contextmanager
def _without_model_generation_defaults(model: nn.Module) -> Iterator[None]:
    """Hide the model's own generation_config while HF generate runs: in transformers >= 5 every
    field the passed config leaves unset is filled from it (an instruct model's shipped
    repetition penalty, top_k, suppressed tokens...), so an empty one stands in for it."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved = getattr(base, "generation_config", None)
    if saved is None:
        yield
        return
    base.generation_config = GenerationConfig()
    try:
        yield
    finally:
        base.generation_config = saved


def check_scored_rows(contexts, targets, loss_mask, what: str) -> None:
    """The input contract of every per-target-position scorer (`token_logprobs`, a value head):
    equal, non-empty lists, no empty context (nothing would precede the first target), one mask
    value per target."""
    N = len(contexts)
    if N != len(targets) or N == 0 or (loss_mask is not None and len(loss_mask) != N):
        raise ValueError(f"{what} needs equal, non-empty lists, got {N} contexts, {len(targets)} targets")
    for i, c in enumerate(contexts):
        if not c:
            raise ValueError(f"{what}: context {i} is empty (nothing precedes its first target)")
        if loss_mask is not None and len(loss_mask[i]) != len(targets[i]):
            raise ValueError(f"{what}: row {i} has {len(targets[i])} targets, {len(loss_mask[i])} mask values")


def pack_scored_rows(contexts, targets, loss_mask, pad_id: int):
    """Right-padded rows context + target (CPU): input_ids, attn (N, L); pos (N, T), the position
    whose state predicts target t (padding points at a valid place); tgt (N, T) the target ids
    (pad_id beyond a row); mask (N, T) = loss_mask (1 where None) at real targets, else 0."""
    N, T = len(contexts), max(len(a) for a in targets)
    seqs = [list(c) + list(a) for c, a in zip(contexts, targets)]
    L = max(len(s) for s in seqs)
    input_ids = torch.full((N, L), pad_id, dtype=torch.long)
    attn = torch.zeros((N, L), dtype=torch.long)
    pos = torch.zeros((N, T), dtype=torch.long)
    tgt = torch.full((N, T), pad_id, dtype=torch.long)
    mask = torch.zeros((N, T))
    for i, (s, a) in enumerate(zip(seqs, targets)):
        input_ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
        start = len(contexts[i]) - 1
        pos[i, : len(a)] = torch.arange(start, start + len(a))
        pos[i, len(a) :] = start
        tgt[i, : len(a)] = torch.tensor(a, dtype=torch.long)
        mask[i, : len(a)] = 1.0 if loss_mask is None else torch.tensor(loss_mask[i], dtype=torch.float32)
    return input_ids, attn, pos, tgt, mask


def _eos_ids(tokenizer, extra: List[str]) -> frozenset:
    """The ids ending a generation: the tokenizer's eos plus each of `extra` (generator.eos_tokens),
    each of which must be a single token of the vocabulary."""
    ids = {tokenizer.eos_token_id} - {None}
    vocab = tokenizer.get_vocab() if extra else {}
    for i, t in enumerate(extra):
        if t not in vocab:
            raise ConfigError(
                f"config key 'generator.eos_tokens[{i}]': {t!r} is not one token of the generator's vocabulary"
            )
        ids.add(vocab[t])
    return frozenset(ids)


def float32_(params: Sequence[nn.Parameter]) -> int:
    """Master weights: cast each of `params` (parameters training may update) to float32 in place
    (the Parameter objects stay the same), the frozen rest staying in its loaded dtype: AdamW on
    bf16/fp16 weights loses updates below the weights' precision (a bf16 weight of 1.0 ignores
    steps under 4e-3). Returns the number cast."""
    n = 0
    for p in params:
        if p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
            n += 1
    return n


def build_generator(
    cfg, texts: List[str], ledger: Ledger, seed: int, cache_dir: str = "", master_weights: bool = True
) -> Generator:
    """Build from `cfg.generator`: tiny (optionally LM-pretrained on `texts`, cached) or HF name/path,
    in `cfg.dtype`, with float32 master weights for what training may update (`master_weights`;
    `run.build_pipeline` passes False: there `setup_strategy` casts exactly what the run trains, so
    a generator no phase trains stays in its loaded dtype)."""
    from ragtune import modelzoo
    from ragtune.pretrain import pretrained_tiny_generator

    if cfg.model == "tiny":
        if cfg.pretrain.steps > 0:
            model, tok = pretrained_tiny_generator(cfg, texts, cache_dir)
        else:
            tok = modelzoo.cached_tokenizer("bpe", texts, cfg.tiny.vocab_size, cache_dir)
            model = modelzoo.tiny_decoder(cfg.tiny, tok, seed)
    else:
        model, tok = modelzoo.load_hf(cfg.model, "generator.model", causal=True, dtype=DTYPES[cfg.dtype])
    model = model.to(DTYPES[cfg.dtype])
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
    gen = Generator(model, tok, cfg, ledger)
    if master_weights:
        float32_(gen.trainable_parameters())
    return gen
