"""THE training loop, shared by every strategy.

Per phase declared by the strategy: freeze everything but the phase's components, build AdamW
(fused where the device supports it) with one parameter group per trained component, its
learning rate resolved per (phase, component), warmup + constant/linear/cosine schedule, then
loop: gradient accumulation -> non-finite guard (before any optimizer step, so diverged runs
never corrupt weights) -> clipping -> step -> `on_step_end` hook -> index refresh if the passage
tower trains -> the optional gradient-variance diagnostic (`ragtune.diagnostics`, every
`diagnostics.grad_variance_every` steps, leaving no trace on training) -> logging (the loss of the
step, learning rates, the total gradient norm, and each component's gradient norm before clipping
averaged over the logging window), evaluation and checkpoints (every rank's strategy state
gathered and merged by `merge_extra_states`). Checkpoints hold everything needed for an exact
resume, the log window too.

A phase may instead collect then learn (`Phase.collect`: the strategy's `collect` runs without
grad once per `Phase.updates` optimizer steps and its experience is split into micro-batches;
checkpoints fall on collection boundaries) or iterate over strategy-built examples
(`Phase.examples`: `build_examples` once at the phase start, with a resumable sampler of its own).

Several processes (`ragtune.distributed`): only the phase's trained components are wrapped (DDP,
or a DeepSpeed ZeRO-2/3 engine), accumulation micro-steps skip the all-reduce, each rank draws
from its own seed (its RNG state is checkpointed per rank), logged step values are means over
ranks (the global batch), the corpus embedding of the initial index and of every refresh is
sharded over the ranks and gathered (charged once for the logical work), so is dev evaluation
(`evaluate(sharded=True)`: batch j on rank j % W, the one-process result on every rank), and the
other ranks wait for the main process's writes at a barrier with its own long timeout.

Hook order (the contract in `ragtune.strategy`): setup (in `run.build_pipeline`) -> restore ->
`on_phase_start(rag, ctx, resumed)` -> per step `loss` ... `on_step_end(rag, ctx)`.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from ragtune import distributed, fileio, rundir
from ragtune.checkpoint import Checkpointer, merged_extra_state, prefix, rng_state, saved_components, set_rng_state
from ragtune.config import ConfigError
from ragtune.diagnostics import gradient_variance, metrics_row
from ragtune.evaluate import evaluate
from ragtune.sampler import BatchSampler
from ragtune.strategy import OPTIM_KEYS, LossSum, Phase, StepContext, Strategy

ENGINE_DIR = "engine"  # DeepSpeed engine checkpoints, inside the checkpoints folder


class Diverged(RuntimeError):
    """Raised when a loss, gradient or updated weight is not finite; nothing non-finite is saved."""


def lr_lambda(schedule: str, warmup: int, total: int):
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return f


def phase_plan(phases: List[Phase], total: int, only: str = "") -> List[tuple]:
    """[(index, phase, n_steps)]: fractions of the budget, the remainder to the last phase."""
    plan, used = [], 0
    for i, p in enumerate(phases):
        n = total - used if i == len(phases) - 1 else int(round(p.fraction * total))
        plan.append((i, p, n))
        used += n
    if only:
        names = [p.name for p in phases]
        if only not in names:
            raise ConfigError(
                f"config key 'train.only_phase': '{only}' is not a phase of this strategy ({', '.join(names)})"
            )
        plan = [t for t in plan if t[1].name == only]
    return plan


def phase_settings(tc, strategy, phase: Phase) -> dict:
    """Optimiser settings of a phase: `train.phase.<name>.*` > the strategy's phase default >
    `train.*`; learning rates per trained component, a part falling back to its family's rate."""
    over = tc.phase.get(phase.name) if phase.name in tc.phase else None
    out = {}
    for key in OPTIM_KEYS:
        val = getattr(over, key) if over is not None else None
        if val is None:
            val = phase.optim.get(key, tc[key])
        out[key] = list(val) if key == "betas" else val

    def lr(comp: str) -> float:
        for table in ((over.lr if over is not None else {}), phase.optim.get("lr", {}), tc.lr):
            if comp in table:
                return float(table[comp])
        return lr(strategy.lr_family(comp))

    out["lr"] = {c: lr(c) for c in sorted(phase.trains)}
    return out


def adamw(groups: List[dict], s: dict, impl: str) -> torch.optim.Optimizer:
    """AdamW; `auto` = the fused kernel where the device has one (CUDA, CPU), else foreach."""
    kw = {"betas": tuple(s["betas"]), "eps": s["eps"], "weight_decay": s["weight_decay"]}
    if impl == "auto":
        dev = groups[0]["params"][0].device.type
        impl = "fused" if dev in ("cuda", "cpu") else "foreach"
    if impl == "fused":
        kw["fused"] = True
    elif impl == "foreach":
        kw["foreach"] = True
    else:
        kw["foreach"] = False
    return torch.optim.AdamW(groups, **kw)


def grad_norms(opt) -> Tuple[torch.Tensor, Dict[str, float]]:
    """(total L2 norm of all gradients, {group name: its L2 norm}), from one pass of per-tensor
    norms: the same kernel and order `clip_grad_norm_` uses, so the total (and the clipping) is
    bitwise what it was, and the per-component norms cost nothing extra."""
    grads, bounds = [], []
    for g in opt.param_groups:
        gs = [p.grad for p in g["params"] if p.grad is not None]
        bounds.append((g["name"], len(grads), len(grads) + len(gs)))
        grads += gs
    if not grads:
        return torch.tensor(0.0), {name: 0.0 for name, _, _ in bounds}
    per_tensor = torch._foreach_norm(grads, 2)  # what torch.nn.utils.get_total_norm computes
    total = torch.linalg.vector_norm(torch.stack(per_tensor), 2)
    per_group = {
        name: float(torch.linalg.vector_norm(torch.stack(per_tensor[a:b]), 2)) if b > a else 0.0
        for name, a, b in bounds
    }
    return total, per_group


class Trainer:
    def __init__(self, cfg, rag, train_qs, dev_qs, run_dir: Path, accelerator):
        self.cfg, self.rag, self.tc = cfg, rag, cfg.train
        self.strategy = rag.strategy
        self.dev_qs = dev_qs
        self.run_dir = Path(run_dir)
        self.acc = accelerator
        self.sampler = BatchSampler(
            len(train_qs), self.tc.batch_size, self.tc.seed, accelerator.process_index, accelerator.num_processes
        )
        self.train_qs = train_qs
        self.plan = phase_plan(self.strategy.phases(), self.tc.steps, self.tc.only_phase)
        self.components = saved_components(self.strategy)
        self.ckpt = Checkpointer(rundir.checkpoints_dir(self.run_dir), self.components)
        self.step = 0
        self.norm_window: Dict[str, Tuple[float, int]] = {}  # grad_norm/<component> -> (sum, steps)
        self.metrics_path = rundir.metrics_path(self.run_dir)
        self.tb = None
        self.dist = distributed.backend(accelerator, rag, self.tc)
        self.model = rag  # per phase: what the backend wraps (`prepare`)
        if self.dist.owns_optimizer_state and cfg.diagnostics.grad_variance_every:
            raise ConfigError(
                "config key 'diagnostics.grad_variance_every': its backward would run through DeepSpeed's "
                "gradient hooks (train.distributed=deepspeed); set it to 0"
            )
        replayless = [p.name for _, p, n in self.plan if n and (p.collect or p.examples)]
        if replayless and cfg.diagnostics.grad_variance_every:  # refused before any phase trains
            raise ConfigError(
                f"config key 'diagnostics.grad_variance_every': phase '{replayless[0]}' of "
                f"'{self.strategy.name}' trains on collected experience or built examples, which the "
                "gradient-variance diagnostic (fixed question batches) cannot replay; set it to 0"
            )
        distributed.seed_rank(self.tc.seed, accelerator.process_index)  # after every rank built the same models

    # ---- setup per phase --------------------------------------------------------------------
    def _doc_side_trains(self, trains) -> bool:
        return "doc_encoder" in trains or (self.rag.retriever.shared and "query_encoder" in trains)

    def _start_phase(self, phase: Phase, n_steps: int):
        """requires_grad, optimizer and schedule of a phase: only its declared-trainable parameters."""
        groups = self.rag.component_params()
        for p in self.rag.parameters():
            p.requires_grad_(False)
        s = phase_settings(self.tc, self.strategy, phase)
        param_groups = []
        for comp in sorted(phase.trains):
            params = groups[comp]
            if params:
                for p in params:
                    p.requires_grad_(True)
                param_groups.append({"params": params, "lr": s["lr"][comp], "name": comp})
        self.rag.doc_trained = self._doc_side_trains(phase.trains)
        if not param_groups:
            return None, None, s
        opt = adamw(param_groups, s, self.tc.adamw_impl)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(s["schedule"], s["warmup_steps"], n_steps))
        return opt, sched, s

    def _ctx(self, phase: Optional[Phase], phase_step: int, n_steps: int, opt) -> StepContext:
        lrs = {g["name"]: g["lr"] for g in opt.param_groups} if opt is not None else {}
        return StepContext(phase, self.step, phase_step, n_steps, lrs, self.tc.k)

    # ---- main loop ----------------------------------------------------------------------------
    def fit(self) -> None:
        """Run (or resume) every planned phase. Raises Diverged on a non-finite loss/gradient/weight."""
        state = self.ckpt.load_latest()
        start_phase, phase_step = self.plan[0][0] if self.plan else 0, 0
        if state is not None:
            start_phase, phase_step = state["phase_idx"], state["phase_step"]
            self.step = state["step"]
            self.ckpt.restore(state, self.rag, self.sampler)
            self._restore_rank_rng(state)
            self.norm_window = dict((state.get("trainer") or {}).get("norm_window", {}))
            if not self.acc.is_main_process:  # the checkpointed ledger is the merged total: count it once
                self._reset_ledger()
        if self.acc.is_main_process:  # also drops the lines of an attempt killed before its first checkpoint
            self._truncate_metrics(self.step)
        if self.tc.tensorboard and self.acc.is_main_process:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(self.run_dir / rundir.TENSORBOARD)
        for pi, phase, n_steps in self.plan:
            if pi < start_phase:
                continue
            first = phase_step if pi == start_phase else 0
            opt, sched, settings = self._start_phase(phase, n_steps)
            resumed = state is not None and pi == start_phase and first > 0
            engine_tag = ((state or {}).get("trainer") or {}).get("engine") if resumed else None
            if resumed and opt is not None:
                if bool(engine_tag) != self.dist.owns_optimizer_state:  # the optimizer state is elsewhere
                    where = "a DeepSpeed engine checkpoint" if engine_tag else "last.pt (no DeepSpeed engine)"
                    raise RuntimeError(
                        f"{self.ckpt.latest}: its optimizer state is in {where}; resume it with the "
                        "train.distributed that wrote it"
                    )
                if not self.dist.owns_optimizer_state:
                    opt.load_state_dict(state["opt"])
                sched.load_state_dict(state["sched"])
            self.strategy.on_phase_start(self.rag, self._ctx(phase, first, n_steps, opt), resumed)
            if opt is not None:
                # wrapped after on_phase_start: DDP broadcasts what the hook initialised from rank 0
                self.model, opt = self.dist.prepare(phase, opt, settings)
                try:
                    if resumed and self.dist.owns_optimizer_state:
                        self.dist.load(self.ckpt.folder / ENGINE_DIR, engine_tag)
                    self._run_phase(pi, phase, n_steps, first, opt, sched, settings, state if resumed else None)
                finally:
                    self.dist.end_phase()
                    self.model = self.rag
            self.rag.doc_trained = False
        self.sync_ledger()
        if self.tb:
            self.tb.close()

    def _run_phase(self, pi, phase, n_steps, first, opt, sched, settings, state=None):
        from tqdm.auto import tqdm

        bar = tqdm(
            total=n_steps,
            initial=first,
            desc=f"{self.strategy.name}:{phase.name}",
            disable=not (self.tc.progress and self.acc.is_main_process),
            leave=False,
        )
        items, sampler = self._phase_data(phase, first, state)
        if phase.collect and first % phase.updates:
            raise RuntimeError(f"checkpoint at phase step {first} is not on a collection boundary of '{phase.name}'")
        self.rag.set_modes(phase.trains)
        experience: List[list] = []
        collect_logs: Dict[str, float] = {}  # logged on every step that learns from the collection
        save_due = False
        for ps in range(first, n_steps):
            ctx = self._ctx(phase, ps, n_steps, opt)
            if phase.collect:
                j = ps % phase.updates
                if j == 0:
                    experience, collect_logs = self._collect(phase, ctx, min(phase.updates, n_steps - ps))
                micro = experience[j * self.tc.grad_accum : (j + 1) * self.tc.grad_accum]
            else:
                micro = [[items[i] for i in sampler.next()] for _ in range(self.tc.grad_accum)]
            logs = self._train_step(opt, sched, ctx, settings["clip_norm"], micro)
            logs.update(collect_logs)
            self._add_to_window(logs)
            self.step += 1
            with self._gathered_for("on_step_end"):
                self.strategy.on_step_end(self.rag, self._ctx(phase, ps + 1, n_steps, opt))
            bar.update(1)
            last = ps == n_steps - 1
            # the phase-end refresh happens before the phase-end checkpoint, so a run resumed from
            # that checkpoint does not skip it (and keeps the refreshed index)
            refresh = self.cfg.index.refresh_every
            if self.rag.doc_trained and (last or (refresh and self.step % refresh == 0)):
                self._refresh()
            diag = self._grad_variance(self._ctx(phase, ps + 1, n_steps, opt))
            if self.step % max(1, self.tc.log_every) == 0 or last:
                logs.update(self._window_means())
                logs.update({"step": self.step, "phase": phase.name, **diag})
                logs.update({f"lr/{g['name']}": g["lr"] for g in opt.param_groups})
                self._log(logs)
                bar.set_postfix(loss=f"{logs['loss']:.3f}")
            elif diag:
                self._log({"step": self.step, "phase": phase.name, **diag})
            if self.tc.eval_every and self.step % self.tc.eval_every == 0:
                self._eval_dev(phase)
            # checkpoints fall on collection boundaries (experience is never saved): one due inside
            # a collection is written at its end
            save_due = save_due or bool(self.tc.save_every and self.step % self.tc.save_every == 0)
            boundary = not phase.collect or (ps + 1) % phase.updates == 0
            if (save_due and boundary) or last:
                save_due = False
                self._save(pi, ps, last, opt, sched, sampler if items is not self.train_qs else None)
            stop = self.cfg.debug.stop_after
            if stop and self.step >= stop:
                raise KeyboardInterrupt(f"debug.stop_after={stop} reached")
            if self.cfg.debug.step_sleep:
                time.sleep(self.cfg.debug.step_sleep)
        bar.close()

    def _save(self, pi, ps, last, opt, sched, example_sampler) -> None:
        """last.pt (main process). Collectives first, on every rank: the finite check (agreed over
        ranks), the ledger and strategy state, every rank's RNG state and, under DeepSpeed, the
        engine's own checkpoint (partitioned optimizer state) under a new tag that last.pt names."""
        with self.dist.gathered():
            distributed.all_agree(self.acc, lambda: self.check_finite_weights(opt))
        self.sync_ledger()
        extra = merged_extra_state(self.strategy)  # a collective: every rank, before the main-only write
        trainer = {"norm_window": dict(self.norm_window), "rank_rng": self.rag.gather(rng_state())}
        if example_sampler is not None and not last:
            trainer["example_sampler"] = example_sampler.state_dict()
        engine_dir = self.ckpt.folder / ENGINE_DIR
        if self.dist.owns_optimizer_state:
            trainer["engine"] = self.dist.save(engine_dir, self.step)
        with self.dist.gathered():
            if self.acc.is_main_process:
                self.ckpt.save(
                    self.rag,
                    self.sampler,
                    None if self.dist.owns_optimizer_state else opt,
                    sched,
                    step=self.step,
                    phase_idx=pi + 1 if last else pi,
                    phase_step=0 if last else ps + 1,
                    trainer=trainer,
                    strategy_extra=extra,
                )
                if self.dist.owns_optimizer_state:
                    distributed.prune_engine_checkpoints(engine_dir, keep=trainer["engine"])
            distributed.wait_for_main(self.acc)

    def _restore_rank_rng(self, state: dict) -> None:
        """Each rank's own RNG state from the checkpoint (restore set rank 0's on all); resumed
        with another number of ranks, ranks > 0 are reseeded from the run's seed and the step."""
        saved = (state.get("trainer") or {}).get("rank_rng")
        rank = self.acc.process_index
        if saved and len(saved) == self.acc.num_processes:
            set_rng_state(saved[rank])
        elif rank:
            distributed.seed_rank(self.tc.seed + self.step, rank)

    def _gathered_for(self, hook: str):
        """ZeRO-3 parameters gathered around a strategy hook, when the strategy overrides it."""
        overridden = getattr(type(self.strategy), hook) is not getattr(Strategy, hook)
        return self.dist.gathered() if overridden else contextlib.nullcontext()

    def _phase_data(self, phase: Phase, first: int, state: Optional[dict]):
        """(items, sampler) a phase draws its batches from: the training questions and the run's
        question sampler, or the strategy's examples (built now, deterministic) with a sampler of
        their own, restored from the checkpoint when the run resumes inside the phase. The rebuild
        on resume is not charged again: the checkpointed ledger already holds its cost."""
        if not phase.examples:
            return self.train_qs, self.sampler
        resumed = first > 0
        saved = self.rag.ledger.state_dict() if resumed else None
        with self.rag.ledger.wall("train"), self.dist.gathered(), self.rag.scoring():
            items = list(self.strategy.build_examples(phase, self.train_qs, self.rag))
        if saved is not None:
            self.rag.ledger.load_state_dict(saved)
        if not items:
            raise ValueError(f"strategy '{self.strategy.name}' built no examples for phase '{phase.name}'")
        sampler = BatchSampler(
            len(items), self.tc.batch_size, self.tc.seed, self.acc.process_index, self.acc.num_processes
        )
        if resumed:
            sampler.load_state_dict(((state or {}).get("trainer") or {})["example_sampler"])
        return items, sampler

    def _collect(self, phase: Phase, ctx: StepContext, updates: int) -> Tuple[List[list], Dict[str, float]]:
        """One collection: `grad_accum` question batches -> the strategy's experience, no grad and
        dropout off, split into `updates * grad_accum` contiguous micro-batches; its logs averaged
        over the ranks like the step's."""
        accum = self.tc.grad_accum
        batch = [self.train_qs[j] for _ in range(accum) for j in self.sampler.next()]
        with self.rag.ledger.wall("train"), self.dist.gathered(), self.acc.autocast(), self.rag.scoring():
            items, logs = self.strategy.collect(batch, self.rag, ctx)
        items = list(items)
        n = updates * accum
        if len(items) < n:
            raise ValueError(
                f"strategy '{self.strategy.name}' collected {len(items)} items for {n} micro-batches "
                f"(phase '{phase.name}': updates={phase.updates} x train.grad_accum={accum})"
            )
        bounds = [round(i * len(items) / n) for i in range(n + 1)]
        self.rag.set_modes(phase.trains)
        logs = self._rank_mean({f"collect/{k}": float(v) for k, v in logs.items()})  # the global batch's
        return [items[bounds[i] : bounds[i + 1]] for i in range(n)], logs

    def _train_step(self, opt, sched, ctx: StepContext, clip_norm: float, micro: List[list]) -> Dict[str, float]:
        """One optimizer step over the micro-batches `micro` (`grad_accum` of them).

        A tensor loss is averaged over micro-batches (and ranks, by the gradient all-reduce). A
        `LossSum` is summed and the gradients divided by the total count over micro-batches and
        ranks afterwards (gradients are linear in the loss), so accumulation equals one batch.
        """
        accum = len(micro)
        totals: Dict[str, float] = {}
        sums: List[Tuple[float, float]] = []  # (loss total, count) of LossSum micro-batches
        with self.rag.ledger.wall("train"):
            for i, batch in enumerate(micro):
                last = i == accum - 1
                with self.dist.sync(self.model, last):  # DDP: no all-reduce before the last micro-step
                    with self.acc.autocast():
                        out, logs = self.dist.forward(self.model, batch, ctx)
                    is_sum = isinstance(out, LossSum)
                    if i and is_sum != bool(sums):
                        raise TypeError(f"strategy '{self.strategy.name}' mixed LossSum and tensor losses in one step")
                    loss = out.total if is_sum else out
                    # several processes: a NaN on one rank reaches every rank through the gradient
                    # all-reduce and is caught by the norm check below on all of them at once
                    if self.acc.num_processes == 1 and not torch.isfinite(loss.detach()):
                        raise Diverged(f"non-finite loss ({loss.item()}) at step {self.step + 1}")
                    self.dist.backward(loss if is_sum else loss / accum, last)
                if is_sum:
                    sums.append((loss.item(), float(out.count)))
                else:
                    logs = {"loss": loss.item(), **logs}
                for k, v in logs.items():
                    totals[k] = totals.get(k, 0.0) + float(v) / accum
            totals = self._rank_mean(totals)
            if sums:
                totals["loss"] = self._normalise(opt, sums)
            norm, per_group = self.dist.grad_norms(opt)  # before clipping
            totals.update({f"grad_norm/{name}": v for name, v in per_group.items()})
            if not torch.isfinite(norm):
                raise Diverged(f"non-finite gradient norm at step {self.step + 1}")
            self.dist.step(opt, clip_norm, norm)
            sched.step()
        self.rag.ledger.sample_memory()
        totals["grad_norm"] = float(norm)
        return totals

    def _rank_mean(self, totals: Dict[str, float]) -> Dict[str, float]:
        """Several processes: each logged value averaged over the ranks that reported it (the
        global batch's value: every rank draws the same number of questions); as is otherwise."""
        if self.acc.num_processes == 1:
            return totals
        out: Dict[str, List[float]] = {}
        for rank_totals in self.rag.gather(totals):
            for k, v in rank_totals.items():
                out.setdefault(k, []).append(v)
        return {k: sum(vs) / len(vs) for k, vs in out.items()}

    def _grad_variance(self, ctx: StepContext) -> Dict[str, float]:
        """Every `diagnostics.grad_variance_every` steps: the gradient-variance diagnostic on the
        first `grad_variance_batches` batches of the training questions, in file order (the same
        questions every time), as metrics.jsonl keys; {} otherwise. It restores RNG, gradients,
        modes, strategy state and ledger, so training is bit-identical with it on or off. With
        several processes every rank computes it on the same batches without any collective (its
        backward bypasses the DDP wrapper, so gradients stay local) and the main process logs it."""
        dc = self.cfg.diagnostics
        if not dc.grad_variance_every or self.step % dc.grad_variance_every:
            return {}
        bs = self.tc.batch_size
        qs = self.train_qs[: bs * dc.grad_variance_batches]
        batches = [qs[i : i + bs] for i in range(0, len(qs), bs)]
        res = gradient_variance(self.rag, batches, ctx, dc.grad_variance_draws, autocast=self.acc.autocast)
        return metrics_row(res)

    def _add_to_window(self, logs: Dict[str, float]) -> None:
        """Accumulate the per-component gradient norms of a step until the next log line."""
        for k, v in logs.items():
            if k.startswith("grad_norm/"):
                total, n = self.norm_window.get(k, (0.0, 0))
                self.norm_window[k] = (total + v, n + 1)

    def _window_means(self) -> Dict[str, float]:
        """The per-component gradient norms averaged over the steps since the last log line."""
        out = {k: total / n for k, (total, n) in self.norm_window.items() if n}
        self.norm_window = {}
        return out

    def _normalise(self, opt, sums: List[Tuple[float, float]]) -> float:
        """Divide summed gradients by the total count over micro-batches and ranks; the loss value."""
        stats = torch.tensor([sum(t for t, _ in sums), sum(c for _, c in sums)], dtype=torch.float64)
        if self.acc.num_processes > 1:
            stats = self.acc.reduce(stats.to(self.acc.device), reduction="sum").cpu()
        total, count = float(stats[0]), float(stats[1])
        if count <= 0:
            raise ValueError(f"strategy '{self.strategy.name}' returned a LossSum with count {count}")
        # the all-reduce averaged gradients over ranks; undo that and divide by the count instead
        self.dist.scale_grads(opt, self.acc.num_processes / count)
        return total / count

    def check_finite_weights(self, opt) -> None:
        """Before anything is saved: raise Diverged naming the first non-finite weight of a trained
        or owned component, or the first non-finite optimizer state (nothing non-finite is saved)."""
        prefixes = tuple(prefix(c) for c in self.components)
        for name, t in self.rag.state_dict().items():
            if name.startswith(prefixes) and t.is_floating_point() and not torch.isfinite(t).all():
                raise Diverged(f"non-finite weight '{name}' after step {self.step}")
        for g in opt.param_groups:
            for i, p in enumerate(g["params"]):
                for key, t in opt.state.get(p, {}).items():
                    if torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all():
                        raise Diverged(
                            f"non-finite optimizer state '{key}' of {g['name']} parameter {i} after step {self.step}"
                        )

    def sync_ledger(self) -> None:
        """Several processes: fold every rank's charges into the main rank's ledger, then reset the
        others, so the main ledger (the one checkpointed and reported) always holds the total."""
        if self.acc.num_processes == 1:
            return
        from accelerate.utils import gather_object

        states = gather_object([self.rag.ledger.state_dict()])
        if self.acc.is_main_process:
            for st in states[1:]:
                other = type(self.rag.ledger)()
                other.load_state_dict(st)
                self.rag.ledger.merge(other, concurrent=True)
        else:
            self._reset_ledger()

    def _reset_ledger(self) -> None:
        self.rag.ledger.load_state_dict(type(self.rag.ledger)(self.rag.ledger.device_name).state_dict())

    def _refresh(self):
        """Re-embed the corpus into the index every rank searches. Several processes: sharded
        (`RAGPipeline.refresh_index`: each rank embeds its share of the batches, the rows are
        gathered, every rank builds the same full index) and each rank charges only its share, so
        `sync_ledger`'s merge counts the refresh once. ZeRO-3: under `gathered()`, whose full
        parameters and detached hooks let the ranks run different numbers of passage-tower forwards."""
        with self.rag.ledger.wall("index"), self.dist.gathered():
            self.rag.refresh_index(self.cfg.index.batch_size)

    def _eval_dev(self, phase):
        """Dev evaluation sharded over the ranks (`evaluate(sharded=True)`: each rank predicts its
        share of the batches, every rank gets the one-process result, each charges its share;
        ZeRO-3: parameters gathered); the main process logs it."""
        ec = self.cfg.eval
        with self.dist.gathered(), self.rag.ledger.wall("eval"), self.acc.autocast():  # the training precision
            res = evaluate(
                self.rag,
                self.dev_qs,
                ec.k or self.tc.k,
                list(ec.recall_k),
                ec.batch_size,
                step=self.step,
                decoder=ec.decoder,
                beams=ec.beams,
                sharded=True,
            )
        self._log(
            {
                "step": self.step,
                "phase": phase.name,
                **{f"dev/{k}": v for k, v in res.items() if isinstance(v, (int, float))},
            }
        )
        self.rag.set_modes(phase.trains)

    def _log(self, row: Dict[str, object]) -> None:
        if not self.acc.is_main_process:
            return
        row = {"time": round(time.time(), 3), **row}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k not in ("step", "time"):
                    self.tb.add_scalar(k, v, int(row["step"]))

    def _truncate_metrics(self, step: int) -> None:
        """On resume, drop log lines written after the checkpoint we restart from."""
        if not self.metrics_path.exists():
            return
        keep, torn = [], 0
        for ln in self.metrics_path.read_text(errors="replace").splitlines():
            try:
                row = json.loads(ln) if ln.strip() else None
            except ValueError:  # a line torn by a kill: dropped, and said
                torn += 1
                continue
            if isinstance(row, dict) and row.get("step", 0) <= step:
                keep.append(ln)
        if torn:
            print(f"{self.metrics_path}: dropped {torn} torn line(s) written by an interrupted run", flush=True)
        fileio.write_text(self.metrics_path, "".join(ln + "\n" for ln in keep))
