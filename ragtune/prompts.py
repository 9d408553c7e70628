"""Generator prompts: the exact text and token ids the model reads for a question and its passages.

One passage: `generator.prompt_template` ({question}, {passage}), the historical single-passage
prompt. Any other number of passages: `generator.multi_prompt_template` ({question}, {passages}),
`{passages}` being the concatenation of `generator.passage_format.format(i=1-based, passage=...)`,
each passage first cut to `generator.max_passage_tokens` tokens (a single passage has no such cap:
it is cut only when its prompt would not fit).

Cutting a passage to n tokens: tokenise the passage on its own (no special tokens), keep its first
n ids, decode them (special tokens kept, no clean-up of spaces; a trailing partial UTF-8
character is dropped). A passage that already has at most n tokens is kept as is, so rendering
never round-trips an uncut passage through the tokenizer.

Fitting `generator.max_prompt_length`: the ids of a prompt are always the tokenisation of its text
(`encode`), and only passages are ever cut, never the instruction text or the question. A prompt
that is too long is re-rendered with its passages cut further, to the largest budget that fits
(one passage: its token count; several: one common cap on every passage's tokens, so the longest
passages lose most; found by bisection, the prompt length taken as monotone in the budget). If
the prompt does not fit even with every passage cut to nothing, it raises a ValueError naming the
question. A prompt that fits is never touched: for one passage without a chat template its ids
are exactly `tokenizer(prompt_template.format(...))`.

`generator.chat_template=true` wraps the rendered prompt as the user message (after an optional
`generator.system_prompt` system message) in the tokenizer's chat template, with the generation
prompt appended; the length budget counts the wrapped text.
"""

from __future__ import annotations

from typing import Callable, List, Sequence, Tuple


def encode(tokenizer, text: str) -> List[int]:
    """Token ids of `text`, no special tokens added."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def cut(tokenizer, text: str, ids: List[int], n: int) -> str:
    """`text` (whose ids are `ids`) cut to its first n tokens; unchanged when it has at most n."""
    if len(ids) <= n:
        return text
    out = tokenizer.decode(ids[:n], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return out[:-1] if out.endswith("\ufffd") else out


def wrap(tokenizer, cfg, body: str) -> str:
    """The prompt text the model reads: `body` as is, or inside the tokenizer's chat template."""
    if not cfg.chat_template:
        return body
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "config key 'generator.chat_template': true, but the generator's tokenizer has no chat template"
        )
    messages = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    messages.append({"role": "user", "content": body})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def body(cfg, question: str, passages: Sequence[str]) -> str:
    """The un-wrapped prompt of already cut passages."""
    if len(passages) == 1:
        return cfg.prompt_template.format(question=question, passage=passages[0])
    joined = "".join(cfg.passage_format.format(i=i + 1, passage=p) for i, p in enumerate(passages))
    return cfg.multi_prompt_template.format(question=question, passages=joined)


def render(tokenizer, cfg, question: str, passages: Sequence[str]) -> Tuple[str, List[int]]:
    """(text, ids) of the prompt of `question` reading `passages`, fitted to max_prompt_length
    (ValueError naming the question if it cannot fit)."""
    passages = list(passages)
    p_ids = [encode(tokenizer, p) for p in passages]
    single = len(passages) == 1
    # the budget b: one passage -> its first b tokens; several -> every passage cut to b tokens
    longest = max((len(i) for i in p_ids), default=0)
    top = longest if single else min(int(cfg.max_passage_tokens), longest)
    memo = {}

    def at(b: int) -> Tuple[str, List[int]]:
        if b not in memo:
            cuts = [cut(tokenizer, p, i, b) for p, i in zip(passages, p_ids)]
            text = wrap(tokenizer, cfg, body(cfg, question, cuts))
            memo[b] = text, encode(tokenizer, text)
        return memo[b]

    best = at(top)
    over = len(best[1]) - cfg.max_prompt_length
    if over <= 0:
        return best
    n_cut = 1 if single else max(1, sum(len(i) > top - over for i in p_ids))
    b = largest_fitting(lambda b: len(at(b)[1]) <= cfg.max_prompt_length, top, top - -(-over // n_cut))
    if b < 0:
        empty = len(at(0)[1])
        raise ValueError(
            f"the prompt of question {question!r} does not fit generator.max_prompt_length="
            f"{cfg.max_prompt_length}: {empty} tokens with its passages cut to nothing"
        )
    return at(b)


def render_pairs(tokenizer, cfg, questions: Sequence[str], passages: Sequence[str]) -> List[List[int]]:
    """Prompt ids of N (question, one passage) pairs; the fitting ones tokenised in one batch."""
    if cfg.chat_template:
        return [render(tokenizer, cfg, q, [p])[1] for q, p in zip(questions, passages)]
    texts = [cfg.prompt_template.format(question=q, passage=p) for q, p in zip(questions, passages)]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    for i, x in enumerate(ids):
        if len(x) > cfg.max_prompt_length:
            ids[i] = render(tokenizer, cfg, questions[i], [passages[i]])[1]
    return ids


def largest_fitting(fits: Callable[[int], bool], top: int, guess: int) -> int:
    """The largest b in [0, top) with fits(b), -1 if none; `fits(top)` is known False and fits is
    taken as monotone (True up to some b). Bisection whose first two probes are `guess` and its
    neighbour (`guess + 1` if the guess fits, else `guess - 1`): a good guess costs two calls."""
    lo, hi = -1, top  # fits(lo) (virtually at -1), not fits(hi)
    first = min(max(guess, 0), top - 1)
    probes = [first]
    while hi - lo > 1:
        mid = probes.pop() if probes and lo < probes[-1] < hi else (lo + hi) // 2
        ok = fits(mid)
        lo, hi = (mid, hi) if ok else (lo, mid)
        if mid == first:
            probes.append(mid + 1 if ok else mid - 1)
    return lo
