"""`independent`: retriever and generator trained separately (Lawton et al. 2025, EMNLP Findings,
"Learning to Retrieve and Generate: a comparison of RAG fine-tuning strategies", arXiv 2510.01600).

Needs context labels (gold passage ids). Two phases, each with its own learning rate:
1. `generator`: NLL of the answer given each of the top-K passages of the *untuned* retriever
   (the paper; this phase runs first so the retriever really is untuned), uniform weights 1/K;
   `generator_context: gold` trains on the gold passages instead.
2. `retriever`: InfoNCE on (question, gold passage) pairs with in-batch negatives plus
   `hard_negatives` mined from the index (top-ranked non-gold passages). A multi-hop question
   contributes one pair per gold passage; its other gold passages are masked out of its softmax
   (they are not negatives). Query side only unless `train_doc_encoder`.
Compute is the sum of both trainings, which the shared ledger records phase by phase.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ragtune import losses
from ragtune.strategy import Phase, Strategy


@dataclass
class Options:
    generator_context: str = "retrieved"   # retrieved | gold
    hard_negatives: int = 4                # mined per pair from the index (0 = in-batch only)
    train_doc_encoder: bool = False
    generator_fraction: float = 0.5        # share of train.steps for phase 1
    reduction: str = "sum"

    def validate(self):
        if self.generator_context not in ("retrieved", "gold"):
            raise ValueError("config key 'strategy.generator_context': must be retrieved or gold")
        if not 0 < self.generator_fraction < 1:
            raise ValueError("config key 'strategy.generator_fraction': must be in (0, 1)")
        if self.hard_negatives < 0:
            raise ValueError("config key 'strategy.hard_negatives': must be >= 0")


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

    def loss(self, batch, m, step):
        if any(p.requires_grad for p in m.generator.model.parameters()):
            return self._generator_loss(batch, m)
        return self._retriever_loss(batch, m)

    def _generator_loss(self, batch, m):
        k = self.cfg.train.k
        questions = [q.question for q in batch]
        with torch.no_grad():
            ret = m.retrieve(questions, k)
        texts, weights = ret.texts, None
        if self.opts.generator_context == "gold":
            texts, weights = gold_contexts(batch, ret, m, k)
        tok_lp, mask = m.generator.answer_logprobs(questions, texts, [q.answers[0] for q in batch])  # (B, K, T)
        loss = losses.nll_given_passages(tok_lp, mask, weights, self.opts.reduction)
        return loss, {"answer_tokens": float(mask.sum()), **ret.logs()}

    def _retriever_loss(self, batch, m):
        pairs = [(b, pid) for b, q in enumerate(batch) for pid in q.gold_passage_ids]
        if not pairs:
            raise ValueError("a batch without gold passage ids reached the retriever phase")
        q = m.encode_questions([batch[b].question for b, _ in pairs])             # (P, H)
        dev = q.device
        owners = torch.tensor([b for b, _ in pairs], device=dev)                  # (P,)
        gold_rows = torch.tensor(m.rows_of([pid for _, pid in pairs]), device=dev)  # (P,)
        uniq, pos = gold_rows.unique(return_inverse=True)                         # (N,), (P,)
        d = passage_embeddings(m, uniq)                                           # (N, H)
        # a candidate is not a negative for pair p if it is a gold passage of p's own question
        gold_sets = [set(m.rows_of(batch[b].gold_passage_ids)) for b in owners.tolist()]
        mask_out = torch.tensor([[r in g for r in uniq.tolist()] for g in gold_sets], device=dev)  # (P, N)
        hard = None
        if self.opts.hard_negatives:
            hard_rows = mine_negatives(m, q, gold_sets, self.opts.hard_negatives)  # (P, M)
            hard = passage_embeddings(m, hard_rows.reshape(-1)).view(*hard_rows.shape, -1)  # (P, M, H)
        loss = losses.contrastive_loss(q, d, pos, m.retriever.temperature, hard_negatives=hard, mask_out=mask_out)
        logits = q.detach() @ d.detach().T / m.retriever.temperature                # (P, N)
        return loss, {"pairs": float(len(pairs)), "retrieval_entropy": float(losses.retrieval_entropy(logits).mean())}


def passage_embeddings(m, rows: torch.Tensor) -> torch.Tensor:
    """rows (N,) -> (N, H): stored, or re-encoded with grad when the passage tower trains."""
    if m.doc_trained:
        return m.retriever.encode_passages([m.passage_texts[r] for r in rows.tolist()])
    return m.index.lookup(rows)


@torch.no_grad()
def mine_negatives(m, q: torch.Tensor, gold_sets, n: int) -> torch.Tensor:
    """Top-ranked non-gold rows per query: (P, n)."""
    _, rows = m.index.search(q, min(len(m.index), n + max(len(g) for g in gold_sets)))
    out = [[r for r in row if r not in g][:n] for row, g in zip(rows.tolist(), gold_sets)]
    return torch.tensor(out, device=q.device)


def gold_contexts(batch, ret, m, k):
    """Gold passages first (weight 1/n_gold each), padded to K with retrieved non-gold passages (weight 0)."""
    texts, weights = [], torch.zeros(len(batch), k)
    for b, q in enumerate(batch):
        gold = q.gold_passage_ids[:k]
        fill = [t for pid, t in zip(ret.ids[b], ret.texts[b]) if pid not in gold][: k - len(gold)]
        texts.append([m.passage_texts[m.corpus.row(pid)] for pid in gold] + fill)
        weights[b, : len(gold)] = 1.0 / len(gold)
    return texts, weights
