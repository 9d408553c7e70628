"""torchrun child of tests/core/test_distributed.py: `ragtune train ARGS` in this process, with
every DDP all-reduce recorded by a communication hook (which parameters each bucket carried), what
each phase's wrapped module holds, the rows of every corpus-embedding batch this rank ran (the
`index` calls of `DualEncoder.encode_tokens`), the episode lengths of every rl_retriever collection,
the question ids of every evaluation batch this rank predicted and this rank's seed; written to
$RAGTUNE_DIST_LOG/rank<R>.json for the test to check."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from ragtune import distributed, evaluate
from ragtune.cli import main
from ragtune.retriever import DualEncoder
from ragtune.strategies.rl_retriever import RLRetriever

RECORD = {"phases": [], "allreduces": [], "index_batches": [], "episodes": [], "eval_batches": []}
_wrap = distributed.DDP._wrap
_encode_tokens = DualEncoder.encode_tokens
_collect = RLRetriever.collect
_predict_batch = evaluate._predict_batch


def _recording_wrap(self, module):
    ddp = _wrap(self, module)
    names = {id(p): n for n, p in module.named_parameters()}
    trains = sorted(module.parts.keys())
    groups = module.rag.component_params()
    trained = {id(p) for c in trains for p in groups[c]}
    RECORD["phases"].append(
        {
            "trains": trains,
            "trained": sorted(names[i] for i in trained if i in names),
            "module": sorted(names.values()),
            "requires_grad": sorted(n for n, p in module.named_parameters() if p.requires_grad),
        }
    )

    def hook(state, bucket):
        RECORD["allreduces"].append(
            {"trains": trains, "bucket": bucket.index(), "params": sorted(names[id(p)] for p in bucket.parameters())}
        )
        return default_hooks.allreduce_hook(None, bucket)

    ddp.register_comm_hook(None, hook)
    return ddp


def _recording_encode_tokens(self, enc, tower, component, activity=None):
    if activity == "index":
        RECORD["index_batches"].append(int(enc["input_ids"].shape[0]))  # rows of one embedded batch
    return _encode_tokens(self, enc, tower, component, activity)


def _recording_collect(self, batch, rag, ctx):
    items, logs = _collect(self, batch, rag, ctx)
    RECORD["episodes"].append([len(x.actions) for x in items])  # steps of each question's episode
    return items, logs


def _recording_predict_batch(rag, batch, *args):
    RECORD["eval_batches"].append([x.id for x in batch])
    return _predict_batch(rag, batch, *args)


if __name__ == "__main__":
    distributed.DDP._wrap = _recording_wrap
    DualEncoder.encode_tokens = _recording_encode_tokens
    RLRetriever.collect = _recording_collect
    evaluate._predict_batch = _recording_predict_batch
    code = main(sys.argv[1:])
    RECORD["seed"] = torch.initial_seed()
    out = Path(os.environ["RAGTUNE_DIST_LOG"])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(RECORD))
    sys.exit(code)
