"""Data-parallel training: the accelerator, what each phase wraps, and how gradients are reduced.

`ragtune.trainer` reaches DDP and DeepSpeed only through the backend object made here
(`backend(acc, rag, tc)`: `Local`, `DDP` or `DeepSpeed`), so the training loop is the same for one
process, DDP and DeepSpeed.

What is wrapped: per phase, `PhaseModule` holds exactly the components the phase trains and
forwards to the pipeline, which it keeps outside its own registry. Frozen components are never
wrapped, and frozen weights inside a trained component (a LoRA generator's base) are ignored by
DDP (`_set_params_and_buffers_to_ignore_for_model`): they are neither broadcast nor all-reduced.
The same module, with one AdamW parameter group per component, is what DeepSpeed gets: accelerate's
DeepSpeed integration prepares one model, so several models trained by one loss must be one module.

Backends:
- `Local` (one process): the trainer's own loop on `p.grad`, bitwise what it was before backends.
- `DDP`: torch DDP around the phase's `PhaseModule`, rebuilt at every phase start (after
  `on_phase_start`, so a part initialised there is broadcast from rank 0), `no_sync` on every
  accumulation micro-step but the last (one all-reduce per optimizer step).
- `DeepSpeed` (ZeRO-2 or ZeRO-3, prepared by `accelerator.prepare`): backward and step go through
  the engine, clipping too (`gradient_clipping`, set from the phase's `clip_norm`). Between the
  boundary backward and the step, every rank reads its own gradient partition to compute the
  per-component norms (one all-reduce of a vector) and to normalise a `LossSum`, so the non-finite
  guard still runs before any optimizer step. Checkpoints of the engine (the partitioned optimizer
  state) are written by `save_checkpoint` next to last.pt, under a new tag each time, before
  last.pt names it (a kill in between leaves the previous pair intact). Under ZeRO-3, `gathered()`
  materialises the full parameters on every rank (read-only) wherever the pipeline is used outside
  the engine's forward: index refresh, evaluation, collection, hooks and saves. At the phase end the
  engine is destroyed and the parameters become plain full tensors again, so a later phase, the
  final save and the evaluation see ordinary modules. ZeRO-3 fetches each module's parameters with
  a collective when the module runs and records the order of module calls, which must be the same
  on every rank (checked across ranks by DeepSpeed, itself a collective), so the engine's forward
  (the strategy's loss) must make the same module calls on every rank. Inside `gathered()` the
  engine's module hooks are detached (as DeepSpeed's own `unwrap_model_for_generation` does), so
  nothing is fetched or recorded there and the ranks may make any calls: a sharded index refresh,
  generation, and a strategy's collection whose episodes end at different steps on different
  ranks (rl_retriever; tested with every parameter partitioned).

Corpus embedding (the initial index and every refresh, `RAGPipeline.refresh_index`) is sharded
over the ranks: each embeds its share of the length-sorted batches and `all_gather_rows` gives
every rank all the rows (gloo: CPU tensors; nccl: this rank's GPU), so each rank charges only its
batches and the merged ledger counts the logical work once; `rank_world` is the (rank, world
size) it shards by.

Also here: per-rank seeds (`seed_rank`: rank 0 keeps the run's seed, so rank 0 of N processes
draws what one process draws), and `wait_for_main`, the barrier other ranks wait at while the main
process writes (final weights, results), on its own gloo group with `train.dist_wait_s` as timeout,
so a slow write never trips the training collectives' `train.dist_timeout_s`. Evaluation is
sharded over the ranks (`ragtune.evaluate`, `sharded=True`), not main-only.
"""

from __future__ import annotations

import datetime
import json
import os
import random
import shutil
import socket
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ragtune.config import ConfigError
from ragtune.strategy import LossSum

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DEEPSPEED_CONFIG = "configs/deepspeed/zero2.json"
# DeepSpeed keys ragtune fills from train.* (its loop draws the batches and steps the schedule)
FILLED = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size", "gradient_clipping")
_WAIT: Dict[str, object] = {}  # the gloo group of `wait_for_main`


# ---- the accelerator ----------------------------------------------------------------------------
def launched_world() -> int:
    """Processes the launcher started (torchrun's WORLD_SIZE; 1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def build_accelerator(precision: str, tc=None):
    """The Accelerator of a run, for `train.distributed` (ddp, or deepspeed with
    `train.deepspeed_config`); raises ConfigError (naming the key) when the backend that started
    is not the one requested, e.g. DeepSpeed dropped by a launcher or by ACCELERATE_USE_CPU."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, InitProcessGroupKwargs

    kind = getattr(tc, "distributed", "ddp") if tc is not None else "ddp"
    timeout = datetime.timedelta(seconds=getattr(tc, "dist_timeout_s", 1800) if tc is not None else 1800)
    cuda = torch.cuda.is_available()
    if kind != "deepspeed":
        acc = Accelerator(
            mixed_precision=precision, cpu=not cuda, kwargs_handlers=[InitProcessGroupKwargs(timeout=timeout)]
        )
        if acc.distributed_type == DistributedType.DEEPSPEED:
            raise ConfigError(
                "config key 'train.distributed': ddp was requested but the launcher started DeepSpeed "
                "(accelerate launch --use_deepspeed); set train.distributed=deepspeed or launch without it"
            )
    else:
        plugin = _deepspeed_plugin(tc)
        _single_process_env()
        # cpu=True would make accelerate drop DeepSpeed silently; on CPU the backend is gloo
        handler = InitProcessGroupKwargs(timeout=timeout, **({} if cuda else {"backend": "gloo"}))
        acc = Accelerator(mixed_precision=precision, cpu=False, deepspeed_plugin=plugin, kwargs_handlers=[handler])
        if acc.distributed_type != DistributedType.DEEPSPEED:
            raise ConfigError(
                f"config key 'train.distributed': deepspeed was requested but {acc.distributed_type.value} "
                "started (ACCELERATE_USE_CPU set, or a launcher without DeepSpeed); refusing to train without it"
            )
        _hide_from_transformers()
    if acc.num_processes != launched_world():
        raise ConfigError(
            f"config key 'train.distributed': the launcher started {launched_world()} processes but "
            f"{kind} runs {acc.num_processes} (each process would train alone)"
        )
    if acc.num_processes > 1 and tc is not None:
        import torch.distributed as dist

        _WAIT["group"] = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=tc.dist_wait_s))
    return acc


def deepspeed_config(tc) -> dict:
    """The DeepSpeed JSON of `train.deepspeed_config` (default: configs/deepspeed/zero2.json),
    checked: ZeRO stage 2 or 3, no optimizer or scheduler of its own (ragtune builds AdamW and the
    schedule), no fp16, and the keys ragtune fills from train.* (`FILLED`) absent or "auto"."""
    key = "config key 'train.deepspeed_config'"
    name = tc.deepspeed_config or DEFAULT_DEEPSPEED_CONFIG
    path = Path(name).expanduser()
    if not path.is_absolute() and not path.exists() and (ROOT / path).exists():
        path = ROOT / path
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{key}: file not found: {name}") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}: {name} is not a readable JSON file ({e})") from None
    stage = (cfg.get("zero_optimization") or {}).get("stage")
    if stage not in (2, 3):
        raise ConfigError(f"{key}: zero_optimization.stage must be 2 or 3 (got {stage!r}); use train.distributed=ddp")
    for k in ("optimizer", "scheduler"):
        if k in cfg:
            raise ConfigError(f"{key}: remove '{k}': ragtune builds AdamW and the schedule from train.*")
    if (cfg.get("fp16") or {}).get("enabled") not in (None, False, "auto"):
        raise ConfigError(f"{key}: fp16 needs loss scaling, which ragtune refuses; use bf16 (train.precision=bf16)")
    for k in FILLED:
        if cfg.setdefault(k, "auto") != "auto":
            raise ConfigError(f'{key}: set {k} to "auto" (or leave it out): ragtune fills it from train.*')
    cfg.setdefault("bf16", {"enabled": "auto"})  # from train.precision
    cfg.setdefault("fp16", {"enabled": False})
    return cfg


def _deepspeed_plugin(tc):
    cfg = deepspeed_config(tc)
    try:
        import deepspeed  # noqa: F401
    except Exception as e:  # not installed, or its accelerator failed to load
        raise ConfigError(
            f"config key 'train.distributed': deepspeed cannot be imported ({type(e).__name__}: {e}); "
            "install the extra (pip install -e '.[deepspeed]') or set train.distributed=ddp"
        ) from None
    from accelerate.utils import DeepSpeedPlugin

    return DeepSpeedPlugin(hf_ds_config=cfg, zero3_init_flag=False)


def _hide_from_transformers() -> None:
    """Unset transformers' global DeepSpeed config (accelerate's plugin registers it). With it,
    transformers would build models partitioned (zero.Init) and make `generate` a collective
    (synced_gpus); ragtune builds every model in full, the engine partitions only the phase's
    trained components, and generation runs on the ranks that evaluate (`gathered` under ZeRO-3)."""
    from transformers.integrations import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    assert not is_deepspeed_zero3_enabled()


def _single_process_env() -> None:
    """DeepSpeed without a launcher: the environment of a one-process torchrun."""
    if "LOCAL_RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


# ---- ranks ----------------------------------------------------------------------------------
def rank_seed(seed: int, rank: int) -> int:
    """The seed of a rank: the run's seed on rank 0, a distinct one on every other rank."""
    return seed if rank == 0 else (seed * 1_000_003 + rank * 7_919) % (2**31 - 1)


def seed_rank(seed: int, rank: int) -> None:
    """Reseed python, numpy and torch for this rank (no-op on rank 0): stochastic strategies
    (sampling, exploration, dropout) draw independently on each rank. Called after the pipeline is
    built, so every rank builds the same models."""
    if rank:
        s = rank_seed(seed, rank)
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s)


def rank_world() -> Tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when none is initialised (one
    process, or a pipeline used outside a launcher)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _collective_device() -> torch.device:
    """Where tensors must be for a collective on the default group: this rank's CUDA device under
    nccl alone, CPU under gloo (also a mixed "cpu:gloo,cuda:nccl" group, which sends CPU tensors
    through gloo)."""
    backend = str(torch.distributed.get_backend())
    if "nccl" in backend and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_rows(x: torch.Tensor, chunk_bytes: int = 64 << 20) -> List[torch.Tensor]:
    """Every rank's 2-D tensor x (R_r, H), in rank order, on CPU and bit for bit; ranks may hold
    different numbers of rows, zero included (H and the dtype are then taken from the others).
    Every rank must call it. The rows travel padded to the largest R_r, `chunk_bytes` of one
    rank's rows per all_gather, so the device buffers stay bounded for a corpus-sized gather."""
    import torch.distributed as dist

    _, world = rank_world()
    if world == 1:
        return [x.cpu()]
    dev = _collective_device()
    metas: List[object] = [None] * world
    n = x.shape[0]
    dist.all_gather_object(metas, (n, x.shape[-1] if n else 0, x.dtype if n else None))
    rows = [int(m[0]) for m in metas]  # (world,) rows per rank
    dim = max(int(m[1]) for m in metas)
    dtype = next((m[2] for m in metas if m[2] is not None), torch.float32)
    width = max(rows)
    mine = torch.zeros((width, dim), dtype=dtype)  # (max R, H) this rank's rows, zero-padded
    if n:
        mine[:n] = x.cpu()
    out = [torch.empty((width, dim), dtype=dtype) for _ in range(world)]  # (max R, H) per rank, CPU
    step = max(1, chunk_bytes // max(1, dim * mine.element_size()))
    for a in range(0, width, step):
        part = mine[a : a + step].to(dev)  # (c, H)
        parts = [torch.empty_like(part) for _ in range(world)]
        dist.all_gather(parts, part)
        for r in range(world):
            out[r][a : a + step] = parts[r].cpu()
    return [o[:k] for o, k in zip(out, rows)]


def wait_for_main(acc) -> None:
    """Barrier at which every rank waits for main-process-only work (writes), with the
    long `train.dist_wait_s` timeout of its own gloo group (`wait_for_everyone` without a group)."""
    if acc.num_processes == 1:
        return
    group = _WAIT.get("group")
    if group is None:
        acc.wait_for_everyone()
    else:
        torch.distributed.barrier(group=group)


def all_agree(acc, fn) -> None:
    """Run `fn` on every rank; an exception raised on any rank is raised on all (same type and
    message), so no rank goes on into a collective the others have left."""
    err = None
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - re-raised below on every rank
        err = e
    if acc.num_processes == 1:
        if err is not None:
            raise err
        return
    from accelerate.utils import gather_object

    errs = gather_object([None if err is None else (type(err), str(err))])
    first = next((e for e in errs if e is not None), None)
    if first is not None:
        raise err if err is not None else first[0](first[1])


# ---- the module a phase trains ----------------------------------------------------------------
class PhaseModule(nn.Module):
    """The components `trains` as one module; `forward(batch, ctx)` is the strategy's loss on the
    whole pipeline, returned as (loss tensor, LossSum count or None, logs): plain tuples, which
    DDP and DeepSpeed's ZeRO-3 hooks traverse (a dataclass would hide the tensor from ZeRO-3)."""

    def __init__(self, rag, trains: Sequence[str]):
        super().__init__()
        object.__setattr__(self, "rag", rag)  # not a submodule: nothing outside `trains` is registered
        mods = rag.component_modules()
        self.parts = nn.ModuleDict({c: mods[c] for c in sorted(trains)})

    def forward(self, batch, ctx):
        out, logs = self.rag(batch, ctx)
        if isinstance(out, LossSum):
            return out.total, float(out.count), logs
        return out, None, logs


def _unpack(res):
    loss, count, logs = res
    return (LossSum(loss, count) if count is not None else loss), logs


def trained_params(opt) -> List[nn.Parameter]:
    return [p for g in opt.param_groups for p in g["params"]]


# ---- backends ---------------------------------------------------------------------------------
class Local:
    """One process: the trainer calls the pipeline directly; gradients are `p.grad`."""

    name = "local"
    owns_optimizer_state = False  # True: the engine checkpoints the optimizer (not last.pt)

    def __init__(self, acc, rag):
        self.acc, self.rag = acc, rag

    def prepare(self, phase, opt, settings):
        """(model to call as model(batch, ctx) -> (loss, logs), optimizer) for the phase."""
        return self.rag, opt

    def forward(self, model, batch, ctx):
        return model(batch, ctx)

    def sync(self, model, last: bool):
        """Context of one accumulation micro-step (forward and backward)."""
        return nullcontext()

    def backward(self, loss, last: bool) -> None:
        self.acc.backward(loss)

    def grad_norms(self, opt) -> Tuple[torch.Tensor, Dict[str, float]]:
        from ragtune.trainer import grad_norms

        return grad_norms(opt)

    def scale_grads(self, opt, scale: float) -> None:
        for p in trained_params(opt):
            if p.grad is not None:
                p.grad.mul_(scale)

    def step(self, opt, clip_norm: float, norm: torch.Tensor) -> None:
        max_norm = clip_norm if clip_norm > 0 else float("inf")
        torch.nn.utils.clip_grads_with_norm_(trained_params(opt), max_norm, norm)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def gathered(self):
        return nullcontext()

    def end_phase(self) -> None:
        pass


class DDP(Local):
    """torch DDP over the phase's trained parameters only; one all-reduce per optimizer step."""

    name = "ddp"

    def prepare(self, phase, opt, settings):
        return self._wrap(PhaseModule(self.rag, phase.trains)), opt

    def _wrap(self, module: PhaseModule):
        from torch.nn.parallel import DistributedDataParallel

        ignore = [n for n, p in module.named_parameters() if not p.requires_grad]
        ignore += [n for n, _ in module.named_buffers()]  # no per-forward buffer broadcast
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, ignore)
        kw = {"device_ids": [self.acc.device.index]} if self.acc.device.type == "cuda" else {}
        # a trained part may get no gradient in some step (a branch not taken): allowed
        return DistributedDataParallel(module, find_unused_parameters=True, **kw)

    def forward(self, model, batch, ctx):
        return _unpack(model(batch, ctx))

    def sync(self, model, last: bool):
        return nullcontext() if last else model.no_sync()


class DeepSpeed(Local):
    """The phase's PhaseModule and optimizer prepared by accelerate into a DeepSpeed engine."""

    name = "deepspeed"
    owns_optimizer_state = True

    def __init__(self, acc, rag, tc):
        super().__init__(acc, rag)
        self.tc = tc
        self.engine = None
        self.stage = int(acc.state.deepspeed_plugin.deepspeed_config["zero_optimization"]["stage"])
        self._attrs: tuple = ({}, {})
        self._groups: List[Tuple[str, List[nn.Parameter]]] = []
        self._dtypes: List[Tuple[nn.Parameter, torch.dtype]] = []  # each parameter's dtype before prepare

    def prepare(self, phase, opt, settings):
        module = PhaseModule(self.rag, phase.trains)
        cfg = self.acc.state.deepspeed_plugin.deepspeed_config
        tc, world = self.tc, self.acc.num_processes
        want = {
            "train_micro_batch_size_per_gpu": tc.batch_size,
            "gradient_accumulation_steps": tc.grad_accum,
            "train_batch_size": tc.batch_size * tc.grad_accum * world,
            "gradient_clipping": float(settings["clip_norm"]),
        }
        cfg.update(want)  # deepspeed_config() checked they were "auto"
        self._groups = [(g["name"], list(g["params"])) for g in opt.param_groups]
        self._attrs = _attr_snapshot(module)
        self._dtypes = [(p, p.dtype) for p in module.parameters()]  # DeepSpeed bf16 casts the module
        self.engine, dopt = self.acc.prepare(module, opt)
        return self.engine, dopt

    def forward(self, model, batch, ctx):
        return _unpack(model(batch, ctx))

    def backward(self, loss, last: bool) -> None:
        # ragtune divides by the number of micro-batches itself (as for DDP), hence scale_wrt_gas=False
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(loss, scale_wrt_gas=False)
        if not last:
            self.engine.step()  # bookkeeping only: no update off the accumulation boundary

    def _local_grads(self, params) -> List[torch.Tensor]:
        """This rank's share of the reduced gradients (between the boundary backward and step)."""
        from deepspeed.utils import safe_get_local_grad

        out = []
        for p in params:
            if hasattr(p, "ds_id"):  # ZeRO-3
                g = safe_get_local_grad(p)
            elif getattr(p, "_hp_mapping", None) is not None:  # ZeRO-2: the fragment this rank owns
                g = p._hp_mapping.get_lp_grad_fragment(p._index_in_param_group)
            else:
                g = None  # no element of it lives on this rank
            if g is not None:
                out.append(g)
        return out

    def grad_norms(self, opt):
        sq = []
        for _, params in self._groups:
            grads = self._local_grads(params)
            sq.append(sum((g.float().pow(2).sum() for g in grads), torch.zeros((), device=self.acc.device)))
        sq = torch.stack(sq).double()
        torch.distributed.all_reduce(sq)
        per_group = {name: float(v.sqrt()) for (name, _), v in zip(self._groups, sq)}
        return sq.sum().sqrt().float(), per_group

    def scale_grads(self, opt, scale: float) -> None:
        from deepspeed.utils import safe_get_local_grad, safe_set_local_grad

        for _, params in self._groups:
            for p in params:
                if hasattr(p, "ds_id"):
                    safe_set_local_grad(p, safe_get_local_grad(p) * scale)
                elif getattr(p, "_hp_mapping", None) is not None:
                    p._hp_mapping.get_lp_grad_fragment(p._index_in_param_group).mul_(scale)

    def step(self, opt, clip_norm: float, norm: torch.Tensor) -> None:
        self.engine.step()  # clips (gradient_clipping), steps and zeroes the gradients

    @contextmanager
    def gathered(self):
        """ZeRO-3: the engine's full parameters on every rank for the duration (a collective every
        rank enters; read-only: changes are discarded), with the engine's module hooks detached, so
        module calls inside (refresh, generation, collection) fetch nothing and leave no trace in
        the call order DeepSpeed checks across ranks: the ranks may make different calls there.
        The hooks are registered again on exit (module ids renumbered from 0, the same on every
        rank; DeepSpeed drops its recorded trace and records it again). Other stages: nothing."""
        if self.engine is None or self.stage != 3:
            yield
            return
        import deepspeed

        params = list(self.engine.module.parameters())
        offload = getattr(self.engine.optimizer, "parameter_offload", self.engine.optimizer)
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            for hook in (*offload.forward_hooks, *offload.backward_hooks):
                hook.remove()
            offload.forward_hooks, offload.backward_hooks = [], []
            try:
                yield
            finally:
                offload._register_deepspeed_module(offload.module, count=[0])  # DeepSpeed >= 0.16.4

    def end_phase(self) -> None:
        """Destroy the engine; the parameters become plain full tensors again (ZeRO-3: gathered
        first), with every attribute DeepSpeed added to them and their modules removed."""
        if self.engine is None:
            return
        from deepspeed.utils import safe_get_full_fp32_param

        module = self.engine.module
        params = list(module.parameters())
        full = None
        if self.stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                full = [p.data.clone() for p in params]
        # the optimizer's float32 master weights (bf16 engines train a bf16 copy of the module):
        # they, not the bf16 module, are what the phase trained (a collective under ZeRO-3)
        in_opt = [p for _, ps in self._groups for p in ps]  # the optimizer's parameters, same order on every rank
        master = {id(p): safe_get_full_fp32_param(p) for p in in_opt}
        self.engine.destroy()
        self.acc.free_memory()  # accelerate's references to the engine, optimizer and wrapper
        if full is not None:
            for p, t in zip(params, full):
                p.data = t
        for p, dtype in self._dtypes:
            m = master.get(id(p))
            if m is not None:  # trained: the master copy, in the dtype it had (float32)
                p.data = m.detach().to(p.device, dtype).clone()
            elif p.dtype != dtype:  # frozen inside a trained component (a LoRA base): its dtype back
                p.data = p.data.to(dtype)  # (rounded to bf16 by the engine: load such a model in bf16)
        _attr_restore(module, self._attrs)
        self.engine, self._groups, self._dtypes = None, [], []

    def save(self, folder: Path, step: int) -> str:
        """The engine's state (partitioned optimizer state, one file per rank) under a new tag;
        every rank calls it. Returns the tag, which last.pt then names."""
        tag = f"step-{step}"
        self.engine.save_checkpoint(str(folder), tag=tag, client_state={}, save_latest=False)
        return tag

    def load(self, folder: Path, tag: str) -> None:
        path, _ = self.engine.load_checkpoint(
            str(folder), tag=tag, load_module_strict=True, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if path is None:
            raise RuntimeError(f"{folder / tag}: DeepSpeed could not load this engine checkpoint")


def prune_engine_checkpoints(folder: Path, keep: str) -> None:
    """Remove engine checkpoints other than `keep` (main process, after last.pt names `keep`)."""
    if folder.is_dir():
        for d in folder.iterdir():
            if d.is_dir() and d.name != keep:
                shutil.rmtree(d, ignore_errors=True)


def _attr_snapshot(module: nn.Module) -> tuple:
    return (
        {id(p): set(vars(p)) for p in module.parameters()},
        {id(m): set(vars(m)) for m in module.modules()},
    )


def _attr_restore(module: nn.Module, snap: tuple) -> None:
    params, mods = snap
    for p in module.parameters():
        for a in set(vars(p)) - params.get(id(p), set()):
            delattr(p, a)
    for m in module.modules():
        for a in set(vars(m)) - mods.get(id(m), set()):
            delattr(m, a)


def backend(acc, rag, tc) -> Local:
    """The backend of the accelerator that started (`build_accelerator` checked it)."""
    from accelerate.utils import DistributedType

    if acc.distributed_type == DistributedType.DEEPSPEED:
        return DeepSpeed(acc, rag, tc)
    return DDP(acc, rag) if acc.num_processes > 1 else Local(acc, rag)
