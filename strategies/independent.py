"""`independent`: retriever and generator trained separately (Lawton et al. 2025, EMNLP Findings,
"Learning to Retrieve and Generate: a comparison of RAG fine-tuning strategies", arXiv 2510.01600).

Needs context labels (gold passage ids). Two phases, each with its own learning rate:
1. `generator`: NLL of the answer given each of the top-K passages of the *untuned* retriever
   (the paper; this phase runs first so the retriever really is untuned), uniform weights 1/K;
   `generator_context: gold` trains on the gold passages instead.
2. `retriever`: InfoNCE on (question, gold passage) pairs with in-batch negatives plus
   `hard_negatives` mined from the index (top-ranked non-gold passages). A multi-hop question
   contributes one pair per gold passage; its other gold passages are masked out of its softmax
   (they are not negatives), and a mined negative is never one of the in-batch candidates (it would
   appear twice in the softmax). Query side only unless `train_doc_encoder`.
Compute is the sum of both trainings, which the shared ledger records phase by phase.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ragtune import losses
from ragtune.config import choice, nonneg
from ragtune.strategy import Phase, Strategy


@dataclass
class Options:
    generator_context: str = choice("retrieved", "retrieved", "gold")
    hard_negatives: int = nonneg(4)  # mined per pair from the index (0 = in-batch only)
    train_doc_encoder: bool = False
    generator_fraction: float = 0.5  # share of train.steps for phase 1
    reduction: str = choice("sum", *losses.REDUCTIONS)

    def validate(self):
        if not 0 < self.generator_fraction < 1:
            raise ValueError("config key 'strategy.generator_fraction': must be in (0, 1)")


class Independent(Strategy):
    name = "independent"
    needs_labels = True
    summary = "generator NLL on untuned top-K, then contrastive retriever on gold pairs"
    paper = "Lawton et al. 2025, arXiv 2510.01600"
    Options = Options

    def phases(self):
        retr = {"query_encoder"} | ({"doc_encoder"} if self.opts.train_doc_encoder else set())
        f = self.opts.generator_fraction
        return [Phase("generator", frozenset({"generator"}), f), Phase("retriever", frozenset(retr), 1 - f)]

    def loss(self, batch, rag, ctx):
        if ctx.phase.name == "generator":
            return self._generator_loss(batch, rag, ctx.k)
        return self._retriever_loss(batch, rag)

    def _generator_loss(self, batch, rag, k):
        questions = [q.question for q in batch]
        with torch.no_grad():
            q = rag.encode_questions(questions)  # (B, H)
            rows = rag.gold_first_rows(batch, k, q) if self.opts.generator_context == "gold" else rag.search(q, k)
            ret = rag.make_retrieval(q, rows)  # (B, K)
        weights = None
        if self.opts.generator_context == "gold":  # gold passages 1/n_gold each, the padding 0
            weights = torch.zeros(len(batch), k)
            for b, x in enumerate(batch):
                n = min(len(x.gold_passage_ids), k)
                weights[b, :n] = 1.0 / n
        tok_lp, mask = rag.generator.answer_logprobs(questions, ret.texts, [q.answers[0] for q in batch])  # (B, K, T)
        loss = losses.nll_given_passages(tok_lp, mask, weights, self.opts.reduction)
        return loss, {"answer_tokens": float(mask.sum()), **ret.logs()}

    def _retriever_loss(self, batch, rag):
        pairs = [(b, pid) for b, q in enumerate(batch) for pid in q.gold_passage_ids]
        if not pairs:
            raise ValueError("a batch without gold passage ids reached the retriever phase")
        q = rag.encode_questions([batch[b].question for b, _ in pairs])  # (P, H)
        dev = q.device
        owners = torch.tensor([b for b, _ in pairs], device=dev)  # (P,)
        gold_rows = torch.tensor(rag.rows_of([pid for _, pid in pairs]), device=dev)  # (P,)
        uniq, pos = gold_rows.unique(return_inverse=True)  # (N,), (P,)
        d = rag.passage_embeddings(uniq)  # (N, H)
        # a candidate is not a negative for pair p if it is a gold passage of p's own question
        gold_sets = [set(rag.rows_of(batch[b].gold_passage_ids)) for b in owners.tolist()]
        mask_out = torch.tensor([[r in g for r in uniq.tolist()] for g in gold_sets], device=dev)  # (P, N)
        hard = None
        if self.opts.hard_negatives:
            # never a passage already among the in-batch candidates: it would appear twice in the softmax
            hard_rows = mine_negatives(rag, q, gold_sets, set(uniq.tolist()), self.opts.hard_negatives)  # (P, M)
            hard = rag.passage_embeddings(hard_rows)  # (P, M, H)
        temp = rag.retriever.temperature
        loss = losses.contrastive_loss(q, d, pos, temp, hard_negatives=hard, mask_out=mask_out)
        logits = q.detach() @ d.detach().T / temp  # (P, N)
        return loss, {"pairs": float(len(pairs)), "retrieval_entropy": float(losses.retrieval_entropy(logits).mean())}


@torch.no_grad()
def mine_negatives(rag, q: torch.Tensor, gold_sets, exclude: set, n: int) -> torch.Tensor:
    """Top-ranked rows per query that are neither its gold passages nor in `exclude`: (P, n)."""
    rows = rag.search(q, min(len(rag.index), n + len(exclude | set().union(*gold_sets))))
    out = [[r for r in row if r not in g and r not in exclude][:n] for row, g in zip(rows.tolist(), gold_sets)]
    return torch.tensor(out, device=q.device)
