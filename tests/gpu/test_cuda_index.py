"""The dense index with queries on the GPU: exact search there returns the rows CPU search returns
(also under a bf16 autocast region, as inside a training step), `lookup` returns float32 rows on the
query device, and faiss-gpu is used when `faiss_gpu_status()` says it is usable, else exact torch
search on the GPU with a warning that says why. bench/gpu_check.sh sets RAGTUNE_EXPECT_FAISS_GPU=1
when it installed a faiss GPU wheel with machine code for this GPU: then the fallback is a failure."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from ragtune.config import IndexConfig
from ragtune.index import DenseIndex, faiss_gpu_status

pytestmark = pytest.mark.gpu

N, DIM, K = 20_000, 64, 10
TIE = 1e-5  # two scores closer than this may swap places between CPU and GPU summation orders


def _index(**kw) -> DenseIndex:
    return DenseIndex(OmegaConf.structured(IndexConfig(**kw)))


def _data(n_queries: int = 300):
    """Unit passage embeddings and queries that are noisy copies of some of them (300 queries: more
    than the exact search's chunk of 64, so the chunked path runs)."""
    g = torch.Generator().manual_seed(0)
    emb = F.normalize(torch.randn(N, DIM, generator=g), dim=-1)
    q = F.normalize(emb[:n_queries] + 0.3 / DIM**0.5 * torch.randn(n_queries, DIM, generator=g), dim=-1)
    return emb, q


def _assert_same_rows(rows, scores, want_rows, want_scores):
    """Equal rows, except where two neighbouring reference scores are within TIE (a near tie)."""
    rows, scores = rows.cpu(), scores.cpu()
    assert torch.allclose(scores, want_scores, atol=TIE), (scores - want_scores).abs().max()
    differ = rows != want_rows
    gap = torch.full_like(want_scores, float("inf"))  # distance of each score to its nearest neighbour
    d = want_scores[:, :-1] - want_scores[:, 1:]
    gap[:, :-1] = torch.minimum(gap[:, :-1], d)
    gap[:, 1:] = torch.minimum(gap[:, 1:], d)
    assert (gap[differ] < TIE).all(), f"{int(differ.sum())} rows differ outside near ties"
    assert differ.float().mean() < 0.01


def test_exact_search_on_the_gpu_returns_the_cpu_rows_and_lookup_stays_on_the_query_device(device):
    emb, q = _data()
    cpu, gpu = _index(backend="exact"), _index(backend="exact")
    cpu.build(emb)
    gpu.build(emb)
    want_scores, want_rows = cpu.search(q, K)
    scores, rows = gpu.search(q.to(device), K)
    assert rows.device.type == scores.device.type == device.type
    assert (gpu.plan.backend, gpu.plan.where, gpu.plan.device) == ("exact", "torch", device.type)
    assert rows.dtype == torch.long and scores.dtype == torch.float32
    _assert_same_rows(rows, scores, want_rows, want_scores)
    assert torch.equal(rows[:, 0].cpu(), torch.arange(q.shape[0]))  # each query's own passage first

    with torch.autocast(device.type, dtype=torch.bfloat16):  # as inside a bf16 training step
        s_amp, r_amp = gpu.search(q.to(device), K)
    assert s_amp.dtype == torch.float32
    _assert_same_rows(r_amp, s_amp, want_rows, want_scores)  # scored in float32, not bf16

    picked = rows[:7, :3]
    got = gpu.lookup(picked)
    assert got.device.type == device.type and got.dtype == torch.float32 and got.shape == (7, 3, DIM)
    assert torch.equal(got.cpu(), emb[picked.cpu()])
    on_cpu = gpu.lookup(picked.cpu())  # rows on CPU: rows on CPU, whatever the index searched on
    assert on_cpu.device.type == "cpu" and torch.equal(on_cpu, emb[picked.cpu()])


@pytest.mark.parametrize("backend", ["faiss_flat", "faiss_ivf"])
def test_faiss_gpu_when_usable_else_exact_torch_search_on_the_gpu_with_a_warning(device, cuda_only, backend):
    usable, why = faiss_gpu_status()
    if os.environ.get("RAGTUNE_EXPECT_FAISS_GPU") == "1":
        assert usable, f"faiss-gpu was installed for this GPU but is not usable: {why}"
    emb, q = _data(64)
    ref = _index(backend="exact")
    ref.build(emb)
    want_scores, want_rows = ref.search(q, K)
    # IVF probing all of its 16 lists is exhaustive: the same rows as a flat search
    idx = _index(backend=backend, ivf_nlist=16, ivf_nprobe=16, recall_queries=0)
    idx.build(emb)
    if usable:
        scores, rows = idx.search(q.to(device), K)
        assert (idx.plan.backend, idx.plan.where) == (backend, "faiss-gpu"), idx.plan
    else:
        with pytest.warns(UserWarning, match="faiss-gpu not used"):
            scores, rows = idx.search(q.to(device), K)
        assert (idx.plan.backend, idx.plan.where, idx.plan.device) == ("exact", "torch", "cuda"), idx.plan
        assert "faiss-gpu unusable" in idx.plan.reason
    assert rows.device.type == scores.device.type == "cuda"
    _assert_same_rows(rows, scores, want_rows, want_scores)
