"""`topk_marginal`: the RAG recipe of Lewis et al. 2020 ("Retrieval-Augmented Generation for
Knowledge-Intensive NLP Tasks", arXiv 2005.11401): the passage is a latent variable, marginalised
over the top-K of the index with p(z|x) = softmax of the scores renormalised over those K.

- `loss=sequence` (RAG-Sequence): log p(y|x) = logsumexp_k [ log p(z_k|x) + log p_G(y|x,z_k) ].
- `loss=token` (RAG-Token): log p(y|x) = sum_t logsumexp_k [ log p(z_k|x) + log p_G(y_t|x,z_k,y_<t) ].
The generator gets gradients through every passage, the query encoder through p(z|x) (w.r.t. the
scores: posterior minus prior). For a decoder-only generator the document prior is added exactly
once per sequence (RAG-Sequence) or once per answer position inside the per-token mixture
(RAG-Token), on the answer tokens; the widely copied encoder-decoder code adds it at target
position 1 because position 0 is a decoder-start token, which is wrong here (see
`ragtune.losses.rag_token_nll`).

Decoding is part of the method: the default decoder (`eval.decoder=auto`) is RAG-Token mixture
decoding for the token loss and RAG-Sequence "thorough" decoding for the sequence loss
(`eval.decoder=fast` is the cheaper RAG-Sequence variant; see `ragtune.decoding`).

`train_doc_encoder=true` is the RAG "end2end" variant: the passage tower trains too, the
candidates' passages are re-encoded with grad every step and the index is re-embedded every
`index.refresh_every` steps (and at the phase end), charged to the ledger as `index`. It logs the
staleness of the index: `steps_since_refresh` and `index_drift`, the mean 1 - cos between the
fresh (eval-mode, no-grad) and the stored embeddings of the first question's K retrieved rows:
K extra passage encodes per step (charged as `score`, about 1/(3B) of the passage tower's
training cost), not B*K. Lewis et al. found refreshing unnecessary
and kept the passage tower frozen (the default). Their hyper-parameters: K = 5 or 10 passages,
Adam lr 3e-5 for BART-large and the DPR query tower; set them in a real-model preset, not on the
embedded default, where every strategy reads the same K.

How it differs from `joint retriever_loss=marginal` (Lawton et al.'s joint training, the same
training objective): this is the Lewis et al. recipe as a whole, i.e. the RAG-Sequence loss as an
equal option (the default here), the method's own decoding (RAG-Token mixture, RAG-Sequence
thorough/fast with beams) instead of the core greedy-candidate decoder, the end2end passage-tower
option with scheduled refresh and a staleness log; it is also the biased baseline of the
latent-passage family (`vrag`, `jsa`): top-K truncation of the marginal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ragtune import losses
from ragtune.config import choice
from ragtune.strategy import Phase, Strategy


@dataclass
class Options:
    loss: str = choice("sequence", "sequence", "token")  # RAG-Sequence | RAG-Token
    train_doc_encoder: bool = False  # the end2end variant (index refreshed every index.refresh_every)
    reduction: str = choice("sum", *losses.REDUCTIONS)


class TopKMarginal(Strategy):
    name = "topk_marginal"
    summary = "Lewis et al. RAG: RAG-Sequence / RAG-Token marginal over the top-K, the method's own decoding"
    paper = "Lewis et al. 2020, arXiv 2005.11401"
    Options = Options

    def __init__(self, options=None):
        super().__init__(options)
        self.index_version, self.refreshed_at = -1, 0  # staleness log (end2end variant)

    def phases(self):
        comps = {"query_encoder", "generator"} | ({"doc_encoder"} if self.opts.train_doc_encoder else set())
        return [Phase("joint", frozenset(comps), 1.0)]

    def default_decoder(self) -> str:
        return "token_mixture" if self.opts.loss == "token" else "thorough"

    def loss(self, batch, rag, ctx):
        ret, tok_lp, mask = rag.retrieve_and_read(batch, ctx.k)  # scores (B, K), tok_lp (B, K, T)
        nll = losses.marginal_nll(self.opts.loss, ret.scores, tok_lp, mask, self.opts.reduction)
        logs = ret.logs()
        if rag.doc_trained:
            logs.update(self._staleness(rag, ret.rows, ctx))
        return nll, logs

    @torch.no_grad()
    def _staleness(self, rag, rows, ctx):
        """Steps since the index was last re-embedded, and how far the stored embeddings of the
        retrieved rows (B, K) have drifted from the passage tower's current ones."""
        if rag.index.version != self.index_version:
            self.index_version, self.refreshed_at = rag.index.version, ctx.step
        rows = rows[:1]  # (1, K): a sample keeps the log cheap
        with rag.scoring():
            fresh = rag.passage_embeddings(rows)  # (1, K, H), re-encoded (scoring: no grad)
        stored = rag.index.lookup(rows).to(fresh.dtype)  # (1, K, H)
        drift = 1 - torch.nn.functional.cosine_similarity(fresh, stored, dim=-1)  # (1, K)
        return {"steps_since_refresh": float(ctx.step - self.refreshed_at), "index_drift": float(drift.mean())}

    def extra_state(self) -> dict:
        return {"index_version": self.index_version, "refreshed_at": self.refreshed_at}

    def load_extra_state(self, state: dict) -> None:
        self.index_version = int(state.get("index_version", -1))
        self.refreshed_at = int(state.get("refreshed_at", 0))
