"""THE training loop, shared by every strategy.

Per phase declared by the strategy: freeze everything but the phase's components, build AdamW
with one learning rate per component, warmup + constant/linear/cosine schedule, then loop:
gradient accumulation -> non-finite guard (before any optimizer step, so diverged runs never
corrupt weights) -> clipping -> step -> index refresh if the passage tower trains -> logging,
evaluation and checkpoints. Checkpoints hold everything needed for an exact resume.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Dict, List

import torch

from ragtune.checkpoint import Checkpointer
from ragtune.config import ConfigError
from ragtune.evaluate import evaluate
from ragtune.sampler import BatchSampler
from ragtune.strategy import Phase


class Diverged(RuntimeError):
    """Raised when a loss or gradient is not finite; the step is not applied."""


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
    """[(phase, n_steps)]: fractions of the budget, the remainder to the last phase."""
    plan, used = [], 0
    for i, p in enumerate(phases):
        n = total - used if i == len(phases) - 1 else int(round(p.fraction * total))
        plan.append((p, n))
        used += n
    if only:
        names = [p.name for p in phases]
        if only not in names:
            raise ConfigError(f"config key 'train.only_phase': '{only}' is not a phase of this strategy ({', '.join(names)})")
        plan = [(p, n) for p, n in plan if p.name == only]
    return plan


class Trainer:
    def __init__(self, cfg, m, train_qs, dev_qs, run_dir: Path, accelerator):
        self.cfg, self.m, self.tc = cfg, m, cfg.train
        self.dev_qs = dev_qs
        self.run_dir = Path(run_dir)
        self.acc = accelerator
        self.sampler = BatchSampler(len(train_qs), self.tc.batch_size, self.tc.seed,
                                    accelerator.process_index, accelerator.num_processes)
        self.train_qs = train_qs
        self.plan = phase_plan(m.strategy.phases(), self.tc.steps, self.tc.only_phase)
        self.components = sorted({c for p in m.strategy.phases() for c in p.trains} | {"strategy"})
        self.ckpt = Checkpointer(self.run_dir / "checkpoints", self.components)
        self.step = 0
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.tb = None
        self.model = accelerator.prepare_model(m) if accelerator.num_processes > 1 else m

    # ---- setup per phase --------------------------------------------------------------------
    def _doc_side_trains(self, trains) -> bool:
        return "doc_encoder" in trains or (self.m.retriever.shared and "query_encoder" in trains)

    def _start_phase(self, phase: Phase, n_steps: int):
        groups = self.m.component_params()
        for p in self.m.parameters():
            p.requires_grad_(False)
        param_groups = []
        for comp, params in groups.items():
            if comp in phase.trains and params:
                for p in params:
                    p.requires_grad_(True)
                param_groups.append({"params": params, "lr": float(self.tc.lr[comp]), "name": comp})
        self.m.doc_trained = self._doc_side_trains(phase.trains)
        self.m.strategy.on_phase_start(phase, self.m)
        opt = torch.optim.AdamW(param_groups, weight_decay=self.tc.weight_decay) if param_groups else None
        sched = (torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(self.tc.schedule, self.tc.warmup_steps, n_steps))
                 if opt else None)
        return opt, sched

    # ---- main loop ----------------------------------------------------------------------------
    def fit(self) -> None:
        """Run (or resume) every planned phase. Raises Diverged on a non-finite loss/gradient."""
        state = self.ckpt.load_latest()
        start_phase, phase_step = 0, 0
        if state is not None:
            start_phase, phase_step = state["phase_idx"], state["phase_step"]
            self.step = state["step"]
            self.ckpt.restore(state, self.m, self.sampler)
            if not self.acc.is_main_process:  # the checkpointed ledger is the merged total: count it once
                from ragtune.cost import Ledger

                self.m.ledger.load_state_dict(Ledger(self.m.ledger.device_name).state_dict())
        if self.acc.is_main_process:  # also drops the lines of an attempt killed before its first checkpoint
            self._truncate_metrics(self.step)
        if self.tc.tensorboard and self.acc.is_main_process:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(self.run_dir / "tb")
        for pi in range(start_phase, len(self.plan)):
            phase, n_steps = self.plan[pi]
            opt, sched = self._start_phase(phase, n_steps)
            if state is not None and pi == start_phase and phase_step > 0 and opt is not None:
                opt.load_state_dict(state["opt"])
                sched.load_state_dict(state["sched"])
            if opt is None:
                continue
            self._run_phase(pi, phase, n_steps, phase_step if pi == start_phase else 0, opt, sched)
            phase_step = 0
            self.m.doc_trained = False
        self._sync_ledger()
        if self.tb:
            self.tb.close()

    def _run_phase(self, pi, phase, n_steps, first, opt, sched):
        from tqdm.auto import tqdm

        bar = tqdm(total=n_steps, initial=first, desc=f"{self.m.strategy.name}:{phase.name}",
                   disable=not (self.tc.progress and self.acc.is_main_process), leave=False)
        self.m.set_modes(phase.trains)
        for ps in range(first, n_steps):
            logs = self._train_step(opt, sched, phase)
            self.step += 1
            bar.update(1)
            last = ps == n_steps - 1
            # the phase-end refresh happens before the phase-end checkpoint, so a run resumed from
            # that checkpoint does not skip it (and keeps the refreshed index)
            if self.m.doc_trained and (last or (self.cfg.index.refresh_every
                                                and self.step % self.cfg.index.refresh_every == 0)):
                self._refresh()
            if self.step % max(1, self.tc.log_every) == 0 or ps == n_steps - 1:
                logs.update({"step": self.step, "phase": phase.name})
                logs.update({f"lr/{g['name']}": g["lr"] for g in opt.param_groups})
                self._log(logs)
                bar.set_postfix(loss=f"{logs['loss']:.3f}")
            if self.tc.eval_every and self.step % self.tc.eval_every == 0:
                self._eval_dev(phase)
            if (self.tc.save_every and self.step % self.tc.save_every == 0) or last:
                self._sync_ledger()
                if self.acc.is_main_process:
                    self.ckpt.save(self.m, self.sampler, opt, sched, step=self.step,
                                   phase_idx=pi + 1 if last else pi, phase_step=0 if last else ps + 1)
                self.acc.wait_for_everyone()
            if self.tc.stop_after and self.step >= self.tc.stop_after:
                raise KeyboardInterrupt(f"train.stop_after={self.tc.stop_after} reached")
        bar.close()

    def _train_step(self, opt, sched, phase) -> Dict[str, float]:
        accum = self.tc.grad_accum
        totals: Dict[str, float] = {}
        with self.m.ledger.wall("train"):
            for _ in range(accum):
                batch = [self.train_qs[i] for i in self.sampler.next()]
                with self.acc.autocast():
                    loss, logs = self.model(batch, self.step)
                # several processes: a NaN on one rank reaches every rank through the gradient
                # all-reduce and is caught by the norm check below on all of them at once
                if self.acc.num_processes == 1 and not torch.isfinite(loss.detach()):
                    raise Diverged(f"non-finite loss ({loss.item()}) at step {self.step + 1}")
                self.acc.backward(loss / accum)
                logs = {"loss": loss.item(), **logs}
                for k, v in logs.items():
                    totals[k] = totals.get(k, 0.0) + float(v) / accum
            params = [p for g in opt.param_groups for p in g["params"]]
            max_norm = self.tc.clip_norm if self.tc.clip_norm > 0 else float("inf")
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            if not torch.isfinite(norm):
                raise Diverged(f"non-finite gradient norm at step {self.step + 1}")
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        self.m.ledger.sample_memory()
        totals["grad_norm"] = float(norm)
        return totals

    def _sync_ledger(self) -> None:
        """Several processes: fold every rank's charges into the main rank's ledger, then reset the
        others, so the main ledger (the one checkpointed and reported) always holds the total."""
        if self.acc.num_processes == 1:
            return
        from accelerate.utils import gather_object

        from ragtune.cost import Ledger

        states = gather_object([self.m.ledger.state_dict()])
        if self.acc.is_main_process:
            for st in states[1:]:
                other = Ledger()
                other.load_state_dict(st)
                self.m.ledger.merge(other, concurrent=True)
        else:
            self.m.ledger.load_state_dict(Ledger(self.m.ledger.device_name).state_dict())

    def _refresh(self):
        with self.m.ledger.wall("index"):
            self.m.refresh_index(self.cfg.index.batch_size)

    def _eval_dev(self, phase):
        if not self.acc.is_main_process:  # one evaluation per run, not one per rank
            return
        ec = self.cfg.eval
        with self.m.ledger.wall("eval"):
            res = evaluate(self.m, self.dev_qs, ec.k or self.tc.k, list(ec.recall_k), ec.batch_size)
        self._log({"step": self.step, "phase": phase.name,
                   **{f"dev/{k}": v for k, v in res.items() if isinstance(v, (int, float))}})
        self.m.set_modes(phase.trains)

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
        keep = [l for l in self.metrics_path.read_text().splitlines() if l and json.loads(l).get("step", 0) <= step]
        self.metrics_path.write_text("".join(l + "\n" for l in keep))
