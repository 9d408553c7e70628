"""Generator log-probs, ledger charging by the model wrappers, the dense index, differentiable retrieval."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from ragtune import modelzoo
from ragtune.config import IndexConfig
from ragtune.evaluate import evaluate
from ragtune.index import DenseIndex
from ragtune.ledger import TRAINING_KINDS

from helpers import build, tiny_cfg


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cfg = tiny_cfg(tmp_path_factory.mktemp("run"), "strategy.name=joint", "generator.max_answer_length=5")
    data, m, ledger = build(cfg)
    return cfg, data, m, ledger


def _trainable(m, *modules):
    for p in m.parameters():
        p.requires_grad_(False)
    for mod in modules:
        for p in mod.parameters():
            p.requires_grad_(True)


# --------------------------------------------------------------------------- generator
def test_answer_logprobs_match_independent_forward(built):
    cfg, data, m, _ = built
    gen, gc = m.generator, cfg.generator
    tok, model = gen.tokenizer, gen.model
    _trainable(m)
    passages = [data.corpus.passage_text(p) for p in data.corpus]
    questions = [q.question for q in data.train[:3]]
    ctx = [[passages[0], passages[7]], [passages[3], passages[3][:20]], [passages[50], passages[9]]]
    answers = [data.train[0].answers[0], "x", "Sumras Institute of the far Hosheilt Rangon and more words"]
    with torch.no_grad():
        tok_lp, mask = gen.answer_logprobs(questions, ctx, answers)
    B, K = 3, 2
    a_ids = []
    for a in answers:
        ids = tok(gc.answer_prefix + a, add_special_tokens=False)["input_ids"]
        a_ids.append(ids[: gc.max_answer_length - 1] + [tok.eos_token_id])
    assert len(a_ids[2]) == gc.max_answer_length  # the long answer was cut (eos kept)
    T = max(len(a) for a in a_ids)
    assert tok_lp.shape == (B, K, T) and mask.shape == (B, T)
    for b in range(B):
        n = len(a_ids[b])
        assert mask[b].tolist() == [1.0] * n + [0.0] * (T - n)
        for k in range(K):
            # the prompt's ids as the generator renders them (an over-long passage is cut, never the
            # instruction or question: tests/core/test_prompts.py checks that rendering itself)
            p_ids = gen.render_prompt(questions[b], [ctx[b][k]])
            full = torch.tensor([p_ids + a_ids[b]])
            with torch.no_grad():
                logits = model(input_ids=full).logits[0].double()
            lp = torch.log_softmax(logits, dim=-1)
            want = torch.stack([lp[len(p_ids) - 1 + t, a_ids[b][t]] for t in range(n)]).float()
            assert torch.allclose(tok_lp[b, k, :n], want, atol=1e-5, rtol=0), (b, k)
            assert (tok_lp[b, k, n:] == 0).all()
    # the same answer tokens for every k: the sequence log-likelihood differs only through the passage
    assert not torch.equal(tok_lp[0, 0], tok_lp[0, 1])


def test_answer_logprobs_grad_only_when_generator_trains(built):
    _, data, m, _ = built
    qs, ctx, ans = [data.train[0].question], [[m.passage_texts[0]]], [data.train[0].answers[0]]
    _trainable(m)
    assert not m.generator.answer_logprobs(qs, ctx, ans)[0].requires_grad
    _trainable(m, m.generator.model)
    try:
        assert m.generator.answer_logprobs(qs, ctx, ans)[0].requires_grad
    finally:
        _trainable(m)


# --------------------------------------------------------------------------- ledger charging
def _charged(ledger, fn):
    """(FLOPs counted by FlopCounterMode, {(component, kind): (flops, calls, tokens, real)} charged)."""
    before = ledger.deterministic_view()
    mode = FlopCounterMode(display=False)
    with mode:
        fn()
    after = ledger.deterministic_view()
    out = {}
    for comp, kinds in after["flops_by_component"].items():
        for kind in kinds:
            vals = []
            for f in ("flops", "calls", "tokens", "real_tokens"):
                vals.append(
                    after[f"{f}_by_component"][comp][kind] - before[f"{f}_by_component"].get(comp, {}).get(kind, 0)
                )
            if any(vals):
                out[(comp, kind)] = tuple(vals)
    return int(mode.get_total_flops()), out


def test_ledger_query_encode_no_grad_is_score(built):
    cfg, data, m, ledger = built
    _trainable(m, m.retriever.query_encoder)
    texts = [q.question for q in data.train[:5]]
    with torch.no_grad():
        counted, charged = _charged(ledger, lambda: m.retriever.encode_queries(texts))
    enc = m.retriever.tokenizer(texts, padding=True, truncation=True, max_length=cfg.retriever.max_query_length)
    n_tok = len(enc["input_ids"]) * len(enc["input_ids"][0])
    real = sum(map(sum, enc["attention_mask"]))
    assert charged == {("query_encoder", "score"): (counted, 1, n_tok, real)}
    assert counted > 0 and real < n_tok  # padding exists and is visible
    # a frozen tower under grad mode is also only scored
    _trainable(m)
    counted2, charged2 = _charged(ledger, lambda: m.retriever.encode_queries(texts))
    assert charged2 == {("query_encoder", "score"): (counted2, 1, n_tok, real)} and counted2 == counted


def test_ledger_query_encode_train_counts_forward_and_backward(built):
    _, data, m, ledger = built
    _trainable(m, m.retriever.query_encoder)
    texts = [q.question for q in data.train[:4]]

    def fwd_bwd():
        m.retriever.encode_queries(texts).pow(2).sum().backward()

    with torch.no_grad():
        fwd_only, _ = _charged(ledger, lambda: m.retriever.encode_queries(texts))
    counted, charged = _charged(ledger, fwd_bwd)
    m.zero_grad(set_to_none=True)
    _trainable(m)
    assert set(charged) == {("query_encoder", "train")}
    assert charged[("query_encoder", "train")][:2] == (counted, 1)
    assert counted == 3 * fwd_only  # fully trainable: backward = 2 x forward


def test_ledger_generator_score_and_train(built):
    _, data, m, ledger = built
    qs = [q.question for q in data.train[:3]]
    ctx = [[m.passage_texts[i], m.passage_texts[i + 1]] for i in range(3)]
    ans = [q.answers[0] for q in data.train[:3]]
    _trainable(m)
    counted, charged = _charged(ledger, lambda: m.generator.answer_logprobs(qs, ctx, ans))
    assert set(charged) == {("generator", "score")}
    flops, calls, tokens, real = charged[("generator", "score")]
    assert (flops, calls) == (counted, 1)
    gc, tok = m.generator.cfg, m.generator.tokenizer
    p_lens = [
        len(
            tok(gc.prompt_template.format(question=q, passage=p), add_special_tokens=False)["input_ids"][
                -gc.max_prompt_length :
            ]
        )
        for q, ps in zip(qs, ctx)
        for p in ps
    ]
    a_lens = [
        min(len(tok(gc.answer_prefix + a, add_special_tokens=False)["input_ids"]), gc.max_answer_length - 1) + 1
        for a in ans
    ]
    L = max(p + a_lens[i // 2] for i, p in enumerate(p_lens))
    assert (tokens, real) == (6 * L, sum(p + a_lens[i // 2] for i, p in enumerate(p_lens)))  # B*K = 6 rows

    _trainable(m, m.generator.model)
    counted_t, charged_t = _charged(ledger, lambda: m.generator.answer_logprobs(qs, ctx, ans)[0].sum().backward())
    m.zero_grad(set_to_none=True)
    _trainable(m)
    assert set(charged_t) == {("generator", "train")}
    assert charged_t[("generator", "train")][:2] == (counted_t, 1)
    assert counted_t == 3 * counted


def test_ledger_generate_counts_every_decoding_step(built):
    """Rows that end early keep computing until the longest row ends: charge what really ran."""
    _, data, m, ledger = built
    _trainable(m)
    gen = m.generator
    prompts = [gen.prompt(q.question, m.passage_texts[i]) for i, q in enumerate(data.train[:6])]
    counted, charged = _charged(ledger, lambda: gen.sample(prompts, max_new_tokens=5, do_sample=False))
    assert charged[("generator", "generate")][:2] == (counted, 1)
    # make <eos> win wherever some token t would be generated: rows that generated t stop there
    greedy = [
        gen.tokenizer(o, add_special_tokens=False)["input_ids"]
        for o in gen.sample(prompts, max_new_tokens=5, do_sample=False)
    ]
    head = gen._lm_head().weight
    saved = head[gen.eos_id].clone()
    lengths = set()
    try:
        for t in dict.fromkeys(i for ids in greedy for i in ids[1:]):  # candidate tokens, in order
            with torch.no_grad():
                head[gen.eos_id] = 3 * head[t]
            outs = gen.sample(prompts, max_new_tokens=5, do_sample=False)
            lengths = {len(o) for o in outs}
            if len(lengths) > 1:
                counted, charged = _charged(ledger, lambda: gen.sample(prompts, max_new_tokens=5, do_sample=False))
                break
    finally:
        with torch.no_grad():
            head[gen.eos_id] = saved
    assert len(lengths) > 1, "could not make rows end at different steps"
    assert charged == {("generator", "generate"): charged[("generator", "generate")]}
    assert charged[("generator", "generate")][:2] == (counted, 1)


def test_ledger_index_refresh(built):
    cfg, data, m, ledger = built
    n, bs = len(m.passage_texts), 32
    counted, charged = _charged(ledger, lambda: m.refresh_index(bs))
    assert set(charged) == {("doc_encoder", "index")}
    flops, calls, _, _ = charged[("doc_encoder", "index")]
    assert calls == math.ceil(n / bs) == 4 and flops == counted
    assert len(m.index) == n


def test_ledger_eval_is_not_training_cost(built):
    cfg, data, m, ledger = built
    _trainable(m)
    texts = [q.question for q in data.dev[:3]]
    train_before = ledger.deterministic_view()["flops"]["total_train"]
    with ledger.evaluating():
        counted, charged = _charged(ledger, lambda: m.retriever.encode_queries(texts))
    assert charged == {("query_encoder", "eval"): charged[("query_encoder", "eval")]}
    assert charged[("query_encoder", "eval")][0] == counted
    counted, charged = _charged(ledger, lambda: evaluate(m, data.dev[:3], 2, [1, 2], 8))
    assert charged and all(kind == "eval" for _, kind in charged)
    assert {c for c, _ in charged} >= {"query_encoder", "generator", "index"}
    # every model call and the index search (exact: 2 B H N, one call: single-step recall@k reuses
    # the core decoder's search, kmax = k) are charged; the only uncharged matmul is the retrieval
    # scores (B x K x H)
    B, H, N, K = 3, cfg.retriever.tiny.hidden, len(m.passage_texts), 2
    assert charged[("index", "eval")][:2] == (2 * B * H * N, 1)
    assert sum(v[0] for v in charged.values()) == counted - 2 * B * K * H
    view = ledger.deterministic_view()["flops"]
    assert view["total_train"] == train_before == sum(view[k] for k in TRAINING_KINDS)
    assert view["total"] == view["total_train"] + view["eval"]


# --------------------------------------------------------------------------- dense index
def _index(backend, **kw):
    return DenseIndex(OmegaConf.merge(OmegaConf.structured(IndexConfig), {"backend": backend, **kw}))


def _data(n=500, dim=16, nq=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    emb = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=-1)
    q = torch.nn.functional.normalize(torch.randn(nq, dim, generator=g), dim=-1)
    return emb, q


def test_exact_index_is_brute_force():
    emb, q = _data(n=60, dim=8)
    idx = _index("exact")
    with pytest.raises(RuntimeError):
        idx.search(q, 3)
    idx.build(emb)
    scores, rows = idx.search(q, 5)
    sims = q.double() @ emb.double().T
    want = torch.argsort(sims, dim=-1, descending=True)[:, :5]
    assert torch.equal(rows, want)
    assert torch.allclose(scores.double(), sims.gather(1, want), atol=1e-6)
    assert torch.equal(idx.lookup(rows), emb[rows])
    assert idx.version == 1 and len(idx) == 60
    with pytest.raises(ValueError):
        idx.search(q, 61)
    assert idx.search(q, 60)[1].shape == (20, 60)
    other = _index("exact")
    other.load_state_dict(idx.state_dict())
    assert other.version == 1 and torch.equal(other.search(q, 5)[1], rows)


def test_faiss_flat_equals_exact():
    pytest.importorskip("faiss")
    emb, q = _data()
    exact, flat = _index("exact"), _index("faiss_flat", use_gpu=False)
    exact.build(emb), flat.build(emb)
    s1, r1 = exact.search(q, 10)
    s2, r2 = flat.search(q, 10)
    assert torch.equal(r1, r2) and torch.allclose(s1, s2, atol=1e-5)
    with pytest.raises(ValueError):
        flat.search(q, 501)


@pytest.mark.parametrize("backend", ["faiss_hnsw", "faiss_ivf"])
def test_approximate_indexes_recall(backend):
    pytest.importorskip("faiss")
    emb, q = _data()
    exact, approx = _index("exact"), _index(backend, use_gpu=False)
    exact.build(emb), approx.build(emb)
    k = 10
    _, want = exact.search(q, k)
    scores, rows = approx.search(q, k)
    assert rows.shape == (20, k) and rows.dtype == torch.long
    assert ((rows >= 0) & (rows < 500)).all()
    assert all(len(set(r)) == k for r in rows.tolist())
    assert torch.allclose(scores, (q.unsqueeze(1) * emb[rows]).sum(-1), atol=1e-5)  # true inner products
    hits = sum(len(set(a) & set(b)) for a, b in zip(rows.tolist(), want.tolist()))
    assert hits / (20 * k) >= 0.9
    with pytest.raises(ValueError):
        approx.search(q, 501)
    # a k the approximate search cannot reach must not come back as row -1 (= the last passage)
    try:
        _, rows = approx.search(q, 400)
    except RuntimeError:
        pass
    else:
        assert ((rows >= 0) & (rows < 500)).all()


# --------------------------------------------------------------------------- differentiable retrieval
def _grads(loss, params):
    return [g for g in torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)]


def test_retrieve_scores_and_gradients(built):
    cfg, data, m, _ = built
    questions = [q.question for q in data.train[:4]]
    r = m.retriever
    _trainable(m, r.query_encoder, r.doc_encoder, m.generator.model)
    qp, dp, gp = (list(x.parameters()) for x in (r.query_encoder, r.doc_encoder, m.generator.model))
    try:
        m.doc_trained = False
        ret = m.retrieve(questions, 3)
        assert ret.scores.shape == ret.rows.shape == (4, 3) and ret.scores.requires_grad
        with torch.no_grad():
            q = r.encode_queries(questions)
            sims = q @ m.index.emb.T / r.temperature
        assert torch.equal(ret.rows, sims.topk(3, dim=-1).indices)
        assert torch.allclose(ret.scores, sims.gather(1, ret.rows), atol=1e-5)
        assert ret.ids == [[data.corpus[i].id for i in row] for row in ret.rows.tolist()]
        g = _grads(ret.scores.sum(), qp + dp + gp)
        gq, gd, gg = g[: len(qp)], g[len(qp) : len(qp) + len(dp)], g[len(qp) + len(dp) :]
        assert any(x is not None and x.abs().sum() > 0 for x in gq)
        assert all(x is None for x in gd) and all(x is None for x in gg)

        m.doc_trained = True
        ret2 = m.retrieve(questions, 3)
        assert torch.equal(ret2.rows, ret.rows)
        assert torch.allclose(ret2.scores, ret.scores, atol=1e-4)  # same towers as the index was built with
        g = _grads(ret2.scores.sum(), qp + dp + gp)
        gq, gd, gg = g[: len(qp)], g[len(qp) : len(qp) + len(dp)], g[len(qp) + len(dp) :]
        assert any(x is not None and x.abs().sum() > 0 for x in gq)
        assert any(x is not None and x.abs().sum() > 0 for x in gd)
        assert all(x is None for x in gg)
    finally:
        m.doc_trained = False
        _trainable(m)


def test_retriever_tokenizer_is_deterministic(built):
    _, data, m, _ = built
    texts = [data.corpus.passage_text(p) for p in data.corpus] + [q.question for q in data.train]
    vocabs = [sorted(modelzoo.train_wordpiece(texts, 400).get_vocab().items()) for _ in range(3)]
    assert vocabs[0] == vocabs[1] == vocabs[2]


def test_local_model_folders_load_offline(tmp_path):
    """A saved HF folder loads by path with HF_HUB_OFFLINE=1 (the conftest sets it), for both models;
    a missing one is "path not found" naming the key."""
    from omegaconf import OmegaConf

    from ragtune.config import TinyModel
    from ragtune.modelzoo import ModelLoadError, load_hf, tiny_decoder, tiny_encoder, train_bpe, train_wordpiece

    texts = ["Ann was born in Oslo.", "Bob works for Acme."] * 20
    t = OmegaConf.structured(TinyModel(hidden=16, layers=1, heads=2, intermediate=32, vocab_size=200))
    for kind, tok, model, causal in (
        ("enc", train_wordpiece(texts, 200), tiny_encoder, False),
        ("dec", train_bpe(texts, 200), tiny_decoder, True),
    ):
        folder = tmp_path / kind
        m = model(t, tok, 0)
        m.save_pretrained(folder)
        tok.save_pretrained(folder)
        loaded, _ = load_hf(str(folder), "generator.model", causal=causal)
        got = loaded.state_dict()
        assert all(torch.equal(got[k], v) for k, v in m.state_dict().items())  # the saved weights, by path
    with pytest.raises(ModelLoadError, match="'generator.model': model path not found"):
        load_hf(str(tmp_path / "missing"), "generator.model", causal=True)
    with pytest.raises(ModelLoadError, match="not in the hub cache"):
        load_hf("someorg/some-model-not-cached", "generator.model", causal=True)
