"""The strategy contract: a strategy is only the math that turns a batch into a loss.

A strategy is constructed from its options alone (no config, no models), so `ragtune list` and
the grid planner can build it cheaply. It *declares*:
- `phases()`: each phase names the components it trains (built-in ones or trainable parts the
  strategy owns), its share of the step budget and optional optimiser defaults;
- `parts()`: the modules it owns (a posterior tower, target towers, a reference model), each
  trainable (with the learning-rate family it shares, e.g. "like query_encoder") or frozen;
- `needs_labels`, and `reports`: the per-question numeric metrics its `predict` returns.
The core derives the rest from the declaration: requires_grad, optimizer groups (only
declared-trainable parameters ever reach an optimizer), index refreshes when the passage tower
trains, what `ragtune list` prints, which grid axes the runner searches, what the ledger charges
under which component name.

Lifecycle, in this order (the trainer guarantees it; see `ragtune.trainer`):
  __init__(options) -> setup(rag) [builds owned parts, before any weights, `train.init_from` or
  checkpoint are loaded] -> restore -> on_phase_start(rag, ctx, resumed) -> per step
  loss(batch, rag, ctx) and, after each optimizer step, on_step_end(rag, ctx) -> predict(batch,
  rag, ctx) at evaluation. A resumed run never re-initialises what the checkpoint restored
  (`resumed` is True when the phase continues from a checkpoint). `extra_state()` /
  `load_extra_state()` carry non-parameter state (a sample cache) through checkpoints.

Two optional phase modes (declared on the `Phase`): `collect=True` (collect-then-learn: the
trainer calls `collect(batch, rag, ctx)` without grad once per `updates` optimizer steps and feeds
`loss` micro-batches of the experience) and `examples=True` (the phase iterates over
`build_examples(phase, questions, rag)` instead of the training questions).

`loss` returns `(loss, logs)`: `loss` is a scalar tensor (the trainer averages it over
gradient-accumulation micro-batches and ranks) or a `LossSum(total, count)` (the trainer divides
the summed totals by the total count over micro-batches and ranks, so accumulation equals one
large batch exactly); `logs` is a dict of floats.

The pipeline API a strategy may use (`rag`, a `ragtune.pipeline.RAGPipeline`); everything else on
the pipeline is private:
  rag.retrieve(questions, k) -> Retrieval        top-k, scores differentiable w.r.t. the towers
  rag.retrieve_and_read(batch, k)                 Retrieval + answer token log-probs (B, K, T)
  rag.make_retrieval(q, rows) -> Retrieval        scores of given rows (B, C) for queries q (B, H)
  rag.encode_questions(questions) -> (B, H)       the production query tower
  rag.encode(texts, tower, component, max_length) any tower (owned ones too), charged under `component`
  rag.score_rows(q, rows) -> (B, C)               q against stored / re-encoded passage embeddings
  rag.score_candidates(q, cands) -> (B, C)        any query embedding vs a ragged `Candidates` set, -inf at padding
  rag.read_candidates(batch, cands, select)       answer token log-probs of each real (or selected)
                                                  candidate, one sequence per pair: (B, C, T), (B, T), scored (B, C)
  rag.passage_embeddings(rows) -> (N, H)          stored, or re-encoded with grad if the passage tower trains
  rag.gold_first_rows(batch, k, q=None) -> (B, k) gold passages first, padded with retrieved ones
  rag.search(q, k) -> rows (B, k)                 index search, no grad
  rag.rows_of(ids), rag.passage_texts, rag.corpus, rag.doc_trained
  rag.retriever (towers, temperature, query_text / passage_text: the configured prefixes)
  rag.generator                                   score_pairs, answer_logprobs, score_multi (several
                                                  passages per prompt), generate, generate_multi, sample;
                                                  token level: encode_text, decode_ids, render_prompt,
                                                  token_logprobs(contexts, targets, loss_mask) (chunked),
                                                  sample_ids(contexts) -> ids, log-probs, finish reasons;
                                                  copy_as(component) (a frozen reference copy)
  ragtune.rollout.rollout(generator, prompt_ids, respond, max_turns, ...)
                                                  batched multi-turn rollouts, observations masked out
  ragtune.candidates.Candidates                   rows + mask + source flags, `of`, `union`, `position`
  rag.scoring()                                   context: no grad, dropout off, restored afterwards
  rag.gather(obj) -> [obj per rank]               all-gather of picklable state (every rank must call it)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, FrozenSet, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from ragtune.components import BUILTIN_COMPONENTS
from ragtune.data import Question

OPTIM_KEYS = ("schedule", "warmup_steps", "weight_decay", "betas", "eps", "clip_norm")


@dataclass
class NoOptions:
    def validate(self) -> None:
        pass


@dataclass(frozen=True)
class Phase:
    """One training phase: the components it trains and its share of `train.steps`.

    `optim` holds the strategy's defaults for this phase (keys of `OPTIM_KEYS`, and `lr`: a
    {component: lr} dict); `train.phase.<name>.*` in the config overrides them, and they
    override the global `train.*` settings.
    """

    name: str
    trains: FrozenSet[str]  # built-in components and/or trainable part names
    fraction: float = 1.0  # share of train.steps
    optim: Mapping[str, Any] = field(default_factory=dict, hash=False, compare=False)
    # collect-then-learn: `collect` runs once (no grad) per `updates` optimizer steps; its
    # experience is split into updates x grad_accum micro-batches, in order
    collect: bool = False
    updates: int = 1
    # the phase iterates over `build_examples(...)` (e.g. SFT turns) instead of the questions
    examples: bool = False


@dataclass(frozen=True)
class Part:
    """A module the strategy owns, built in `setup` as the attribute `strategy.<name>`.

    Its parameters are charged, checkpointed and optimised under `name`. A trainable part takes
    the learning rate of `lr_like` (a built-in component) unless `train.lr.<name>` is set. A frozen
    part never requires grad and never holds optimizer state; it may change only through a hook
    (`on_phase_start`, `on_step_end`), e.g. a Polyak-averaged target tower. A `derivable` part is
    rebuilt by `setup` from other weights and is neither checkpointed nor required at restore.
    """

    name: str
    trainable: bool = True
    lr_like: str = ""
    derivable: bool = False


@dataclass(frozen=True)
class StepContext:
    """What every strategy call is told about where training stands."""

    phase: Optional[Phase]  # None at evaluation
    step: int  # optimizer steps completed before this call (global)
    phase_step: int  # optimizer steps completed in this phase
    phase_steps: int  # length of this phase in steps (0 at evaluation)
    lrs: Mapping[str, float]  # current learning rate of each optimizer group (component name)
    k: int  # passages per question (train.k while training, eval.k at evaluation)

    @property
    def training(self) -> bool:
        return self.phase is not None


@dataclass
class LossSum:
    """A loss given as an unnormalised sum over `count` items (tokens, pairs, questions)."""

    total: torch.Tensor  # scalar
    count: float


class Strategy(nn.Module):
    name: ClassVar[str] = ""
    needs_labels: ClassVar[bool] = False
    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    # per-question numeric metrics `predict` may report: {name: description}
    reports: ClassVar[Dict[str, str]] = {}

    def __init__(self, options=None):
        super().__init__()
        self.opts = options if options is not None else self.Options()

    # ---- declaration ------------------------------------------------------------------------
    def phases(self) -> List[Phase]:
        """The phases in order. An empty list means nothing is trained."""
        raise NotImplementedError

    def parts(self) -> List[Part]:
        """The modules this strategy owns (built in `setup`)."""
        return []

    # ---- lifecycle ----------------------------------------------------------------------------
    def setup(self, rag) -> None:
        """Build the declared parts as attributes named after them (the models exist now)."""

    def on_phase_start(self, rag, ctx: StepContext, resumed: bool) -> None:
        """Phase-dependent state; `resumed`: the phase continues from a checkpoint (state restored)."""

    def loss(self, batch: Sequence[Question], rag, ctx: StepContext) -> Tuple[Any, Dict[str, float]]:
        raise NotImplementedError

    def collect(self, batch: Sequence[Question], rag, ctx: StepContext) -> Tuple[List[Any], Dict[str, float]]:
        """Phases with `collect=True`: experience from one batch of questions (rollouts, rewards,
        old log-probs), run by the trainer without grad and with dropout off, once per `updates`
        optimizer steps. Returns (items, logs); the trainer splits `items` into `updates *
        grad_accum` contiguous micro-batches (at least one item each) that `loss` then receives in
        place of questions. Checkpoints fall on collection boundaries only, so experience is
        never saved: a resumed run collects again from the restored state and RNG."""
        raise NotImplementedError(f"strategy '{self.name}' declares a collecting phase but no collect()")

    def build_examples(self, phase: Phase, questions: Sequence[Question], rag) -> List[Any]:
        """Phases with `examples=True`: the training items of the phase (e.g. SFT turns built from
        gold chains), built once at the phase start from the training questions. Must be
        deterministic (same list on every rank and on resume: the trainer rebuilds them when a run
        resumes inside the phase and drops that rebuild's charges, so the logical cost is counted
        once); batches are drawn from it by a resumable sampler and passed to `loss`."""
        raise NotImplementedError(f"strategy '{self.name}' declares an example phase but no build_examples()")

    def on_step_end(self, rag, ctx: StepContext) -> None:
        """After each optimizer step (ctx.step counts it): Polyak updates, schedules."""

    def predict(self, batch: Sequence[Question], rag, ctx: StepContext) -> Optional[List[dict]]:
        """Per-question dicts {prediction, retrieved_ids, metrics: {name: float}}, or None for the
        core decoder. Names in `metrics` must be declared in `reports`."""
        return None

    def extra_state(self) -> dict:
        """Non-parameter state that must survive a checkpoint (e.g. sample caches)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def merge_extra_states(self, states: List[dict]) -> dict:
        """One state from every rank's `extra_state()` (rank order), saved once and loaded by every
        rank. The default keeps rank 0's, right for state that is identical on all ranks; a
        strategy whose state is per example (a sample cache) must merge the ranks' shares."""
        return states[0] if states else {}

    def default_decoder(self) -> str:
        """The decoder `eval.decoder=auto` uses for this strategy (a name in ragtune.decoding)."""
        return "greedy_rescore"

    # ---- derived ------------------------------------------------------------------------------
    def vocabulary(self) -> Tuple[str, ...]:
        """Every component name of this strategy: the built-in ones and its parts."""
        return BUILTIN_COMPONENTS + tuple(p.name for p in self.parts())

    def trained_components(self) -> List[str]:
        return sorted({c for p in self.phases() for c in p.trains})

    def lr_family(self, component: str) -> str:
        """The built-in component whose learning rate (and grid axis) `component` uses."""
        for p in self.parts():
            if p.name == component:
                return p.lr_like
        return component

    def grid_axes(self, phase: Phase) -> List[str]:
        """The learning-rate axes a phase is searched over: built-in components (parts map to
        their family), sorted."""
        return sorted({self.lr_family(c) for c in phase.trains})

    def check_declaration(self) -> None:
        """Phases name known components only; parts are well formed. Raises ValueError."""
        parts = {p.name: p for p in self.parts()}
        for name, p in parts.items():
            if name in BUILTIN_COMPONENTS:
                raise ValueError(f"strategy '{self.name}': part '{name}' shadows a built-in component")
            if p.trainable and p.lr_like not in BUILTIN_COMPONENTS:
                raise ValueError(
                    f"strategy '{self.name}': trainable part '{name}' needs lr_like= one of "
                    f"{', '.join(BUILTIN_COMPONENTS)}"
                )
        for ph in self.phases():
            for c in ph.trains:
                if c not in BUILTIN_COMPONENTS and c not in parts:
                    raise ValueError(
                        f"strategy '{self.name}': phase '{ph.name}' trains unknown component '{c}' "
                        f"(known: {', '.join(self.vocabulary())})"
                    )
                if c in parts and not parts[c].trainable:
                    raise ValueError(f"strategy '{self.name}': phase '{ph.name}' trains frozen part '{c}'")
            if ph.updates < 1 or (ph.updates > 1 and not ph.collect):
                raise ValueError(
                    f"strategy '{self.name}': phase '{ph.name}' has updates={ph.updates} (>= 1; > 1 needs collect)"
                )
            if ph.collect and ph.examples:
                raise ValueError(f"strategy '{self.name}': phase '{ph.name}' cannot both collect and use examples")
            unknown = set(ph.optim) - set(OPTIM_KEYS) - {"lr"}
            if unknown:
                raise ValueError(f"strategy '{self.name}': phase '{ph.name}' has unknown optim keys {sorted(unknown)}")

    def part_module(self, name: str) -> nn.Module:
        mod = getattr(self, name, None)
        if not isinstance(mod, nn.Module):
            raise RuntimeError(f"strategy '{self.name}': setup() did not build the declared part '{name}'")
        return mod

    @classmethod
    def trains_description(cls) -> str:
        """What the strategy trains and owns, from its declaration alone (no models are built)."""
        s = cls()
        phases = s.phases()
        if len(phases) > 1:
            out = " -> ".join(f"{p.name}: {'+'.join(sorted(p.trains))}" for p in phases)
        else:
            out = ", ".join(s.trained_components()) or "nothing"
        frozen = [p.name for p in s.parts() if not p.trainable]
        return out + (f" (+ frozen {', '.join(frozen)})" if frozen else "")
