"""A value model (critic) for token-level policy gradients: a causal-LM trunk with a scalar head.

`ValueModel` holds `trunk`, a copy of the generator's decoder (the causal LM without its LM head;
under LoRA the adapted decoder, adapters included: a trainable part has all its parameters
optimised, so the critic then trains its whole trunk, as veRL's full-model critic does), and
`head`, a `Linear(hidden, 1)`. Its one
scoring call, `values(contexts, targets, loss_mask)`, lays the rows out exactly as
`Generator.token_logprobs` does (right-padded context + target ids, hidden states gathered at the
position *predicting* each target), so `values[n, t] = V(s_t)` with s_t = context + targets_<t:
the state in which the policy chose target t, aligned token for token with the policy's
log-probs. That is veRL's critic layout (`values[:, -response_length - 1 : -1]`).

The head starts like the score head of a fresh `AutoModelForTokenClassification(num_labels=1)`
(what veRL's critic loads): weight ~ N(0, initializer_range^2) (0.02 without one), bias 0, drawn
from the global torch RNG at construction. The trunk is whatever the caller copies into it
(`load_trunk_`); a strategy typically copies the generator's weights when its RL phase starts.

Cost: every call is charged here, once, through `Ledger.charge_model` under `component` (the
strategy part's name), from the padded lengths, with the head on the T target positions only:
the same formula the generator's own scoring calls use (`ragtune.flops`; `get_output_embeddings`
names the value head, so `ModelShape.of` counts it as the head). A call under grad with
trainable weights is charged as `train`, otherwise as `score`.
"""

from __future__ import annotations

import copy
from typing import List, Optional, Tuple

import torch
from torch import nn

from ragtune.flops import ModelShape
from ragtune.generator import check_scored_rows, pack_scored_rows
from ragtune.ledger import Ledger, clock


def _decoder(model: nn.Module) -> nn.Module:
    """The decoder of a causal LM (through a peft wrapper), as `Generator` runs it."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder()


class ValueModel(nn.Module):
    def __init__(self, trunk: nn.Module, ledger: Ledger, component: str, pad_id: int):
        super().__init__()
        conf = trunk.config
        self.trunk = trunk
        self.head = nn.Linear(conf.hidden_size, 1)
        dev = next(trunk.parameters()).device
        with torch.no_grad():
            self.head.weight.normal_(0.0, float(getattr(conf, "initializer_range", 0.02)))
            self.head.bias.zero_()
        self.head.to(dev)
        self.ledger = ledger
        self.component = component  # the ledger charges every call under this name
        self.pad_id = pad_id

    @classmethod
    def from_generator(cls, generator, component: str) -> ValueModel:
        """A critic whose trunk is an independent copy of `generator`'s decoder, charged as `component`."""
        return cls(copy.deepcopy(_decoder(generator.model)), generator.ledger, component, generator.pad_id)

    @torch.no_grad()
    def load_trunk_(self, generator) -> None:
        """The trunk becomes a copy of `generator`'s current decoder weights (the head is kept)."""
        self.trunk.load_state_dict(_decoder(generator.model).state_dict())

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def get_output_embeddings(self) -> nn.Module:
        """The value head, counted by `ModelShape.of` as the head (it runs on T positions only)."""
        return self.head

    def trainable(self) -> bool:
        return any(p.requires_grad for p in self.parameters())

    def shape(self) -> ModelShape:
        conf = self.trunk.config
        head_dim = getattr(conf, "head_dim", None) or conf.hidden_size // conf.num_attention_heads
        return ModelShape.of(self, conf.num_hidden_layers, head_dim * conf.num_attention_heads)

    def values(
        self, contexts: List[List[int]], targets: List[List[int]], loss_mask: Optional[List[List[float]]] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """values (N, T) float32 = V(context + targets_<t) at every target position, and mask (N, T)
        = loss_mask (1 where None) x validity (0 at padding); values are exactly 0 (and get no
        gradient) where mask is 0. One batched forward, charged once."""
        check_scored_rows(contexts, targets, loss_mask, "values")
        N, T = len(contexts), max(len(a) for a in targets)
        input_ids, attn, pos, _, mask = pack_scored_rows(contexts, targets, loss_mask, self.pad_id)
        L = input_ids.shape[1]
        dev = self.device
        input_ids, attn, pos, mask = input_ids.to(dev), attn.to(dev), pos.to(dev), mask.to(dev)
        t0 = clock()
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.trainable()):
            hidden = self.trunk(input_ids=input_ids, attention_mask=attn).last_hidden_state  # (N, L, H)
            h = hidden.gather(1, pos.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))  # (N, T, H)
            v = self.head(h.to(self.head.weight.dtype)).squeeze(-1).float()  # (N, T)
            v = torch.where(mask != 0, v, torch.zeros((), dtype=v.dtype, device=dev))
        seconds = clock() - t0
        self.ledger.charge_model(
            self.component, self.shape(), [L] * N, head_positions=T, real_tokens=int(attn.sum()), seconds=seconds
        )
        return v, mask
