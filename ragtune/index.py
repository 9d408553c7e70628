"""Dense passage index: build from embeddings, search top-k, look up stored embeddings.

Exact inner-product search with a torch matmul + topk is the default (faster than faiss flat
below ~100k passages on CPU); faiss flat / HNSW / IVF are options. GPU faiss is used only when
`faiss.get_num_gpus() > 0`: the GPU wheel imports on machines without a GPU and then silently
returns empty indexes. The stored embeddings (N, H) are kept in every case: strategies score
arbitrary candidate rows against them, and checkpoints save them when the passage side trains.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch


class DenseIndex:
    def __init__(self, cfg):
        self.cfg = cfg
        self.emb: Optional[torch.Tensor] = None  # (N, H), float32
        self._faiss = None
        self.version = 0  # bumped on every (re)build

    def build(self, emb: torch.Tensor) -> None:
        self.emb = emb.detach().float().contiguous()
        self.version += 1
        self._faiss = None if self.cfg.backend == "exact" else self._build_faiss(self.emb)

    def __len__(self) -> int:
        return 0 if self.emb is None else self.emb.shape[0]

    def search(self, q: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """q (B, H) -> inner products (B, k) and rows (B, k), best first. No gradient."""
        if self.emb is None:
            raise RuntimeError("index searched before it was built")
        if k > len(self):
            raise ValueError(f"k={k} is larger than the corpus ({len(self)} passages)")
        q = q.detach().float()
        if self._faiss is None:
            sims = q.to(self.emb.device) @ self.emb.T  # (B, N)
            scores, rows = sims.topk(k, dim=-1)
            return scores.to(q.device), rows.to(q.device)
        scores, rows = self._faiss.search(q.cpu().numpy(), k)
        if (rows < 0).any():  # faiss pads with -1 when the search reaches fewer than k passages
            raise RuntimeError(
                f"index.backend={self.cfg.backend} found fewer than k={k} passages for some "
                f"queries; raise index.ivf_nprobe / use a smaller k or index.backend=exact"
            )
        return torch.from_numpy(scores).to(q.device), torch.from_numpy(rows).long().to(q.device)

    def lookup(self, rows: torch.Tensor) -> torch.Tensor:
        """rows (...) -> stored embeddings (..., H)."""
        return self.emb.to(rows.device)[rows]

    def _build_faiss(self, emb: torch.Tensor):
        import faiss

        x = emb.cpu().numpy()
        n, dim = x.shape
        backend = self.cfg.backend
        if backend == "faiss_flat":
            index = faiss.IndexFlatIP(dim)
        elif backend == "faiss_hnsw":
            index = faiss.IndexHNSWFlat(dim, self.cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        else:  # faiss_ivf
            nlist = min(self.cfg.ivf_nlist, max(1, n // 39))
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
            index.train(x)
            index.nprobe = min(self.cfg.ivf_nprobe, nlist)
        if self.cfg.use_gpu and backend != "faiss_hnsw" and faiss.get_num_gpus() > 0:
            index = faiss.index_cpu_to_all_gpus(index)
        index.add(x)
        return index

    def state_dict(self) -> dict:
        return {"emb": self.emb, "version": self.version}

    def load_state_dict(self, state: dict) -> None:
        self.build(state["emb"])
        self.version = state["version"]
