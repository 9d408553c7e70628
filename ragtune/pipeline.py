"""The RAG pipeline every strategy trains: retriever + index + generator (+ the strategy's own parts).

`RAGPipeline` is one nn.Module so accelerate/DDP can wrap it; its `forward(batch, ctx)` is the
strategy's loss. The methods a strategy may call are listed in `ragtune.strategy`'s docstring;
everything else here is the core's. The retrieval helpers live here (not in strategies) so that every strategy gets
scores the same way: index search without grad, then differentiable scores from the query tower
against stored passage embeddings, or against freshly re-encoded passages when the passage tower
is being trained.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ragtune.candidates import Candidates
from ragtune.data import Corpus, Question
from ragtune.flops import search_flops
from ragtune.generator import Generator, float32_
from ragtune.index import DenseIndex
from ragtune.ledger import Ledger, clock
from ragtune.losses import retrieval_entropy
from ragtune.retriever import DualEncoder


@dataclass
class Retrieval:
    rows: torch.Tensor  # (B, K) corpus rows, best first
    scores: torch.Tensor  # (B, K) s(x, z) / tau, differentiable w.r.t. trained towers
    texts: List[List[str]]  # (B, K) passage texts
    ids: List[List[str]]  # (B, K) passage ids

    def logs(self) -> Dict[str, float]:
        """Entropy of p(z|x) and distinct passages retrieved: watch for retrieval collapse."""
        return {
            "retrieval_entropy": float(retrieval_entropy(self.scores.detach().float()).mean()),
            "distinct_passages": float(self.rows.unique().numel()),
        }


def refresh_shard(n_batches: int, rank: int, world: int) -> range:
    """The batches of an index refresh that `rank` of `world` processes embeds: batch j of the
    length-sorted order goes to rank j % world. Whole batches, so each rank's batches (and their
    padding) are one process's and the gathered index is bitwise one process's; strided rather
    than contiguous, so every rank gets short and long passages alike (the order is sorted by
    length) and the ranks' batch counts differ by at most one."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not a rank of a world of {world} processes")
    return range(rank, n_batches, world)


class RAGPipeline(nn.Module):
    def __init__(
        self,
        retriever: DualEncoder,
        generator: Generator,
        index: DenseIndex,
        corpus: Corpus,
        ledger: Ledger,
        strategy: nn.Module,
    ):
        super().__init__()
        self.retriever = retriever
        self.generator = generator
        self.strategy = strategy
        self.index = index
        self.corpus = corpus
        self.ledger = ledger
        self.passage_texts = corpus.model_texts  # (N,) made on access: the corpus holds the one copy
        index.on_missing = self._rebuild_missing_index
        self.doc_trained = False  # set by the trainer: passage tower receives gradients this phase

    def forward(self, batch: Sequence[Question], ctx):
        return self.strategy.loss(batch, self, ctx)

    # ---- components (core) --------------------------------------------------------------------
    def setup_strategy(self) -> None:
        """Let the strategy build its declared parts, then check that it owns nothing undeclared.

        Master weights: every parameter a phase trains is float32; what no phase trains stays in
        its loaded dtype (a frozen bf16 passage tower embeds the corpus at half the memory). The
        trained built-in components are cast before the strategy's setup, so a part it copies
        from them (a Polyak target tower, a frozen reference generator, a critic's trunk) starts
        in float32 as well; trained parts are cast after it."""
        trained = set(self.strategy.trained_components())
        builtin = self._builtin_params()  # no parts exist yet
        float32_([p for comp, params in builtin.items() if comp in trained for p in params])
        self.strategy.setup(self)
        owned = {id(p) for part in self.strategy.parts() for p in self.strategy.part_module(part.name).parameters()}
        stray = [n for n, p in self.strategy.named_parameters() if id(p) not in owned]
        if stray:
            raise RuntimeError(
                f"strategy '{self.strategy.name}' has parameters outside its declared parts: {stray[:3]}"
            )
        for part in self.strategy.parts():
            if not part.trainable:
                self.strategy.part_module(part.name).requires_grad_(False)
        float32_([p for comp, params in self.component_params().items() if comp in trained for p in params])

    def component_modules(self) -> Dict[str, nn.Module]:
        mods = {
            "query_encoder": self.retriever.query_encoder,
            "doc_encoder": self.retriever.doc_encoder,
            "generator": self.generator,
        }
        mods.update({p.name: self.strategy.part_module(p.name) for p in self.strategy.parts()})
        return mods

    def component_params(self) -> Dict[str, List[nn.Parameter]]:
        """Trainable parameters per component (LoRA adapters only when LoRA is on, never those of an
        adapter copy: `Generator.trainable_parameters`); frozen parts: none."""
        out = self._builtin_params()
        for part in self.strategy.parts():
            out[part.name] = list(self.strategy.part_module(part.name).parameters()) if part.trainable else []
        return out

    def _builtin_params(self) -> Dict[str, List[nn.Parameter]]:
        """Trainable parameters of the built-in components (shared towers: under query_encoder)."""
        return {
            "query_encoder": list(self.retriever.query_encoder.parameters()),
            "doc_encoder": [] if self.retriever.shared else list(self.retriever.doc_encoder.parameters()),
            "generator": self.generator.trainable_parameters(),
        }

    def set_modes(self, trains) -> None:
        """Train mode (dropout) only for the components being trained; frozen ones act as at inference."""
        self.eval()
        modules = self.component_modules()
        for comp in trains:
            modules[comp].train()

    def refresh_index(self, batch_size: int = 256) -> None:
        """Re-embed the whole corpus with the passage tower in eval mode (charged as `index`).

        The corpus is tokenised once per tokenizer (`DualEncoder.passage_tokens`, cached) and
        embedded in batches of `batch_size` rows sorted by token length (`index.sort_by_length`),
        so each batch pads to its own longest passage (file order padded the default corpus to
        1.34x its real tokens); the embeddings are scattered back to corpus order. They equal the
        file-order ones up to float32 rounding, not to the bit: padding changes the length that
        attention reduces over, hence the summation order (1.6e-7 at most on MiniLM). The index is
        keyed by the tower state that built it (`index_cache.index_key`) and its search structure
        is made at once, so an approximate index's recall is measured at every refresh.

        Several processes (a process group of world size W > 1 initialised; every rank must call
        this at the same point): batch j of the sorted order is embedded by rank j % W only
        (`refresh_shard`), the rows are all-gathered (`distributed.all_gather_rows`) and every
        rank builds the same full index. Each rank's batches are exactly one process's batches,
        so the index is bitwise what one process builds, and each rank charges only the batches
        it embedded: the trainer's merge of the ranks' ledgers counts the logical work once. The
        index's `info` describes the logical work too (all ranks' padded tokens; the seconds
        until every rank has the full index)."""
        from ragtune.distributed import all_gather_rows, rank_world
        from ragtune.index_cache import index_key

        tower = self.retriever.doc_encoder
        key = index_key(self, batch_size)
        t0 = clock()
        tokens = self.retriever.passage_tokens(self.passage_texts)
        t_tok = clock() - t0
        n = len(tokens)
        if getattr(self.index.cfg, "sort_by_length", True):
            order = torch.from_numpy(np.argsort(tokens.lengths, kind="stable"))  # (N,) rows, shortest first
        else:
            order = torch.arange(n)
        rank, world = rank_world()
        n_batches = -(-n // batch_size)
        batch_rows = lambda j: order[j * batch_size : (j + 1) * batch_size]  # noqa: E731 - (b,) rows of batch j
        was_training = tower.training
        tower.eval()  # no dropout in stored embeddings
        embs, padded = [], 0  # this rank's (b, H) embeddings, in the order of its batches
        try:
            with torch.no_grad():
                for j in refresh_shard(n_batches, rank, world):
                    batch = tokens.batch(batch_rows(j).numpy())  # (b, L) padded to this batch's longest
                    padded += batch["input_ids"].numel()
                    emb = self.retriever.encode_tokens(batch, tower, "doc_encoder", "index")  # (b, H)
                    embs.append(emb.float().cpu())
        finally:
            tower.train(was_training)
        if world == 1:
            pieces = list(zip(refresh_shard(n_batches, 0, 1), embs))  # (batch j, its (b, H) embeddings)
        else:  # every rank's rows, split back into its batches; then the padded tokens of all ranks
            parts = all_gather_rows(torch.cat(embs) if embs else torch.empty((0, 0)))  # world x (R_r, H)
            del embs
            pieces = []
            for r, part in enumerate(parts):
                shard = refresh_shard(n_batches, r, world)
                pieces += zip(shard, part.split([len(batch_rows(j)) for j in shard]))
            padded = sum(self.gather(padded))
        out = torch.empty((n, pieces[0][1].shape[-1]), dtype=torch.float32)  # (N, H), corpus order
        for j, emb in pieces:
            out[batch_rows(j)] = emb
        t_embed = clock() - t0 - t_tok
        self.index.build(out, key, batch_size)
        self.index.prepare()
        self.index.info.update(
            refresh_tokenize_seconds=t_tok,  # ~0 once the corpus tokens are cached
            refresh_embed_seconds=t_embed,  # several ranks: until this rank holds every rank's rows
            real_tokens=int(tokens.lengths.sum()),
            padded_tokens=int(padded),  # summed over the ranks
            refresh_ranks=world,
        )

    def _rebuild_missing_index(self, ref: dict) -> bool:
        """`DenseIndex.on_missing`: a referenced store entry is gone. Re-embed (charged as any
        refresh) when the passage tower loaded now is the one that built it; else False."""
        from ragtune.index_cache import index_key

        bs = ref.get("batch_size")
        if not bs or index_key(self, bs) != ref["ref"]:
            return False
        print(f"index {ref['ref']} is missing from the store: re-embedding the corpus", flush=True)
        self.refresh_index(bs)
        return True

    # ---- the API strategies use -------------------------------------------------------------
    @contextmanager
    def scoring(self) -> Iterator[None]:
        """No grad, dropout off everywhere (charged as `score`); train modes restored afterwards."""
        modes = [(mod, mod.training) for mod in self.modules()]
        self.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            for mod, mode in modes:
                mod.training = mode

    def encode(self, texts: Sequence[str], tower: nn.Module, component: str, max_length: int) -> torch.Tensor:
        """(N,) texts -> (N, H) with any tower (a strategy-owned one too), charged under `component`."""
        return self.retriever.encode(list(texts), tower, component, max_length)

    def encode_questions(self, questions: Sequence[str]) -> torch.Tensor:
        return self.retriever.encode_queries(list(questions))  # (B, H)

    def search(self, q: torch.Tensor, k: int) -> torch.Tensor:
        """q (B, H) -> top-k rows (B, k) of the index, best first; no gradient, no texts. Charged
        to the ledger as one `index` call of activity `score` (`eval` under evaluation), with
        `ragtune.flops.search_flops`'s estimate for the backend searched (`index.plan`: `auto`
        resolved) and the measured seconds."""
        t0 = clock()
        rows = self.index.search(q, k)[1]
        seconds = clock() - t0
        plan = self.index.plan  # the backend actually searched (`auto` resolved), with its parameters
        flops = search_flops(plan.backend, q.shape[0], len(self.index), q.shape[-1], plan)
        self.ledger.charge("index", "score", tokens=0, flops=flops, seconds=seconds)
        return rows

    def passage_embeddings(self, rows: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """rows (...) -> (..., H): stored, or re-encoded with grad when the passage tower trains.
        Re-encoding runs once per distinct real row (`mask` False marks padding: zeros there)."""
        if not self.doc_trained:
            return self.index.lookup(rows)
        keep = torch.ones_like(rows, dtype=torch.bool) if mask is None else mask.to(torch.bool)
        uniq, inverse = torch.unique(rows[keep], return_inverse=True)  # (U,), (n_real,)
        enc = self.retriever.encode_passages([self.passage_texts[r] for r in uniq.tolist()])  # (U, H)
        out = enc.new_zeros((*rows.shape, enc.shape[-1]))  # (..., H)
        out[keep] = enc[inverse]
        return out

    def score_rows(self, q: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """q (B, H), rows (B, C) -> (B, C) scores / tau; passages re-encoded if the tower trains."""
        return self.retriever.score(q, self.passage_embeddings(rows).to(q.dtype))

    def score_candidates(self, q: torch.Tensor, cands: Candidates) -> torch.Tensor:
        """Any query embedding q (B, H) (the prior's or a strategy-owned tower's) against a ragged
        candidate set -> (B, C) scores / tau, `-inf` at padding; differentiable w.r.t. q and, when
        the passage tower trains, w.r.t. it (only real rows are re-encoded)."""
        d = self.passage_embeddings(cands.rows, cands.mask).to(q.dtype)  # (B, C, H)
        return self.retriever.score(q, d).masked_fill(~cands.mask, float("-inf"))  # (B, C)

    def read_candidates(
        self, batch: Sequence[Question], cands: Candidates, select: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The first answer's token log-probs under every real candidate (or the `select`ed subset
        (B, C) bool) in one batched generator call, one sequence per (question, passage) pair.
        Returns tok_lp (B, C, T) (0 where not scored), mask (B, T), scored (B, C) bool."""
        scored = cands.mask if select is None else (select.to(torch.bool) & cands.mask)
        pairs = scored.nonzero().tolist()  # [(b, c)]
        qs = [batch[b].question for b, _ in pairs]
        ps = [self.passage_texts[int(cands.rows[b, c])] for b, c in pairs]
        ans = [batch[b].answers[0] for b, _ in pairs]
        tok, tmask = self.generator.score_pairs(qs, ps, ans)  # (N, T)
        B, C = cands.rows.shape
        T = tok.shape[-1]
        out = tok.new_zeros((B, C, T))
        idx = torch.tensor(pairs, dtype=torch.long, device=cands.rows.device).view(-1, 2)
        out = out.index_put((idx[:, 0].to(out.device), idx[:, 1].to(out.device)), tok)
        mask = torch.zeros((B, T), device=tok.device)
        mask[idx[:, 0].to(tok.device)] = tmask  # the same answer, so the same mask, for all of b's pairs
        return out, mask, scored

    def retrieve(self, questions: Sequence[str], k: int, q: torch.Tensor = None) -> Retrieval:
        """Top-k from the index; scores carry gradient into the query (and passage) tower."""
        q = self.encode_questions(questions) if q is None else q
        return self.make_retrieval(q, self.search(q, k))

    def make_retrieval(self, q: torch.Tensor, rows: torch.Tensor) -> Retrieval:
        scores = self.score_rows(q, rows)
        rows_list = rows.tolist()
        texts = [[self.passage_texts[r] for r in row] for row in rows_list]
        ids = [[self.corpus[r].id for r in row] for row in rows_list]
        return Retrieval(rows=rows, scores=scores, texts=texts, ids=ids)

    def gold_first_rows(self, batch: Sequence[Question], k: int, q: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, k) rows: each question's gold passages first (at most k), padded with its best
        retrieved non-gold passages. Used for gold-context training and oracle evaluation."""
        q = self.encode_questions([x.question for x in batch]) if q is None else q
        top = self.search(q, k)
        rows = []
        for x, cand in zip(batch, top.tolist()):
            gold = self.rows_of(x.gold_passage_ids)[:k]
            rows.append(gold + [r for r in cand if r not in gold][: k - len(gold)])
        return torch.tensor(rows, device=top.device)

    def retrieve_and_read(self, batch: Sequence[Question], k: int):
        """Top-k retrieval + the answer's per-token log-probs under each passage.
        Returns (Retrieval, tok_lp (B, K, T), mask (B, T)); the first answer is the target."""
        questions = [q.question for q in batch]
        ret = self.retrieve(questions, k)
        tok_lp, mask = self.generator.answer_logprobs(questions, ret.texts, [q.answers[0] for q in batch])
        return ret, tok_lp, mask

    def gather(self, obj) -> list:
        """Every rank's `obj` (picklable), in rank order; `[obj]` in one process. Every rank must
        call it at the same point (e.g. in `on_step_end`, which runs on all ranks)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return [obj]
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out

    def rows_of(self, ids: Sequence[str]) -> List[int]:
        return [self.corpus.row(i) for i in ids]
