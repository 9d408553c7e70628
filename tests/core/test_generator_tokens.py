"""Token-level generator primitives on a tiny decoder built here: token_logprobs against a naive
full-logits computation (chunking, gradients, masks, ledger), sample_ids (sampling log-probs equal
token_logprobs of the generated ids, eos / stop / length endings, the model's own generation
defaults never inherited, contexts too long refused) and sample / generate going through it."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from ragtune import modelzoo
from ragtune.config import GeneratorConfig, TinyModel
from ragtune.flops import generate_flops
from ragtune.generator import Generator
from ragtune.ledger import Ledger

TEXTS = [
    f"Person{i % 9} was born in Town{i % 5} in {1900 + i}. Person{i % 9} works as a {w} in City{i % 4}."
    for i, w in enumerate(["baker", "pilot", "teacher", "miller", "singer", "farmer"] * 8)
]


def tiny_generator(**over) -> Generator:
    cfg = OmegaConf.structured(
        GeneratorConfig(tiny=TinyModel(hidden=32, layers=1, heads=2, intermediate=64, vocab_size=300, max_position=96))
    )
    for k, v in over.items():
        OmegaConf.update(cfg, k, v)
    tok = modelzoo.train_bpe(TEXTS, cfg.tiny.vocab_size)
    model = modelzoo.tiny_decoder(cfg.tiny, tok, 0)
    model.eval()
    return Generator(model, tok, cfg, Ledger("test"))


@pytest.fixture(scope="module")
def gen() -> Generator:
    g = tiny_generator()
    g.requires_grad_(False)
    return g


def _rows(g: Generator, n: int = 4, seed: int = 0):
    """n ragged (context, target) id lists."""
    rng = torch.Generator().manual_seed(seed)
    V = len(g.tokenizer)
    ctx = [
        torch.randint(3, V, (int(torch.randint(1, 9, (1,), generator=rng)),), generator=rng).tolist() for _ in range(n)
    ]
    tgt = [
        torch.randint(3, V, (int(torch.randint(1, 7, (1,), generator=rng)),), generator=rng).tolist() for _ in range(n)
    ]
    return ctx, tgt


def _naive(model, contexts, targets, temperature=1.0):
    """Per row: full logits of context + target, log_softmax(logits / t) at the target positions."""
    out = []
    for c, a in zip(contexts, targets):
        logits = model(input_ids=torch.tensor([c + a])).logits[0]  # (len, V)
        lp = torch.log_softmax(logits / temperature, dim=-1)
        out.append(torch.stack([lp[len(c) - 1 + t, a[t]] for t in range(len(a))]))
    return out


def _charges(ledger: Ledger, fn):
    before = ledger.deterministic_view()
    result = fn()
    after = ledger.deterministic_view()
    diff = {
        (c, k): tuple(
            after[f"{f}_by_component"][c][k] - before[f"{f}_by_component"].get(c, {}).get(k, 0)
            for f in ("flops", "calls", "tokens", "real_tokens")
        )
        for c, kinds in after["flops_by_component"].items()
        for k in kinds
    }
    return result, {key: v for key, v in diff.items() if v[1]}


# ---- text <-> ids ------------------------------------------------------------------------------
def test_encode_text_adds_no_special_tokens_and_decode_ids_inverts_it(gen):
    text = "Person3 was born in Town2."
    ids = gen.encode_text(text)
    assert ids == gen.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert gen.eos_id not in ids and gen.decode_ids(ids) == text
    assert gen.decode_ids(ids + [gen.eos_id, gen.pad_id]) == text  # special tokens left out


# ---- token_logprobs ----------------------------------------------------------------------------
def test_token_logprobs_equal_a_naive_full_logits_computation():
    g = tiny_generator()
    g.model.double()
    ctx, tgt = _rows(g, 5)
    lm = [[float((t + i) % 3 != 0) for t in range(len(a))] for i, a in enumerate(tgt)]
    for temperature in (1.0, 0.7):
        tok_lp, mask = g.token_logprobs(ctx, tgt, loss_mask=lm, temperature=temperature)
        T = max(len(a) for a in tgt)
        assert tok_lp.shape == mask.shape == (5, T) and tok_lp.dtype == torch.float64
        with torch.no_grad():
            want = _naive(g.model, ctx, tgt, temperature)
        for i, (a, w) in enumerate(zip(tgt, want)):
            n = len(a)
            assert mask[i].tolist() == lm[i] + [0.0] * (T - n)
            m = torch.tensor(lm[i], dtype=torch.bool)
            assert torch.allclose(tok_lp[i, :n][m], w[m], atol=1e-9, rtol=0), i
            assert (tok_lp[i][mask[i] == 0] == 0).all()
    # without a loss mask: every valid position counts, padding does not
    tok_lp, mask = g.token_logprobs(ctx, tgt)
    assert mask.sum().item() == sum(len(a) for a in tgt) and (mask.sum(-1) == torch.tensor([len(a) for a in tgt])).all()


def test_chunk_size_changes_neither_values_nor_gradients():
    g = tiny_generator()
    g.model.double()
    ctx, tgt = _rows(g, 4, seed=1)
    lm = [[1.0] * (len(a) - 1) + [0.0] for a in tgt]
    out = {}
    for chunk in (1, 5, 4096):
        g.cfg.logprob_chunk = chunk
        g.model.zero_grad(set_to_none=True)
        tok_lp, mask = g.token_logprobs(ctx, tgt, loss_mask=lm, temperature=0.8)
        (tok_lp * mask).sum().backward()
        out[chunk] = (tok_lp.detach(), {n: p.grad.clone() for n, p in g.model.named_parameters()})
    for chunk in (1, 5):  # equal up to the order of floating-point sums (float64 here)
        assert torch.allclose(out[chunk][0], out[4096][0], atol=1e-12, rtol=0)
        for n, grad in out[4096][1].items():
            assert torch.allclose(out[chunk][1][n], grad, atol=1e-12, rtol=0), n
    assert any(grad.abs().sum() > 0 for grad in out[4096][1].values())


def test_masked_positions_contribute_exactly_zero_gradient():
    g = tiny_generator(logprob_chunk=3)
    ctx, tgt = _rows(g, 3, seed=2)
    lm = [[1.0] * (len(a) - 1) + [0.0] for a in tgt]  # the last target of every row is masked
    tok_lp, mask = g.token_logprobs(ctx, tgt, loss_mask=lm)
    dropped = tok_lp[mask == 0]  # masked and padding positions
    assert dropped.numel() >= 3 and (dropped == 0).all()
    grads = torch.autograd.grad(dropped.sum(), list(g.model.parameters()), allow_unused=True)
    assert all(x is None or (x == 0).all() for x in grads)
    # changing the masked (last) targets changes nothing the loss sees, gradients included
    loss = lambda targets: (lambda lp, m: (lp * m).sum())(*g.token_logprobs(ctx, targets, loss_mask=lm))
    first = torch.autograd.grad(loss(tgt), list(g.model.parameters()))
    other = [a[:-1] + [(a[-1] + 7) % len(g.tokenizer)] for a in tgt]
    second = torch.autograd.grad(loss(other), list(g.model.parameters()))
    assert all(torch.equal(x, y) for x, y in zip(first, second))
    assert any(x.abs().sum() > 0 for x in first)


def test_the_lm_head_never_sees_more_than_a_chunk_of_positions():
    g = tiny_generator(logprob_chunk=4)
    ctx, tgt = _rows(g, 4, seed=3)
    rows = []
    hook = g._lm_head().register_forward_hook(lambda mod, inp, out: rows.append(out.shape))
    try:
        tok_lp, mask = g.token_logprobs(ctx, tgt)
        (tok_lp * mask).sum().backward()  # checkpointed chunks are recomputed, still 4 positions each
    finally:
        hook.remove()
    T = max(len(a) for a in tgt)
    assert all(len(s) == 2 and s[0] <= 4 for s in rows)
    assert sum(s[0] for s in rows) == 2 * 4 * T  # every chunk once forward, once recomputed in backward


def test_token_logprobs_equal_score_pairs_and_are_charged_the_same(gen):
    qs = ["Where was Person1 born?", "What does Person2 do?"]
    ps = [TEXTS[1], TEXTS[2]]
    ans = ["Town1", "pilot"]
    (want, w_mask), charged_pairs = _charges(gen.ledger, lambda: gen.score_pairs(qs, ps, ans))
    p_ids = [gen.render_prompt(q, [p]) for q, p in zip(qs, ps)]
    (got, mask), charged_tok = _charges(gen.ledger, lambda: gen.token_logprobs(p_ids, gen._answer_ids(ans)))
    assert torch.equal(mask, w_mask)
    assert torch.allclose(got, want, atol=1e-6, rtol=0) and (want != 0).any()
    assert charged_tok == charged_pairs and set(charged_pairs) == {("generator", "score")}


def test_token_logprobs_refuses_bad_input(gen):
    with pytest.raises(ValueError, match="context 0 is empty"):
        gen.token_logprobs([[]], [[5]])
    with pytest.raises(ValueError, match="mask values"):
        gen.token_logprobs([[4]], [[5, 6]], loss_mask=[[1.0]])


# ---- sample_ids --------------------------------------------------------------------------------
def test_sampling_logprobs_equal_token_logprobs_of_the_generated_ids():
    g = tiny_generator(top_k=7, top_p=0.9)  # truncation shapes the sampling, not the log-probs
    ctx, _ = _rows(g, 5, seed=4)
    torch.manual_seed(0)
    out = g.sample_ids(ctx, max_new_tokens=8, temperature=0.7)
    assert [len(x) for x in out.ids] == [len(x) for x in out.logprobs] and all(out.ids)
    assert out.texts == [g.decode_ids(x) for x in out.ids]
    tok_lp, mask = g.token_logprobs(ctx, out.ids, temperature=0.7)
    for i, lp in enumerate(out.logprobs):
        assert torch.allclose(torch.tensor(lp), tok_lp[i, : len(lp)], atol=1e-5, rtol=0), i
    # and not at another temperature: the recorded numbers are the sampling temperature's
    other, _ = g.token_logprobs(ctx, out.ids, temperature=1.0)
    assert not torch.allclose(torch.tensor(out.logprobs[0]), other[0, : len(out.logprobs[0])], atol=1e-3)


def test_greedy_sample_ids_is_hf_greedy_decoding_with_row_budgets(gen):
    ctx, _ = _rows(gen, 3, seed=5)
    out = gen.sample_ids(ctx, max_new_tokens=[2, 6, 4], do_sample=False)
    assert [len(x) for x in out.ids] == [2, 6, 4] and out.finish == ["length"] * 3
    for c, ids in zip(ctx, out.ids):  # one row at a time, no padding: the same tokens
        ref = gen.model.generate(
            input_ids=torch.tensor([c]), max_new_tokens=len(ids), do_sample=False, pad_token_id=gen.pad_id
        )
        assert ref[0, len(c) :].tolist() == ids


def test_eos_and_stop_strings_end_rows_and_cut_their_ids():
    g = tiny_generator()
    ctx, _ = _rows(g, 4, seed=6)
    free = g.sample_ids(ctx, max_new_tokens=8, do_sample=False)
    assert free.finish == ["length"] * 4
    # a stop string that row 0 completes at its third token: ids cut right after that token
    piece = g.decode_ids(free.ids[0][2:3])
    assert piece and piece not in g.decode_ids(free.ids[0][:2])
    out = g.sample_ids(ctx, max_new_tokens=8, do_sample=False, stop=[piece])
    assert out.finish[0] == "stop" and out.ids[0] == free.ids[0][:3] and out.texts[0].endswith(piece)
    assert len(out.logprobs[0]) == 3 and out.logprobs[0] == pytest.approx(free.logprobs[0][:3], abs=1e-6)
    for i in range(1, 4):  # the other rows end at their own stop, or run on unchanged
        hit = [j for j in range(1, 9) if piece in g.decode_ids(free.ids[i][:j])]
        assert out.ids[i] == free.ids[i][: hit[0] if hit else 8]
        assert out.finish[i] == ("stop" if hit else "length")
    # a stop string completed by the budget's last token is a stop, not a length cut
    last = g.sample_ids(ctx[:1], max_new_tokens=3, do_sample=False, stop=[piece])
    assert last.finish == ["stop"] and last.ids[0] == free.ids[0][:3]
    g.cfg.stop = [piece]  # generator.stop applies to every call
    assert g.sample_ids(ctx[:1], max_new_tokens=8, do_sample=False).ids[0] == free.ids[0][:3]
    g.cfg.stop = []
    # make eos the greedy choice wherever row 0's second token would come: row 0 ends there with eos
    head = g._lm_head().weight
    with torch.no_grad():
        head[g.eos_id] = 3 * head[free.ids[0][1]]
    out = g.sample_ids(ctx, max_new_tokens=8, do_sample=False)
    assert out.finish[0] == "eos" and out.ids[0][-1] == g.eos_id and g.eos_id not in out.ids[0][:-1]
    assert all(f in ("eos", "length") for f in out.finish)
    assert all((f == "eos") == (x[-1] == g.eos_id) for f, x in zip(out.finish, out.ids))


def test_the_models_own_generation_defaults_are_never_inherited():
    g = tiny_generator()
    ctx = _rows(g, 2, seed=7)[0] + [list(range(100, 170))]  # a long context: a penalty on its tokens bites
    before = g.sample_ids(ctx, max_new_tokens=8, do_sample=False)
    torch.manual_seed(1)
    sampled = g.sample_ids(ctx, max_new_tokens=8, do_sample=True)
    gc = g.model.generation_config  # what an instruct model may ship
    gc.repetition_penalty, gc.top_k, gc.suppress_tokens = 50.0, 1, [before.ids[0][0]]
    after = g.sample_ids(ctx, max_new_tokens=8, do_sample=False)
    assert after.ids == before.ids and after.logprobs == before.logprobs
    torch.manual_seed(1)
    assert g.sample_ids(ctx, max_new_tokens=8, do_sample=True).ids == sampled.ids  # top_k=1 not inherited either
    assert g.model.generation_config.repetition_penalty == 50.0  # left as it was
    # the same defaults do change HF's defaults-driven greedy decoding (so this test can fail):
    # the suppressed token on row 0, the repetition penalty on the long context
    for i in (0, 2):
        plain = g.model.generate(input_ids=torch.tensor([ctx[i]]), max_new_tokens=8, do_sample=False)
        assert plain[0, len(ctx[i]) :].tolist() != before.ids[i], i


def test_contexts_longer_than_the_model_can_take_are_refused(gen):
    limit = gen.model.config.max_position_embeddings
    with pytest.raises(ValueError, match="exceeds the model's 96 positions"):
        gen.sample_ids([[5] * (limit - 3)], max_new_tokens=4)
    with pytest.raises(ValueError, match="context 0 is empty"):
        gen.sample_ids([[]])
    assert len(gen.sample_ids([[5] * (limit - 4)], max_new_tokens=4, do_sample=False).ids[0]) <= 4


def test_sample_ids_is_charged_as_generation(gen):
    ctx, _ = _rows(gen, 3, seed=8)
    out, charged = _charges(gen.ledger, lambda: gen.sample_ids(ctx, max_new_tokens=5, do_sample=False))
    L, steps = max(len(c) for c in ctx), max(len(x) for x in out.ids)
    flops, calls, tokens, real = charged[("generator", "generate")]
    assert set(charged) == {("generator", "generate")} and calls == 1
    assert flops == generate_flops(gen.shape(), [L] * 3, [steps] * 3)
    assert real == sum(len(c) for c in ctx) + sum(len(x) for x in out.ids)


def test_sample_and_generate_keep_their_texts(gen):
    prompts = [gen.prompt("Where was Person1 born?", TEXTS[1]), "Person4 works as"]
    texts = gen.sample(prompts, max_new_tokens=5, do_sample=False)
    ids = gen._prompt_ids(prompts)
    for p, t in zip(ids, texts):  # HF greedy decoding, cut after eos, decoded and stripped
        row = gen.model.generate(input_ids=torch.tensor([p]), max_new_tokens=5, do_sample=False)[0, len(p) :].tolist()
        row = row[: row.index(gen.eos_id) + 1] if gen.eos_id in row else row
        assert t == gen.tokenizer.decode(row, skip_special_tokens=True).strip()
    assert gen.generate(["Where was Person1 born?"], [TEXTS[1]], max_new_tokens=5) == texts[:1]
