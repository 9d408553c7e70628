"""Prompt rendering (ragtune.prompts, Generator.render_prompt): the historical single-passage ids
whenever they fit, passages cut (never the question) to the largest budget that fits, the
multi-passage template, the chat template, the readers of several passages (score_multi,
generate_multi); and the retriever's query / passage prefixes, which reach the tokenizer and the
initial-index cache key."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from ragtune import modelzoo, prompts
from ragtune.config import GeneratorConfig, RetrieverConfig, TinyModel
from ragtune.generator import Generator
from ragtune.index_cache import index_key
from ragtune.ledger import Ledger
from ragtune.retriever import DualEncoder

TEXTS = [
    f"Person{i % 9} was born in Town{i % 5} in {1900 + i}. Person{i % 9} works as a {w} in City{i % 4}."
    for i, w in enumerate(["baker", "pilot", "teacher", "miller", "singer", "farmer"] * 8)
]
LONG = " ".join(TEXTS[:4])  # about 100 tokens
Q = "Where was Person3 born?"
CHAT = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def tok():
    return modelzoo.train_bpe(TEXTS, 300)


def _gen(tok, **over) -> Generator:
    cfg = OmegaConf.structured(GeneratorConfig(tiny=TinyModel(hidden=32, layers=1, heads=2, intermediate=64)))
    for k, v in over.items():
        OmegaConf.update(cfg, k, v)
    model = modelzoo.tiny_decoder(cfg.tiny, tok, 0)
    model.eval()
    model.requires_grad_(False)
    return Generator(model, tok, cfg, Ledger("test"))


def _enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _prefix_cut(tok, text, n):
    return tok.decode(_enc(tok, text)[:n])


# ---- one passage -------------------------------------------------------------------------------
def test_a_fitting_single_passage_prompt_has_exactly_the_historical_ids(tok):
    g = _gen(tok, max_prompt_length=128)
    for p in TEXTS[:6] + [LONG[:150], ""]:
        text = g.cfg.prompt_template.format(question=Q, passage=p)
        historical = _enc(tok, text)[-g.cfg.max_prompt_length :]  # what _prompt_ids always produced
        assert len(_enc(tok, text)) <= g.cfg.max_prompt_length
        assert g.render_prompt(Q, [p]) == g._prompt_ids([g.prompt(Q, p)])[0] == historical
        assert g.prompt(Q, p) == text
        assert prompts.render_pairs(tok, g.cfg, [Q], [p]) == [historical]


def test_an_over_long_single_passage_prompt_cuts_the_passage_to_the_largest_fit(tok):
    g = _gen(tok, max_prompt_length=48)
    full = _enc(tok, g.cfg.prompt_template.format(question=Q, passage=LONG))
    assert len(full) > 48
    text, ids = prompts.render(tok, g.cfg, Q, [LONG])
    # brute force: the longest passage prefix (in its own tokens) whose prompt fits
    n = len(_enc(tok, LONG))
    fits = [
        m
        for m in range(n)
        if len(_enc(tok, g.cfg.prompt_template.format(question=Q, passage=_prefix_cut(tok, LONG, m)))) <= 48
    ]
    best = g.cfg.prompt_template.format(question=Q, passage=_prefix_cut(tok, LONG, max(fits)))
    assert text == best and ids == _enc(tok, best) and len(ids) <= 48
    assert text.startswith("Passage: Person0") and text.endswith(
        f"\nQuestion: {Q}\nAnswer:"
    )  # instruction, question whole
    # every single-passage path reads that prompt: prompt(), render_prompt, the batched pairs
    assert g.prompt(Q, LONG) == text and g.render_prompt(Q, [LONG]) == ids
    assert g._prompt_ids([g.prompt(Q, LONG)])[0] == ids  # no left-truncation left to do
    assert prompts.render_pairs(tok, g.cfg, [Q, Q], [TEXTS[0], LONG]) == [g.render_prompt(Q, [TEXTS[0]]), ids]


def test_a_question_that_does_not_fit_alone_raises_naming_it(tok):
    g = _gen(tok, max_prompt_length=12)
    long_q = "Where was the person who works as a teacher in City3 born, and when?"
    with pytest.raises(ValueError, match="Where was the person who works as a teacher"):
        g.render_prompt(long_q, [TEXTS[0]])
    with pytest.raises(ValueError, match="does not fit generator.max_prompt_length=12"):
        g.score_pairs([long_q], [TEXTS[0]], ["x"])
    with pytest.raises(ValueError, match="teacher in City3"):
        g.render_prompt(long_q, [TEXTS[0], TEXTS[1]])


def test_largest_fitting_is_bisection_with_a_guess():
    calls = []

    def fits(limit):
        return lambda b: calls.append(b) or b <= limit

    for limit in (-1, 0, 3, 17, 29):
        for guess in (-5, 0, 10, 40):
            calls.clear()
            assert prompts.largest_fitting(fits(limit), 30, guess) == (limit if limit < 30 else 29)
            assert len(calls) <= 7
    calls.clear()
    assert prompts.largest_fitting(fits(12), 30, 12) == 12 and calls == [12, 13]  # a right guess: two calls


# ---- several passages --------------------------------------------------------------------------
def test_several_passages_use_the_multi_template_each_cut_to_max_passage_tokens(tok):
    g = _gen(tok, max_passage_tokens=6, max_prompt_length=200)
    ps = [TEXTS[0], "Town4.", TEXTS[2]]
    want_p = [_prefix_cut(tok, TEXTS[0], 6), "Town4.", _prefix_cut(tok, TEXTS[2], 6)]
    joined = "".join(f"({i + 1}) {p}\n" for i, p in enumerate(want_p))
    text, ids = prompts.render(tok, g.cfg, Q, ps)
    assert text == f"Passages:\n{joined}Question: {Q}\nAnswer:" and ids == _enc(tok, text)
    assert g.render_prompt(Q, ps) == ids
    assert len(_enc(tok, want_p[0])) == 6 and want_p[0] != TEXTS[0]  # really cut
    # no passage: the multi template, empty
    assert prompts.render(tok, g.cfg, Q, [])[0] == f"Passages:\nQuestion: {Q}\nAnswer:"


def test_over_long_multi_passage_prompts_share_one_largest_token_cap(tok):
    g = _gen(tok, max_passage_tokens=40, max_prompt_length=60)
    ps = [TEXTS[0], TEXTS[1], "Town4."]
    text, ids = prompts.render(tok, g.cfg, Q, ps)
    assert len(ids) <= 60 and text.endswith(f"Question: {Q}\nAnswer:")

    def at(cap):
        cut = [p if len(_enc(tok, p)) <= cap else _prefix_cut(tok, p, cap) for p in ps]
        return prompts.body(g.cfg, Q, cut)

    caps = [c for c in range(40) if len(_enc(tok, at(c))) <= 60]
    assert text == at(max(caps)) and max(caps) < 40 and len(_enc(tok, at(40))) > 60
    assert "(3) Town4.\n" in text  # a short passage keeps all of its tokens


# ---- chat template -----------------------------------------------------------------------------
def test_chat_template_wraps_the_prompt_as_the_user_message(tok):
    chat_tok = modelzoo.train_bpe(TEXTS, 300)
    chat_tok.chat_template = CHAT
    g = _gen(chat_tok, chat_template=True, system_prompt="Answer briefly.", max_prompt_length=200)
    text, ids = prompts.render(chat_tok, g.cfg, Q, [TEXTS[0]])
    user = g.cfg.prompt_template.format(question=Q, passage=TEXTS[0])
    assert text == f"<|system|>Answer briefly.\n<|user|>{user}\n<|assistant|>"
    assert ids == _enc(chat_tok, text) == g.render_prompt(Q, [TEXTS[0]])
    msgs = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": user}]
    assert text == chat_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    g.cfg.system_prompt = ""
    assert prompts.render(chat_tok, g.cfg, Q, [TEXTS[0]])[0] == f"<|user|>{user}\n<|assistant|>"
    # the length budget counts the wrapping: an over-long chat prompt cuts the passage to fit
    g.cfg.max_prompt_length = 70
    text, ids = prompts.render(chat_tok, g.cfg, Q, [LONG])
    assert (
        len(ids) <= 70
        and LONG not in text
        and text.startswith("<|user|>Passage: Person0")
        and text.endswith(f"{Q}\nAnswer:\n<|assistant|>")
    )
    with pytest.raises(ValueError, match="has no chat template"):
        prompts.render(tok, g.cfg, Q, [TEXTS[0]])  # the plain tokenizer


# ---- readers of several passages ---------------------------------------------------------------
def test_score_multi_and_generate_multi_read_the_rendered_prompt(tok):
    g = _gen(tok, max_passage_tokens=12, max_new_tokens=4)
    qs, lists, ans = [Q, "What does Person1 do?"], [[TEXTS[0], TEXTS[3]], [TEXTS[1]]], ["Town3", "pilot"]
    tok_lp, mask = g.score_multi(qs, lists, ans)
    want, w_mask = g.token_logprobs([g.render_prompt(q, ps) for q, ps in zip(qs, lists)], g._answer_ids(ans))
    assert torch.equal(mask, w_mask) and torch.allclose(tok_lp, want, atol=1e-6, rtol=0)
    single, _ = g.score_pairs(qs[1:], [TEXTS[1]], ans[1:])  # one passage: the single-passage prompt
    assert torch.equal(tok_lp[1:, : single.shape[1]], single)
    out = g.generate_multi(qs, lists)
    ref = g.sample_ids([g.render_prompt(q, ps) for q, ps in zip(qs, lists)], do_sample=False)
    assert out == [t.strip() for t in ref.texts] and all(len(x) <= 4 for x in ref.ids)
    with pytest.raises(ValueError, match="equal, non-empty"):
        g.score_multi(qs, lists[:1], ans)


# ---- retriever prefixes ------------------------------------------------------------------------
class _Seen:
    """A tokenizer wrapper that records the texts it is asked to tokenise."""

    def __init__(self, tok):
        self.tok, self.texts = tok, []

    def __call__(self, texts, **kw):
        self.texts += list(texts)
        return self.tok(texts, **kw)

    def get_vocab(self):
        return self.tok.get_vocab()


def _retriever(**over):
    cfg = OmegaConf.structured(RetrieverConfig(tiny=TinyModel(hidden=32, layers=1, heads=2, intermediate=64)))
    for k, v in over.items():
        OmegaConf.update(cfg, k, v)
    wp = modelzoo.train_wordpiece(TEXTS, 200)
    enc = modelzoo.tiny_encoder(cfg.tiny, wp, 0)
    return DualEncoder(enc, enc, _Seen(wp), cfg, Ledger("test"))


def test_e5_prefixes_reach_the_tokenizer_and_the_index_cache_key():
    r = _retriever(query_prefix="query: ", passage_prefix="passage: ")
    with torch.no_grad():
        q = r.encode_queries(["who is person1?"])
        d = r.encode_passages([TEXTS[0]])
        r.encode([TEXTS[0]], r.doc_encoder, "posterior", 32)  # the generic path: texts as given
    assert r.tokenizer.texts == ["query: who is person1?", f"passage: {TEXTS[0]}", TEXTS[0]]
    plain = _retriever()
    with torch.no_grad():
        assert not torch.allclose(plain.encode_queries(["who is person1?"]), q)
        assert not torch.allclose(plain.encode_passages([TEXTS[0]]), d)
    assert plain.tokenizer.texts == ["who is person1?", TEXTS[0]]
    rag = lambda r: SimpleNamespace(retriever=r, passage_texts=TEXTS[:5])
    key = index_key(rag(plain), 8)
    assert index_key(rag(_retriever(passage_prefix="passage: ")), 8) != key
    assert index_key(rag(_retriever(query_prefix="query: ")), 8) == key  # queries are not in the index
