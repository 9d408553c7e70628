"""Precision and placement: float32 retrieval scores and index search under autocast, load dtypes
with float32 master weights for exactly what the run trains (`retriever.dtype`,
`generator.dtype`), the index's GPU placement decision, the models on the device before the
corpus is embedded, evaluation under the training precision, and one copy of passage text."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from ragtune import losses, run
from ragtune.config import IndexConfig
from ragtune.data.schema import ConcatTexts, PassageTexts, passage_text
from ragtune.index import DenseIndex, device_bytes, plan_search
from ragtune.ledger import Ledger

from helpers import build, tiny_cfg

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def _unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(*shape, generator=g), dim=-1)


# --------------------------------------------------------------------------- fp32 under autocast
def test_autocast_would_lower_a_score_matmul_to_bf16():
    q, d = _unit(4, 32), _unit(4, 6, 32, seed=1)
    with torch.autocast(**BF16):  # the premise of the float32 islands: autocast lowers matmuls
        assert torch.einsum("bh,bkh->bk", q, d).dtype == torch.bfloat16


def test_retrieval_scores_are_float32_and_exact_under_autocast(tmp_path):
    cfg = tiny_cfg(tmp_path)
    _, m, _ = build(cfg)
    q, d = _unit(4, 32), _unit(4, 6, 32, seed=1)
    want = torch.einsum("bh,bkh->bk", q.double(), d.double()) / cfg.retriever.temperature
    with torch.autocast(**BF16):
        got = m.retriever.score(q, d)
        enc = m.retriever.encode_queries(["who founded Initech?", "where was Ann born?"])
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), want, atol=1e-5)  # bf16 would be off by up to ~0.06 here
    assert enc.dtype == torch.float32  # pooled and normalised in float32
    assert torch.allclose(enc.norm(dim=-1), torch.ones(2), atol=1e-6)


def test_contrastive_loss_is_the_float32_loss_under_autocast():
    q, d, neg = _unit(3, 16), _unit(5, 16, seed=1), _unit(3, 4, 16, seed=2)
    pos = torch.tensor([0, 2, 4])
    plain = losses.contrastive_loss(q, d, pos, 0.05, hard_negatives=neg)
    with torch.autocast(**BF16):
        mixed = losses.contrastive_loss(q, d, pos, 0.05, hard_negatives=neg)
    assert mixed.dtype == torch.float32 and torch.equal(mixed, plain)


def test_index_search_under_autocast_is_the_float32_search():
    emb = _unit(500, 24, seed=3)
    idx = DenseIndex(OmegaConf.structured(IndexConfig(backend="exact")))
    idx.build(emb)
    q = _unit(70, 24, seed=4)  # more than one chunk of 64 queries
    s0, r0 = idx.search(q, 5)
    with torch.autocast(**BF16):
        s1, r1 = idx.search(q, 5)
    assert s1.dtype == torch.float32 and torch.equal(r1, r0) and torch.equal(s1, s0)


# --------------------------------------------------------------------------- load dtypes
@pytest.mark.parametrize(
    "strategy,fp32",
    [("independent", {"query_encoder", "generator"}), ("none", set())],
)
def test_bf16_loaded_models_keep_float32_exactly_for_what_the_run_trains(tmp_path, strategy, fp32):
    cfg = tiny_cfg(tmp_path, f"strategy.name={strategy}", "retriever.dtype=bfloat16", "generator.dtype=bfloat16")
    _, m, _ = build(cfg)
    mods = {
        "query_encoder": m.retriever.query_encoder,
        "doc_encoder": m.retriever.doc_encoder,
        "generator": m.generator,
    }
    for name, mod in mods.items():
        dtypes = {p.dtype for p in mod.parameters()}
        assert dtypes == ({torch.float32} if name in fp32 else {torch.bfloat16}), name
    assert m.index.emb.dtype == torch.float32  # embedded by a bf16 tower, stored in float32


def test_an_unknown_retriever_dtype_names_its_key(tmp_path):
    from ragtune.config import ConfigError

    with pytest.raises(ConfigError, match="retriever.dtype"):
        tiny_cfg(tmp_path, "retriever.dtype=int8")


# --------------------------------------------------------------------------- GPU placement plan
def test_an_index_that_does_not_fit_the_gpu_is_searched_on_cpu():
    cfg = OmegaConf.structured(IndexConfig(gpu_memory_fraction=0.5))
    n, dim = 1_000_000, 384
    need = device_bytes(cfg, n, dim)
    assert need == n * dim * 4
    assert device_bytes(OmegaConf.structured(IndexConfig(device_dtype="float16")), n, dim) == need // 2
    fits = plan_search(cfg, n, "cuda", dim=dim, free_bytes=2 * need)
    assert (fits.device, fits.where, fits.backend) == ("cuda", "torch", "exact")
    with pytest.warns(UserWarning, match="gpu_memory_fraction"):
        over = plan_search(cfg, n, "cuda", dim=dim, free_bytes=2 * need - 1)
    assert over.device == "cpu" and over.backend == "faiss_ivf"  # planned as for CPU queries: auto -> IVF
    assert "exceeds" in over.reason


def test_lookup_never_reads_a_lower_precision_search_copy():
    emb = _unit(50, 8, seed=5)
    idx = DenseIndex(OmegaConf.structured(IndexConfig(backend="exact")))
    idx.build(emb)
    idx._emb_dev = emb.half()  # as a float16 GPU copy would be (here on the rows' device)
    rows = torch.tensor([[3, 7], [49, 0]])
    out = idx.lookup(rows)
    assert out.dtype == torch.float32 and torch.equal(out, emb[rows])


# --------------------------------------------------------------------------- devices
def test_models_are_on_the_device_before_the_corpus_is_embedded(tmp_path, monkeypatch):
    from ragtune import pipeline

    events = []
    real_to, real_refresh = pipeline.RAGPipeline.to, pipeline.RAGPipeline.refresh_index
    monkeypatch.setattr(pipeline.RAGPipeline, "to", lambda self, *a, **k: events.append("to") or real_to(self, *a, **k))
    monkeypatch.setattr(
        pipeline.RAGPipeline,
        "refresh_index",
        lambda self, *a, **k: events.append("embed") or real_refresh(self, *a, **k),
    )
    cfg = tiny_cfg(tmp_path, "strategy.name=none", "index.cache_initial=false")
    run.seed_everything(0, 1)
    data = run.load_data(cfg.data)
    run.build_pipeline(cfg, data, Ledger("t"), device=torch.device("cpu"))
    assert events and events[0] == "to" and "embed" in events


def test_evaluation_runs_under_the_training_precision(tmp_path, monkeypatch):
    seen = []
    real = run.evaluate
    monkeypatch.setattr(run, "evaluate", lambda *a, **k: seen.append(torch.is_autocast_enabled("cpu")) or real(*a, **k))
    for precision, want in (("bf16", True), ("'no'", False)):
        cfg = tiny_cfg(tmp_path / precision, "strategy.name=none", f"train.precision={precision}", "eval.splits=[dev]")
        data, m, _ = build(cfg)
        (tmp_path / precision).mkdir(exist_ok=True)
        seen.clear()
        run.evaluate_splits(cfg, m, data, tmp_path / precision)
        assert seen == [want]


# --------------------------------------------------------------------------- one copy of the text
def test_the_pipeline_reads_passage_text_from_the_corpus_without_a_copy(tmp_path):
    data, m, _ = build(tiny_cfg(tmp_path, "strategy.name=none"))
    assert isinstance(m.passage_texts, PassageTexts) and m.passage_texts is data.corpus.model_texts
    assert len(m.passage_texts) == len(data.corpus)
    assert list(m.passage_texts) == [passage_text(p) for p in data.corpus]
    assert m.passage_texts[2:5] == [passage_text(data.corpus[i]) for i in range(2, 5)]
    assert m.passage_texts[-1] == passage_text(data.corpus[len(data.corpus) - 1])


def test_concatenated_texts_index_slice_and_iterate_like_the_list():
    a, b = ["x", "y", "z"], ["u", "v"]
    c, ref = ConcatTexts(a, b), a + b
    assert len(c) == 5 and list(c) == ref
    assert [c[i] for i in range(-5, 5)] == [ref[i] for i in range(-5, 5)]
    assert c[1:4] == ref[1:4] and c[::2] == ref[::2]
    with pytest.raises(IndexError):
        c[5]


def test_parts_copied_from_a_trained_bf16_tower_start_in_float32(tmp_path):
    """rl_retriever's Polyak target towers are frozen copies of the trained query tower: they are
    made after the trained built-in components are cast, so they track it in float32."""
    cfg = tiny_cfg(tmp_path, "strategy.name=rl_retriever", "retriever.dtype=bfloat16")
    _, m, _ = build(cfg)
    assert {p.dtype for p in m.retriever.query_encoder.parameters()} == {torch.float32}
    frozen = [part for part in m.strategy.parts() if not part.trainable]
    assert frozen  # the target towers
    for part in frozen:
        assert {p.dtype for p in m.strategy.part_module(part.name).parameters()} == {torch.float32}, part.name


def test_loading_float32_weights_into_a_bf16_parameter_upcasts_it():
    from ragtune.checkpoint import load_weights

    mod = torch.nn.Linear(4, 3).to(torch.bfloat16)
    fine = torch.randn(3, 4) * 1e-3 + mod.weight.float()  # changes far below bf16's resolution
    load_weights(mod, {"weight": fine})
    assert mod.weight.dtype == torch.float32 and torch.equal(mod.weight.data, fine)
    assert mod.bias.dtype == torch.bfloat16  # not in the state: untouched
