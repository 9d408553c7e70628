"""The core decoders (ragtune.decoding): RAG-Token mixture decoding against plain greedy decoding,
RAG-Sequence thorough / fast against greedy_rescore and brute-force marginals, beam search scores
against full forwards, hand-computable cases on a character bigram model, ledger charges against
a FLOP counter, and the decoder evaluate() records (eval.decoder, auto = Strategy.default_decoder)."""

from __future__ import annotations

import math
import string
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ragtune import decoding, run
from ragtune.evaluate import evaluate
from ragtune.generator import Generator
from ragtune.ledger import Ledger
from ragtune.pipeline import Retrieval
from ragtune.strategy import Strategy

from helpers import build, tiny_cfg

MAX_NEW = 5


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The tiny pipeline, its <eos> made likely enough that greedy answers end at different steps."""
    cfg = tiny_cfg(tmp_path_factory.mktemp("run"), "strategy.name=none", f"generator.max_new_tokens={MAX_NEW}")
    data, m, ledger = build(cfg)
    m.requires_grad_(False)
    m.eval()
    gen, qs = m.generator, data.dev[:8]
    prompts = [gen.prompt(q.question, m.passage_texts[i]) for i, q in enumerate(qs)]
    head = gen._lm_head().weight
    for t in dict.fromkeys(i for ids in _hf_greedy(gen, prompts) for i in ids[1:]):
        head[gen.eos_id] = 3 * head[t]
        if len({len(ids) for ids in _hf_greedy(gen, prompts)}) > 1:
            break
    assert len({len(ids) for ids in _hf_greedy(gen, prompts)}) > 1, "could not make answers end at different steps"
    return cfg, data, m, ledger


def _hf_greedy(gen, prompts):
    """HF greedy decoding exactly as Generator.sample runs it: new ids per prompt, cut after <eos>."""
    p_ids = gen._prompt_ids(prompts)
    L = max(len(p) for p in p_ids)
    ids = torch.full((len(p_ids), L), gen.pad_id)
    attn = torch.zeros_like(ids)
    for i, p in enumerate(p_ids):
        ids[i, L - len(p) :], attn[i, L - len(p) :] = torch.tensor(p), 1
    out = gen.model.generate(
        input_ids=ids, attention_mask=attn, max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=gen.pad_id
    )
    rows = out[:, L:].tolist()
    return [r[: r.index(gen.eos_id) + 1] if gen.eos_id in r else r for r in rows]


def _retrieval(m, questions, k):
    return m.retrieve(questions, k)


def _flops(ledger):
    return ledger.deterministic_view()["flops"]["total"]


# ---- RAG-Token --------------------------------------------------------------------------------
def test_token_mixture_with_one_passage_is_greedy_decoding_token_for_token(built):
    _, data, m, ledger = built
    gen, qs = m.generator, data.dev[:8]
    ret = _retrieval(m, [q.question for q in qs], 1)
    prompts = [gen.prompt(q.question, ps[0]) for q, ps in zip(qs, ret.texts)]
    f0 = _flops(ledger)
    hyps = decoding.beam_search(gen, prompts, torch.log_softmax(ret.scores, -1), 1)
    ours = _flops(ledger) - f0
    f0 = _flops(ledger)
    texts = gen.generate([q.question for q in qs], [ps[0] for ps in ret.texts])
    theirs = _flops(ledger) - f0
    assert [h[0].tokens for h in hyps] == _hf_greedy(gen, prompts)
    assert any(h[0].finished for h in hyps) and len({len(h[0].tokens) for h in hyps}) > 1  # rows end at different steps
    assert [p["prediction"] for p in decoding.decode("token_mixture", m, qs, ret, 1)] == texts
    assert ours == theirs > 0  # charged as Generator.sample charges the same decoding


def test_token_mixture_follows_the_passage_whose_prior_is_one(built):
    _, data, m, _ = built
    gen, qs = m.generator, data.dev[:6]
    ret = _retrieval(m, [q.question for q in qs], 2)
    dom = [b % 2 for b in range(len(qs))]  # passage 0 dominates on even questions, passage 1 on odd ones
    scores = torch.tensor([[0.0, -60.0] if d == 0 else [-60.0, 0.0] for d in dom])
    ret = Retrieval(ret.rows, scores, ret.texts, ret.ids)
    want = gen.generate([q.question for q in qs], [ps[d] for ps, d in zip(ret.texts, dom)])
    assert [p["prediction"] for p in decoding.decode("token_mixture", m, qs, ret, 1)] == want
    assert len(set(want)) > 1 or ret.texts[0][0] != ret.texts[0][1]


# ---- RAG-Sequence -----------------------------------------------------------------------------
def test_thorough_with_one_beam_is_greedy_rescore(built):
    _, data, m, _ = built
    qs = data.dev[:8]
    ret = _retrieval(m, [q.question for q in qs], 3)
    greedy = [p["prediction"] for p in decoding.decode("greedy_rescore", m, qs, ret)]
    assert [p["prediction"] for p in decoding.decode("thorough", m, qs, ret, 1)] == greedy
    assert [p["retrieved_ids"] for p in decoding.decode("thorough", m, qs, ret, 1)] == ret.ids


def test_thorough_picks_the_exact_marginal_argmax(built):
    _, data, m, _ = built
    gen, qs = m.generator, data.dev[:5]
    ret = _retrieval(m, [q.question for q in qs], 2)
    beams = decoding.passage_beams(gen, [q.question for q in qs], ret, 2)
    prior = torch.log_softmax(ret.scores, -1)
    preds = [p["prediction"] for p in decoding.decode("thorough", m, qs, ret, 2)]
    for b, q in enumerate(qs):
        cands = list(dict.fromkeys(decoding.text(gen, h) for hs in beams[b] for h in hs))
        assert len(cands) > 1  # a real choice
        marg = {}
        for y in cands:  # brute force: every (y, z_k) pair scored on its own
            lps = [float(gen.answer_logprobs([q.question], [[p]], [y])[0].sum()) for p in ret.texts[b]]
            marg[y] = torch.logsumexp(prior[b] + torch.tensor(lps), 0).item()
        assert marg[preds[b]] == pytest.approx(max(marg.values()), abs=1e-5)


def test_fast_scores_of_generated_pairs_are_answer_logprobs(built):
    _, data, m, _ = built
    gen, qs = m.generator, data.dev[:5]
    questions = [q.question for q in qs]
    ret = _retrieval(m, questions, 2)
    beams = decoding.passage_beams(gen, questions, ret, 2)
    tables = decoding.generated_logprobs(gen, questions, ret, 2)
    prior = torch.log_softmax(ret.scores, -1)
    preds = [p["prediction"] for p in decoding.decode("fast", m, qs, ret, 2)]
    for b, (cands, lp) in enumerate(tables):
        assert lp.shape == (len(cands), 2)
        for c, y in enumerate(cands):
            for k, p in enumerate(ret.texts[b]):
                generated = y in {decoding.text(gen, h) for h in beams[b][k]}
                assert math.isfinite(lp[c, k]) == generated  # p(y|x,z) = 0 where z's beam did not produce y
                if generated:
                    assert lp[c, k].item() == pytest.approx(
                        gen.answer_logprobs([questions[b]], [[p]], [y])[0].sum().item(), abs=1e-4
                    )
        assert preds[b] == cands[int(torch.logsumexp(prior[b] + lp, -1).argmax())]


# ---- beam search ------------------------------------------------------------------------------
def test_beam_hypotheses_are_sorted_true_logprobs_at_least_greedy(built):
    _, data, m, _ = built
    gen = m.generator
    prompts = [gen.prompt(q.question, m.passage_texts[i]) for i, q in enumerate(data.dev[:6])]
    greedy = decoding.beam_search(gen, prompts, torch.zeros(6, 1), 1)
    beam = decoding.beam_search(gen, prompts, torch.zeros(6, 1), 3)
    for p, g, hs in zip(gen._prompt_ids(prompts), greedy, beam):
        assert len(hs) == 3 and len({tuple(h.tokens) for h in hs}) == 3
        assert [h.score for h in hs] == sorted((h.score for h in hs), reverse=True)
        assert hs[0].score >= g[0].score - 1e-5  # holds here (not a theorem; the bigram case shows a strict gain)
        for h in hs:  # each score is the sum of its tokens' log-probs under one uncached forward
            x = torch.tensor([p + h.tokens])
            lp = torch.log_softmax(gen.model(input_ids=x).logits[0, len(p) - 1 : -1].float(), -1)
            assert h.score == pytest.approx(lp.gather(1, torch.tensor(h.tokens)[:, None]).sum().item(), abs=1e-4)
            assert h.finished == (h.tokens[-1] == gen.eos_id) and len(h.tokens) <= MAX_NEW


def test_beam_search_charges_what_a_flop_counter_counts(built):
    _, data, m, ledger = built
    qs = data.dev[:4]
    ret = _retrieval(m, [q.question for q in qs], 2)
    before = ledger.deterministic_view()["flops"]["total"]
    mode = FlopCounterMode(display=False)
    with mode:
        decoding.token_mixture(m, qs, ret, 3)  # prefill on B*K rows, then B*3*K rows per step
    assert ledger.deterministic_view()["flops"]["total"] - before == mode.get_total_flops() > 0


# ---- hand-computable cases: a character bigram model -------------------------------------------
CHARS = string.ascii_letters + string.digits + string.punctuation + " \n"


class CharTok:
    """One id per character; <eos> is the last id."""

    eos_token_id = pad_token_id = len(CHARS)

    def __len__(self):
        return len(CHARS) + 1

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[CHARS.index(c) for c in t] for t in texts]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(CHARS[i] for i in ids if i != self.eos_token_id)


class KeyCache:
    def __init__(self, keys):
        self.keys = keys

    def reorder_cache(self, idx):
        self.keys = self.keys[idx]


class Bigram(nn.Module):
    """log p(next | row) = table[key, last char]: key = the first digit in the row (the passage)."""

    def __init__(self, table):  # (keys, V, V)
        super().__init__()
        n, V = table.shape[0], table.shape[-1]
        self.V, self.head = V, nn.Linear(n * V, V, bias=False)
        self.head.weight.data = table.permute(2, 0, 1).reshape(V, n * V)  # weight[v, key*V + t] = table[key, t, v]
        self.config = SimpleNamespace(num_hidden_layers=1, hidden_size=4, num_attention_heads=1)

    def keys(self, ids, attn):
        text = [
            "".join(CHARS[t] for t, a in zip(r, ra) if a and t < len(CHARS))
            for r, ra in zip(ids.tolist(), attn.tolist())
        ]
        return torch.tensor([int(next(c for c in t if c.isdigit())) for t in text])

    def states(self, ids, keys):  # one-hot of (key, char): the head's input
        return nn.functional.one_hot(keys[:, None] * self.V + ids, self.head.in_features).float()

    def get_decoder(self):
        return lambda input_ids, attention_mask: SimpleNamespace(
            last_hidden_state=self.states(input_ids, self.keys(input_ids, attention_mask))
        )

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, attention_mask, position_ids=None, cache=None, use_cache=True, logits_to_keep=0):
        cache = KeyCache(self.keys(input_ids, attention_mask)) if cache is None else cache
        return SimpleNamespace(logits=self.head(self.states(input_ids[:, -1:], cache.keys)), cache=cache)


def _bigram(built, spec, n_keys=2):
    """A Generator over Bigram: spec {key: {prev: {next: p}}} ('$' = <eos>); ':' -> ' ' always and
    every letter -> <eos> unless spec says otherwise; unspecified entries get ~e^-30."""
    cfg = built[0]
    V = len(CHARS) + 1
    ix = lambda c: V - 1 if c == "$" else CHARS.index(c)
    table = torch.full((n_keys, V, V), -30.0)
    for key in range(n_keys):
        table[key, ix(":"), ix(" ")] = 0.0
        for c in string.ascii_letters:
            table[key, ix(c), V - 1] = 0.0
        for prev, nxt in spec.get(key, {}).items():
            table[key, ix(prev)] = -30.0
            for c, p in nxt.items():
                table[key, ix(prev), ix(c)] = math.log(p)
    gen = Generator(Bigram(torch.log_softmax(table, -1)), CharTok(), cfg.generator, Ledger("test"))
    return SimpleNamespace(generator=gen)


def _ret(prior):
    k = len(prior)
    return Retrieval(
        torch.arange(k)[None],
        torch.tensor([prior]).log(),
        [[str(i) for i in range(k)]],
        [[f"p{i}" for i in range(k)]],
    )


Q = [SimpleNamespace(question="who?")]
PROMPTS = [f"Passage: {k}\nQuestion: who?\nAnswer:" for k in (0, 1)]  # the prompts of _ret's passages


def test_token_mixture_argmax_by_hand(built):
    p = {0: {"a": 0.6, "b": 0.4}, 1: {"c": 0.55, "b": 0.45}}  # p(first letter | z)
    rag = _bigram(built, {k: {" ": v} for k, v in p.items()})
    for prior in ([0.5, 0.5], [0.8, 0.2]):
        mix = {y: sum(w * p[k].get(y, 0.0) for k, w in enumerate(prior)) for y in "abc"}
        want = max(mix, key=mix.get)  # b at an even prior; a at 0.8 / 0.2
        assert decoding.decode("token_mixture", rag, Q, _ret(prior), 1)[0]["prediction"] == want
        hyps = decoding.beam_search(rag.generator, PROMPTS, torch.tensor([prior]).log(), 3)[0]
        ranked = sorted(mix, key=mix.get, reverse=True)  # every answer, by its mixture probability
        assert [decoding.text(rag.generator, h) for h in hyps] == ranked
        assert [h.score for h in hyps] == pytest.approx([math.log(mix[y]) for y in ranked], abs=1e-6)
    # each passage alone decodes greedily to its own first letter, neither being the mixture's b
    assert decoding.decode("token_mixture", rag, Q, _ret([1.0, 1e-30]), 1)[0]["prediction"] == "a"
    assert decoding.decode("token_mixture", rag, Q, _ret([1e-30, 1.0]), 1)[0]["prediction"] == "c"


def test_beam_search_beats_greedy_by_hand(built):
    rag = _bigram(built, {0: {" ": {"a": 0.6, "b": 0.4}, "a": {"x": 0.55, "y": 0.45}}})
    greedy = decoding.beam_search(rag.generator, PROMPTS[:1], torch.zeros(1, 1), 1)[0]
    beam = decoding.beam_search(rag.generator, PROMPTS[:1], torch.zeros(1, 1), 2)[0]
    text = lambda h: decoding.text(rag.generator, h)
    assert [text(h) for h in greedy] == ["ax"] and greedy[0].score == pytest.approx(math.log(0.33), abs=1e-6)
    assert text(beam[0]) == "b" and beam[0].score == pytest.approx(math.log(0.4), abs=1e-6)
    assert text(beam[1]) == "ax" and beam[1].score == pytest.approx(math.log(0.33), abs=1e-6)
    assert decoding.decode("thorough", rag, Q, _ret([1.0]), 2)[0]["prediction"] == "b"
    assert decoding.decode("thorough", rag, Q, _ret([1.0]), 1)[0]["prediction"] == "ax"
    # an early <eos> outside the top `beams` candidates is not taken: one beam stays greedy decoding
    rag = _bigram(built, {0: {" ": {"a": 0.6, "$": 0.4}, "a": {"x": 0.55, "y": 0.45}}})
    assert [text(h) for h in decoding.beam_search(rag.generator, PROMPTS[:1], torch.zeros(1, 1), 1)[0]] == ["ax"]
    beam = decoding.beam_search(rag.generator, PROMPTS[:1], torch.zeros(1, 1), 2)[0]
    assert [text(h) for h in beam] == ["", "ax"] and beam[0].score == pytest.approx(math.log(0.4), abs=1e-6)
    # as in HF / fairseq, an <eos> is taken only among the top `beams` candidates: " b<eos>" (.2) ranks
    # third when it appears, so it is dropped and the beam's second answer is " ax<eos>" (.15)
    y = dict.fromkeys("$zwvu", 0.2)
    rag = _bigram(built, {0: {" ": {"a": 0.5, "b": 0.5}, "a": {"$": 0.7, "x": 0.3}, "b": {"$": 0.4, "y": 0.6}, "y": y}})
    beam = decoding.beam_search(rag.generator, PROMPTS[:1], torch.zeros(1, 1), 2)[0]
    assert [text(h) for h in beam] == ["a", "ax"]
    assert [h.score for h in beam] == pytest.approx([math.log(0.35), math.log(0.15)], abs=1e-6)


def _score_calls(gen):
    """Scoring forwards (answer_logprobs) charged so far under the generator's name."""
    return gen.ledger.deterministic_view()["calls_by_component"].get(gen.component, {}).get("score", 0)


def test_thorough_and_fast_by_hand(built):
    p = {0: {"a": 0.55, "b": 0.45}, 1: {"c": 0.6, "a": 0.35, "b": 0.05}}
    rag = _bigram(built, {k: {" ": v} for k, v in p.items()})
    prior, cands = [0.5, 0.5], ["a", "c"]  # the greedy answer of each passage
    thorough = {y: sum(w * p[k].get(y, 0.0) for k, w in enumerate(prior)) for y in cands}  # a: .45, c: .30
    fast = {"a": prior[0] * p[0]["a"], "c": prior[1] * p[1]["c"]}  # a: .275, c: .30
    assert max(thorough, key=thorough.get) == "a" and max(fast, key=fast.get) == "c"
    assert decoding.decode("thorough", rag, Q, _ret(prior), 1)[0]["prediction"] == "a"
    assert decoding.decode("fast", rag, Q, _ret(prior), 1)[0]["prediction"] == "c"
    assert decoding.decode("fast", rag, Q, _ret([0.6, 0.4]), 1)[0]["prediction"] == "a"  # .33 > .24: the prior counts
    calls = _score_calls(rag.generator)
    [(ys, lp)] = decoding.generated_logprobs(rag.generator, ["who?"], _ret(prior), 1)
    assert _score_calls(rag.generator) == calls  # canonical hypotheses: their beam scores, no forward pass
    assert ys == cands and lp[0, 1] == lp[1, 0] == float("-inf")
    assert lp[:, [0, 1]].diagonal().tolist() == pytest.approx([math.log(0.55), math.log(0.6)], abs=1e-6)


def test_fast_rescores_a_pair_the_beam_tokenised_differently(built):
    # passage 1 answers "c" without the answer prefix ' ': as an answer string, " c" is then improbable
    rag = _bigram(built, {0: {" ": {"a": 1.0}}, 1: {":": {"c": 1.0}}})
    gen = rag.generator
    [(ys, lp)] = decoding.generated_logprobs(gen, ["who?"], _ret([0.5, 0.5]), 1)
    assert ys == ["a", "c"] and _score_calls(gen) == 1  # one forward, for the one non-canonical pair
    want = gen.answer_logprobs(["who?"], [["1"]], ["c"])[0].sum().item()
    assert lp[1, 1].item() == pytest.approx(want, abs=1e-5) and want < -25  # not the beam's log 1 = 0
    assert lp[0, 0].item() == pytest.approx(0.0, abs=1e-6)
    assert decoding.decode("fast", rag, Q, _ret([0.5, 0.5]), 1)[0]["prediction"] == "a"


# ---- wiring -----------------------------------------------------------------------------------
class Chooser(Strategy):
    name = "chooser"

    def __init__(self, decoder):
        super().__init__()
        self.decoder = decoder

    def phases(self):
        return []

    def default_decoder(self):
        return self.decoder


def test_evaluate_records_the_decoder_and_auto_follows_the_strategy(built):
    _, data, m, _ = built
    qs = data.dev[:4]
    real = m.strategy
    try:
        m.strategy = Chooser("token_mixture")
        auto = evaluate(m, qs, 2, [1], 4, beams=1)
        assert auto["decoder"] == "token_mixture(greedy)"
        ret = m.make_retrieval(
            m.encode_questions([q.question for q in qs]), m.search(m.encode_questions([q.question for q in qs]), 2)
        )
        assert [r["prediction"] for r in auto["predictions"]] == [
            p["prediction"] for p in decoding.token_mixture(m, qs, ret, 1)
        ]
        assert evaluate(m, qs, 2, [1], 4, decoder="thorough", beams=2)["decoder"] == "thorough(beams=2)"
        assert evaluate(m, qs, 2, [1], 4, decoder="auto", beams=3)["decoder"] == "token_mixture(beams=3)"
        oracle = evaluate(m, qs, 2, [1], 4, oracle=True, decoder="fast", beams=2)
        assert oracle["decoder"] == "fast(beams=2)" and oracle["oracle"] is True
        m.strategy = Chooser("greedy_rescore")
        assert evaluate(m, qs, 2, [1], 4, beams=5)["decoder"] == "greedy_rescore"
        m.strategy = Chooser("nucleus")
        with pytest.raises(ValueError, match="chooser.*'nucleus'"):
            evaluate(m, qs, 2, [1], 4)
    finally:
        m.strategy = real


def test_oracle_uses_the_chosen_decoder_on_gold_first_passages(built):
    _, data, m, _ = built
    qs = [q for q in data.dev if q.gold_passage_ids][:4]
    res = evaluate(m, qs, 2, [1], 4, oracle=True, decoder="token_mixture", beams=2)
    q = m.encode_questions([x.question for x in qs])
    ret = m.make_retrieval(q, m.gold_first_rows(qs, 2, q=q))
    assert [r["prediction"] for r in res["predictions"]] == [
        p["prediction"] for p in decoding.token_mixture(m, qs, ret, 2)
    ]


def test_run_passes_eval_decoder_and_beams(built, monkeypatch, tmp_path):
    cfg, data, m, _ = built
    seen = {}
    monkeypatch.setattr(run, "evaluate", lambda *a, **kw: seen.update(kw) or {"predictions": []})
    cfg = tiny_cfg(tmp_path, "eval.decoder=fast", "eval.beams=3", "eval.splits=[dev]")
    run.evaluate_splits(cfg, m, data, tmp_path)
    assert seen["decoder"] == "fast" and seen["beams"] == 3


def test_labels_and_unknown_names():
    assert decoding.label("greedy_rescore", 4) == "greedy_rescore"
    assert decoding.label("fast", 1) == "fast(beams=1)"
    assert decoding.label("token_mixture", 1) == "token_mixture(greedy)"
    with pytest.raises(ValueError, match="unknown decoder 'beam'"):
        decoding.resolve("beam", Strategy())
