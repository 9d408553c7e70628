"""Data parallelism (ragtune.distributed): what a phase wraps, config checks, and, under torchrun
with 2 gloo processes on CPU, DDP and DeepSpeed ZeRO-2/3 against one process at the same global
batch.

The multi-process runs use `two_phase` (generator with LoRA, then query encoder: each phase has
frozen components, and the LoRA base is frozen inside the trained generator), 6 steps at a
constant learning rate, global batch 4: one process draws 4 questions per step, each of the two
ranks 1 question per micro-batch with 2 accumulation micro-batches (the sampler gives the ranks
the same 4 questions). Tolerances, relative to one process: each step's loss 1e-6 (measured: at
most 5e-8), each gradient norm 2e-4 (measured: up to 5.5e-5 on the query encoder's tiny gradient,
whose norm is that sensitive to summation order: one process with 4 micro-batches of 1 already
differs from one batch of 4 by 3.6e-5); learning rates exactly.

The corpus (108 passages) is embedded in batches of 10 (`index.batch_size`): 11 batches, 6 on rank
0 and 5 on rank 1 (`RAGPipeline.refresh_index` shards them); the run's ledger charges that work
once, exactly as one process does (FLOPs, tokens, calls of `doc_encoder`'s `index` activity),
whether the initial index is built (a fresh store, sharded) or found in the cache (replayed on
rank 0 only).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest
import torch

from ragtune import distributed, run, rundir
from ragtune.config import ConfigError
from ragtune.index_store import IndexStore
from ragtune.ledger import Ledger
from ragtune.pipeline import refresh_shard

from helpers import ROOT, TINY, build, cache_dir, tiny_cfg

LOSS_RTOL, NORM_RTOL = 1e-6, 2e-4
COMMON = [
    "strategy.name=two_phase",
    "generator.lora.enabled=true",
    "train.steps=6",
    "train.schedule=constant",
    "train.log_every=1",
    "eval.splits=[]",
    "index.batch_size=10",
]
N_PASSAGES, INDEX_BATCH = 108, 10
PER_RANK = ["train.batch_size=1", "train.grad_accum=2"]  # x 2 ranks = the reference's batch of 4


# ---- in one process ---------------------------------------------------------------------------
def test_rank_seeds_keep_rank0_and_differ_elsewhere():
    seeds = [distributed.rank_seed(7, r) for r in range(4)]
    assert seeds[0] == 7 and len(set(seeds)) == 4
    assert distributed.rank_seed(8, 1) != seeds[1]


def test_phase_module_holds_exactly_the_trained_components(tmp_path):
    from helpers import step_ctx

    data, m, _ = build(tiny_cfg(tmp_path, "strategy.name=joint"))
    pm = distributed.PhaseModule(m, {"query_encoder", "generator"})
    mods = m.component_modules()
    want = {id(p) for c in ("query_encoder", "generator") for p in mods[c].parameters()}
    assert {id(p) for p in pm.parameters()} == want
    assert not want & {id(p) for p in mods["doc_encoder"].parameters()}
    assert not any(mod is m for mod in pm.modules())  # the pipeline itself is not registered
    loss, count, logs = pm(data.train[:2], step_ctx(m))  # plain tuples: DDP and ZeRO-3 see the tensor
    assert loss.dim() == 0 and loss.requires_grad and count is None and isinstance(logs, dict)


def _cfg(tmp_path, **over):
    cfg = tiny_cfg(tmp_path, *(f"train.{k}={v}" for k, v in over.items()))
    return cfg.train


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "file not found"),
        ("{not json", "not a readable JSON"),
        ({"zero_optimization": {"stage": 1}}, "stage must be 2 or 3"),
        ({"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW"}}, "remove 'optimizer'"),
        ({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 4}, "train_micro_batch_size_per_gpu"),
        ({"zero_optimization": {"stage": 2}, "fp16": {"enabled": True}}, "fp16"),
    ],
)
def test_deepspeed_config_errors_name_the_key(tmp_path, content, message):
    path = tmp_path / "ds.json"
    if content is not None:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ConfigError, match="train.deepspeed_config") as e:
        distributed.deepspeed_config(_cfg(tmp_path, deepspeed_config=str(path)))
    assert message in str(e.value)


@pytest.mark.parametrize("stage", [2, 3])
def test_shipped_deepspeed_configs_are_valid(tmp_path, stage):
    cfg = distributed.deepspeed_config(_cfg(tmp_path, deepspeed_config=f"configs/deepspeed/zero{stage}.json"))
    assert cfg["zero_optimization"]["stage"] == stage
    assert all(cfg[k] == "auto" for k in distributed.FILLED)


def test_deepspeed_not_importable_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed -> ImportError
    with pytest.raises(ConfigError, match="train.distributed.*deepspeed cannot be imported"):
        distributed._deepspeed_plugin(_cfg(tmp_path, distributed="deepspeed"))


def test_deepspeed_dropped_by_the_environment_is_an_error(tmp_path):
    """accelerate drops DeepSpeed silently under ACCELERATE_USE_CPU: ragtune refuses (exit 2)."""
    pytest.importorskip("deepspeed")
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "ragtune.cli", "train", TINY, f"data.cache_dir={cache_dir()}"]
    cmd += ["train.distributed=deepspeed", f"run_dir={tmp_path / 'r'}"]
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "config key 'train.distributed': deepspeed was requested but" in res.stderr
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


# ---- two processes ----------------------------------------------------------------------------
def _steps(run_dir):
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def _index_charges(cost: dict) -> dict:
    """The passage tower's corpus-embedding charges in a ledger's totals: {field: value}."""
    return {f: cost[f"{f}_by_component"]["doc_encoder"]["index"] for f in ("flops", "tokens", "real_tokens", "calls")}


def _index_cost(run_dir) -> dict:
    """`_index_charges` of a run (result.json's cost)."""
    return _index_charges(json.loads((run_dir / "result.json").read_text())["cost"])


def _rank_batches(rank: int, builds: int) -> list:
    """Rows of the corpus-embedding batches `rank` of 2 runs in `builds` index builds: its share."""
    sizes = [min(INDEX_BATCH, N_PASSAGES - j * INDEX_BATCH) for j in range(-(-N_PASSAGES // INDEX_BATCH))]
    return [sizes[j] for j in refresh_shard(len(sizes), rank, 2)] * builds


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory):
    """One process, batch 4, no accumulation: the run every 2-rank run must reproduce."""
    d = tmp_path_factory.mktemp("ref")
    run.load_data(tiny_cfg(d / "x").data)  # fill the data cache once, not from two processes
    res = run.train_and_evaluate(tiny_cfg(d / "r", *COMMON, "train.batch_size=4"))
    assert res["status"] == "ok"
    return d / "r"


@pytest.fixture(scope="module")
def reference(reference_dir):
    """The reference run's trajectory (its step lines)."""
    return _steps(reference_dir)


def _torchrun(tmp_path, run_dir, *extra, child=False):
    logs = tmp_path / "rank_logs"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAGTUNE_DIST_LOG": str(tmp_path / "record")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["--log-dir", str(logs), "--redirects", "3"]
    cmd += [str(ROOT / "tests" / "dist_child.py")] if child else ["-m", "ragtune.cli"]
    cmd += ["train", TINY, *COMMON, *PER_RANK, f"data.cache_dir={cache_dir()}", *extra, f"run_dir={run_dir}"]
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    ranks = {str(p.relative_to(logs)): p.read_text(errors="replace")[-1500:] for p in sorted(logs.rglob("*.log"))}
    return res, f"torchrun exit {res.returncode}; per-rank logs: {ranks}; launcher: {res.stderr[-800:]}"


def _same_trajectory(got, want):
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want):
        for key in ("loss", "grad_norm", *(k for k in w if k.startswith("grad_norm/"))):
            rel = LOSS_RTOL if key == "loss" else NORM_RTOL
            assert g[key] == pytest.approx(w[key], rel=rel), (g["step"], key, g[key], w[key])
        lrs = lambda row: {k: v for k, v in row.items() if k.startswith("lr/")}  # noqa: E731
        assert lrs(g) == lrs(w)


@pytest.mark.slow
def test_ddp_wraps_only_trained_parameters_syncs_once_per_step_and_matches_one_process(
    tmp_path, reference, reference_dir
):
    """Also: the initial index, built in a fresh store, is sharded (each rank embeds its own
    batches), charged once for the logical work, and stored by rank 0 with the logical charges."""
    res, why = _torchrun(tmp_path, tmp_path / "r", f"index.store={tmp_path / 'store'}", child=True)
    assert res.returncode == 0, why
    _same_trajectory(_steps(tmp_path / "r"), reference)
    assert _index_cost(tmp_path / "r") == _index_cost(reference_dir)
    (entry,) = (tmp_path / "store").glob("*.pt")
    stored = Ledger()
    stored.load_state_dict(IndexStore(tmp_path / "store").get(entry.stem)["charges"])
    assert _index_charges(stored.deterministic_view()) == _index_cost(reference_dir)
    records = [json.loads((tmp_path / "record" / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rec in records:
        assert [p["trains"] for p in rec["phases"]] == [["generator"], ["query_encoder"]]
        for phase in rec["phases"]:
            # the wrapped module is the phase's components; what requires grad is what it trains
            assert phase["requires_grad"] == phase["trained"] and phase["trained"]
            assert {n.split(".")[1] for n in phase["module"]} == set(phase["trains"])  # nothing frozen wrapped
            reduced = {n for a in rec["allreduces"] if a["trains"] == phase["trains"] for n in a["params"]}
            assert reduced == set(phase["trained"])  # frozen weights (the LoRA base) never all-reduced
        gen = rec["phases"][0]
        assert all("lora_" in n for n in gen["trained"]) and len(gen["module"]) > len(gen["trained"])
        # no_sync: each bucket once per optimizer step (3 per phase), not once per micro-batch (6)
        for trains in (["generator"], ["query_encoder"]):
            per_bucket = Counter(a["bucket"] for a in rec["allreduces"] if a["trains"] == trains)
            assert per_bucket and set(per_bucket.values()) == {3}, per_bucket
    assert records[0]["seed"] != records[1]["seed"]  # per-rank seeds
    for r, rec in enumerate(records):  # each rank embedded its share of the initial index only
        assert rec["index_batches"] == _rank_batches(r, builds=1), r


EVAL_BATCH = 3  # 16 dev and 16 test questions: 6 batches each, the last of one question


@pytest.mark.slow
def test_ddp_evaluation_is_sharded_and_scores_what_one_process_scores(tmp_path):
    """Dev at steps 3 and 6 and the final dev + test evaluation run on both ranks: batch j (of
    `eval.batch_size`, in question order) on rank j % 2 only. The final scores are exactly those of
    a one-process re-evaluation of the same final weights (`ragtune eval`), FLOPs per question
    included (the ranks' shares summed), and so are the predictions the main rank wrote."""
    evals = ["eval.splits=[dev,test]", f"eval.batch_size={EVAL_BATCH}", "train.eval_every=3"]
    res, why = _torchrun(tmp_path, tmp_path / "r", *evals, child=True)
    assert res.returncode == 0, why
    data = run.load_data(tiny_cfg(tmp_path / "x").data)
    ids = {split: [x.id for x in getattr(data, split)] for split in ("dev", "test")}
    batches = {s: [v[i : i + EVAL_BATCH] for i in range(0, len(v), EVAL_BATCH)] for s, v in ids.items()}
    for r in (0, 1):
        got = json.loads((tmp_path / "record" / f"rank{r}.json").read_text())["eval_batches"]
        share = {s: b[r::2] for s, b in batches.items()}
        assert got == share["dev"] * 3 + share["test"], r  # dev at steps 3 and 6, then the final dev, test
    result = json.loads((tmp_path / "r" / "result.json").read_text())
    written = {s: rundir.predictions_path(tmp_path / "r", s).read_text() for s in ("dev", "test")}
    scores = run.eval_run(tmp_path / "r")  # one process, the same final.pt (rewrites the predictions)
    for split in ("dev", "test"):
        assert {k: v for k, v in result[split].items() if k != "seconds_per_question"} == {
            k: v for k, v in scores[split].items() if k != "seconds_per_question"
        }, split
        assert result[split]["flops_per_question"] > 0
        assert rundir.predictions_path(tmp_path / "r", split).read_text() == written[split], split
    rows = [json.loads(ln) for ln in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "dev/em" in r] == [3, 6]


ZERO3_PARTITIONED = {  # every parameter partitioned (the shipped config keeps small ones whole)
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, "overlap_comm": False},
}


@pytest.mark.slow
def test_deepspeed_zero2_matches_one_process(tmp_path, reference, reference_dir):
    """Also: the initial index is a cache hit (the reference stored it) on both ranks, charged once."""
    pytest.importorskip("deepspeed")
    res, why = _torchrun(tmp_path, tmp_path / "r", "train.distributed=deepspeed")
    assert res.returncode == 0, why
    _same_trajectory(_steps(tmp_path / "r"), reference)
    result = json.loads((tmp_path / "r" / "result.json").read_text())
    assert result["status"] == "ok" and "refresh_ranks" not in result["index"]  # a hit: nothing embedded
    assert _index_cost(tmp_path / "r") == _index_cost(reference_dir)


@pytest.mark.slow
def test_deepspeed_zero3_matches_one_process_and_resumes_exactly(tmp_path, reference, reference_dir):
    """ZeRO-3 with every parameter partitioned: cut after step 2 (inside the first phase, Adam
    moments in the engine's per-rank shards), resumed, evaluated on dev (main process only, full
    parameters gathered); the whole trajectory is the one-process one."""
    pytest.importorskip("deepspeed")
    ds = tmp_path / "zero3.json"
    ds.write_text(json.dumps(ZERO3_PARTITIONED))
    args = ["train.distributed=deepspeed", f"train.deepspeed_config={ds}", "train.save_every=1"]
    cut, why = _torchrun(tmp_path, tmp_path / "r", *args, "debug.stop_after=2")
    assert cut.returncode != 0, why
    last = torch.load(tmp_path / "r" / "checkpoints" / "last.pt", weights_only=False)
    assert last["step"] == 2 and last["opt"] is None
    shards = sorted(p.name for p in (tmp_path / "r" / "checkpoints" / "engine" / last["trainer"]["engine"]).iterdir())
    assert sum("optim_states" in s for s in shards) == 2, shards  # one optimizer shard per rank
    res, why = _torchrun(tmp_path, tmp_path / "r", *args, "train.eval_every=3")
    assert res.returncode == 0, why
    _same_trajectory(_steps(tmp_path / "r"), reference)
    rows = [json.loads(ln) for ln in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "dev/em" in r] == [3, 6]
    assert _index_cost(tmp_path / "r") == _index_cost(reference_dir)  # once, through the cut and resume


SHARED_TOWER = ["retriever.shared_towers=true", "index.refresh_every=1"]


@pytest.mark.slow
def test_zero3_index_refreshes_are_sharded_and_charged_once(tmp_path):
    """Shared towers: phase 2 trains the passage tower, so the index is refreshed after each of
    steps 4-6. Under ZeRO-3 with every parameter partitioned each refresh runs inside `gathered()`
    with rank 0 making 6 passage-tower forwards and rank 1 five (the pinned full parameters let
    the ranks' call counts differ); the trajectory is one process's, each rank embedded only its
    share of the 4 index builds (the initial one in a fresh store) and the run charges them once."""
    pytest.importorskip("deepspeed")
    ref = tmp_path / "ref"
    assert run.train_and_evaluate(tiny_cfg(ref, *COMMON, *SHARED_TOWER, "train.batch_size=4"))["status"] == "ok"
    ds = tmp_path / "zero3.json"
    ds.write_text(json.dumps(ZERO3_PARTITIONED))
    args = [*SHARED_TOWER, "train.distributed=deepspeed", f"train.deepspeed_config={ds}"]
    res, why = _torchrun(tmp_path, tmp_path / "r", *args, f"index.store={tmp_path / 'store'}", child=True)
    assert res.returncode == 0, why
    _same_trajectory(_steps(tmp_path / "r"), _steps(ref))
    assert _index_cost(tmp_path / "r") == _index_cost(ref)
    assert _index_cost(ref)["calls"] == 4 * -(-N_PASSAGES // INDEX_BATCH)  # initial + 3 refreshes
    for r in (0, 1):
        rec = json.loads((tmp_path / "record" / f"rank{r}.json").read_text())
        assert rec["index_batches"] == _rank_batches(r, builds=4), r


# every parameter partitioned, fetched for each module call and released right after it (no reuse,
# no prefetch): what a model too large to keep gathered runs under
ZERO3_RELEASED = {
    "zero_optimization": {
        "stage": 3,
        "stage3_param_persistence_threshold": 0,
        "stage3_max_live_parameters": 0,
        "stage3_max_reuse_distance": 0,
        "stage3_prefetch_bucket_size": 0,
        "overlap_comm": False,
    }
}
RL_EPISODES = ["strategy.name=rl_retriever", "strategy.reader_fraction=0", "strategy.horizon=4", "train.steps=12"]
# one question per rank and step, drawing from its own few candidates: episodes end at coverage early or late
RL_EPISODES += ["train.grad_accum=1", "strategy.pool=candidates"]


@pytest.mark.slow
def test_zero3_rl_retriever_episodes_of_different_lengths_match_ddp(tmp_path):
    """rl_retriever's episodes end at different steps, so while collecting the two ranks make
    different numbers of tower calls (a step where their longest episodes differ is asserted); the
    trainer collects with ZeRO-3's parameters gathered and its module hooks detached, so ZeRO-3
    with every parameter partitioned and no reuse or prefetch runs through (before, such a step
    hung until the collective timeout) and reproduces the DDP run at the same ranks and seeds. The
    collection's logs are means over the ranks, as the step's logs are, and the work charged is
    the DDP run's."""
    pytest.importorskip("deepspeed")
    ds = tmp_path / "zero3.json"
    ds.write_text(json.dumps(ZERO3_RELEASED))
    zero3 = ["train.distributed=deepspeed", f"train.deepspeed_config={ds}", "train.dist_timeout_s=120"]
    runs = {}
    for name, extra in (("ddp", []), ("zero3", zero3)):
        res, why = _torchrun(tmp_path / name, tmp_path / name / "r", *RL_EPISODES, *extra, child=True)
        assert res.returncode == 0, why
        episodes = [json.loads((tmp_path / name / "record" / f"rank{r}.json").read_text())["episodes"] for r in (0, 1)]
        runs[name] = (_steps(tmp_path / name / "r"), episodes)
    (ddp, ddp_eps), (z3, z3_eps) = runs["ddp"], runs["zero3"]
    _same_trajectory(z3, ddp)
    assert z3_eps == ddp_eps and len(ddp_eps[0]) == len(ddp_eps[1]) == 12
    # rollouts of different lengths on the two ranks at some step
    assert any(max(a) != max(b) for a, b in zip(*ddp_eps)), ddp_eps
    for steps, eps in runs.values():
        for row, a, b in zip(steps, *eps):
            assert row["collect/episode_steps"] == (sum(a) / len(a) + sum(b) / len(b)) / 2
    # the work charged is the DDP run's, component by component
    costs = [json.loads((tmp_path / n / "r" / "result.json").read_text())["cost"] for n in ("ddp", "zero3")]
    for key in ("flops_by_component", "tokens_by_component", "calls_by_component"):
        assert costs[1][key] == costs[0][key], key


@pytest.mark.slow
def test_deepspeed_bf16_hands_back_the_float32_master_weights(tmp_path):
    """A bf16 engine trains a bf16 copy of the module; at the phase end the optimizer's float32
    master weights, not that copy, are what later phases and final.pt get: every trained weight is
    float32 and some are not bf16-representable (a bf16 copy would be), and the frozen LoRA base
    is back in its own dtype."""
    pytest.importorskip("deepspeed")
    res, why = _torchrun(tmp_path, tmp_path / "r", "train.distributed=deepspeed", "train.precision=bf16")
    assert res.returncode == 0, why
    final = torch.load(tmp_path / "r" / "final.pt", weights_only=False)["weights"]
    trained = {k: v for k, v in final.items() if "lora_" in k or k.startswith("retriever.query_encoder.")}
    assert any("lora_" in k for k in trained) and any(k.startswith("retriever.") for k in trained)
    assert all(v.dtype == torch.float32 for v in trained.values())
    for comp in ("generator.", "retriever.query_encoder."):  # both phases' components
        moved = [v for k, v in trained.items() if k.startswith(comp) and v.abs().sum() > 0]
        assert any(not torch.equal(v, v.bfloat16().float()) for v in moved), comp
