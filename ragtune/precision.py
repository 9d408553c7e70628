"""Numeric precision: load dtypes, the run's compute precision, and the float32 islands inside it.

Three separate choices (each model's `dtype`, `train.precision`, and float32 where it matters):
- `DTYPES`: the dtype a model's weights are loaded in (`generator.dtype`, `retriever.dtype`);
  every parameter a phase trains is then kept in float32 (`RAGPipeline.setup_strategy`).
- `compute(precision, device)`: the autocast context of `train.precision` on `device`, the same
  one accelerate's `Accelerator.autocast()` opens (torch.autocast with bfloat16), so training,
  dev evaluation, `ragtune eval` and the runner's test evaluation all compute alike. Not quite
  under DeepSpeed: there accelerate's autocast is a no-op and the engine computes with its bf16
  copy of the weights (dev evaluation inside a phase too), while the final evaluation runs the
  float32 masters under this autocast: the same bf16 matmuls, float32 elsewhere.
- `fp32(t)`: autocast switched off, for retrieval scores and the index search. Under autocast a
  matmul runs in bf16, whose 8-bit mantissa resolves 0.125 at 16..32: scores s/tau (tau = 0.05)
  of normalised embeddings live there, so a bf16 score would blur the softmax over passages
  (and swap neighbours in a top-k). Softmaxes and logsumexps of float32 inputs stay in float32
  under autocast on CPU and CUDA alike (autocast lowers only matmul-like ops).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def compute(precision: str, device) -> object:
    """The autocast context of `train.precision` ("no" | "bf16") on `device`."""
    if precision == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    if precision != "no":
        raise ValueError(f"train.precision={precision!r}: ragtune computes in float32 ('no') or bf16")
    return nullcontext()


def fp32(t: torch.Tensor) -> object:
    """Autocast off on `t`'s device type: matmuls in the inputs' own dtype (cast them to float)."""
    return torch.autocast(device_type=t.device.type, enabled=False)


def upcast(t: torch.Tensor) -> torch.Tensor:
    """`t` in at least float32: bf16/fp16 become float32, float32/float64 stay as they are."""
    return t.float() if t.is_floating_point() and t.element_size() < 4 else t
