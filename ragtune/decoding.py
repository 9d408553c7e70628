"""The core decoders: how a retrieve-then-read pipeline answers (Lewis et al. 2020, RAG, arXiv 2005.11401, sec. 2.5).

Notation: B questions x, K retrieved passages z_k each, prior log p(z_k|x) = log_softmax of the
retrieval scores over the K (B, K); p(y|x,z) is the generator, a decoder-only causal LM reading one
passage per prompt; y = answer_prefix + answer + eos, tokenised as `Generator.answer_logprobs` does.

- `greedy_rescore`: one greedy candidate per passage (`Generator.generate`), every distinct
  candidate y of a question rescored by the exact marginal log sum_k p(z_k|x) p(y|x,z_k) over all
  K (`answer_logprobs`), argmax kept: RAG-Sequence thorough decoding with one beam per passage.
- `thorough` (RAG-Sequence thorough decoding): beam search with `beams` beams on each (x, z_k) on
  its own; all `beams` final hypotheses of every passage are candidates, each distinct candidate
  rescored by the same exact marginal over ALL K passages (one answer_logprobs forward of every
  candidate against every passage: the pairs (y, z) that z's beam did not produce are the extra
  passes). beams=1 gives exactly greedy_rescore's answers.
- `fast` (RAG-Sequence fast decoding): the same beams, but p(y|x,z_k) = 0 for the pairs whose beam
  on z_k did not produce y: score(y) = log sum_{k: y in beam(z_k)} p(z_k|x) p(y|x,z_k), so no
  forward pass for a non-generated pair. log p(y|x,z_k) of a generated pair is its beam score (the
  sum of its token log-probs, eos included, no length penalty) when the generated ids are exactly
  answer_logprobs' tokenisation of the decoded text y; otherwise (cut at max_new_tokens without
  eos, a non-canonical BPE split, a stripped space) that pair alone is scored by one answer_logprobs
  forward. Either way the number is log p(y|x,z_k) of the string y under the tokenisation every
  decoder scores with (`generated_logprobs`, tested against answer_logprobs).
- `token_mixture` (RAG-Token decoding): at every step p(y_t|x,y_<t) = sum_k p(z_k|x)
  p(y_t|x,z_k,y_<t); greedy (beams=1) or beam search over the mixture (beams > 1). The B*K prompts
  run left-padded with one KV cache; a hypothesis owns K rows (one per passage), its chosen token is
  appended to all of them; it stops at eos or generator.max_new_tokens.

`beam_search` is the one search all three beam decoders use: N groups of G rows mixed with log
weights (N, G); G = 1 is plain beam search on one prompt (thorough, fast), G = K is RAG-Token.
Scores are sums of (mixture) token log-probs without length penalty, so an extension never scores
higher than its prefix and the search stops exactly when no live beam can still enter the top
`beams` finished ones. An eos is accepted only among the top `beams` candidates of a step (as in
HF and fairseq). With beams=1 the search is exactly greedy decoding: a top eos ends it, else the
top token extends the one beam.

All decoders run without grad with the generator in eval mode (`decode` sees to it); every model
call is charged to the ledger under the generator's component name (padded prompt lengths,
decoding steps per row, as `Generator.sample` charges). Each returns per question {prediction,
retrieved_ids, metrics: {}}; `label(name, beams)` is the name the evaluation result records.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ragtune.data import Question
from ragtune.flops import generate_flops
from ragtune.ledger import clock

DECODERS = ("greedy_rescore", "thorough", "fast", "token_mixture")


@dataclass
class Hypothesis:
    tokens: List[int]  # generated ids, eos included when finished
    score: float  # sum of the (mixture) log-probs of `tokens`
    finished: bool  # ended with eos (else cut at max_new_tokens)


def resolve(name: str, strategy) -> str:
    """The decoder `name` stands for: "auto" is the strategy's `default_decoder()`."""
    chosen = strategy.default_decoder() if name == "auto" else name
    if chosen not in DECODERS:
        src = f"strategy '{strategy.name}': default_decoder() returned" if name == "auto" else "unknown decoder"
        raise ValueError(f"{src} {chosen!r}; expected one of {DECODERS}")
    return chosen


def label(name: str, beams: int) -> str:
    """The honest name of a decoder run: the beam width wherever it changes the search."""
    if name == "greedy_rescore":
        return name
    if name == "token_mixture":
        return "token_mixture(greedy)" if beams == 1 else f"token_mixture(beams={beams})"
    return f"{name}(beams={beams})"


def decode(name: str, rag, batch: Sequence[Question], ret, beams: int = 2) -> List[dict]:
    """Answer `batch` from the retrieval `ret` (rows (B, K)) with decoder `name` (of DECODERS)."""
    if name not in DECODERS:
        raise ValueError(f"unknown decoder {name!r}; expected one of {DECODERS}")
    if beams < 1:
        raise ValueError(f"beams must be >= 1, got {beams}")
    modes = [(mod, mod.training) for mod in rag.generator.modules()]
    rag.generator.eval()
    try:
        with torch.no_grad():
            if name == "greedy_rescore":
                return greedy_rescore(rag, batch, ret)
            return {"thorough": thorough, "fast": fast, "token_mixture": token_mixture}[name](rag, batch, ret, beams)
    finally:
        for mod, mode in modes:
            mod.training = mode


# ---- the decoders -----------------------------------------------------------------------------
@torch.no_grad()
def greedy_rescore(rag, batch: Sequence[Question], ret) -> List[dict]:
    """One greedy candidate per passage, rescored by the exact marginal over all K."""
    questions, k = [q.question for q in batch], ret.rows.shape[1]
    flat_q = [q for q in questions for _ in range(k)]
    flat_p = [p for ps in ret.texts for p in ps]
    cands = rag.generator.generate(flat_q, flat_p)  # (B*K,)
    per_q = [list(dict.fromkeys(cands[b * k : (b + 1) * k])) for b in range(len(batch))]
    return _answers(ret, rescore(rag.generator, questions, ret, per_q))


@torch.no_grad()
def thorough(rag, batch: Sequence[Question], ret, beams: int) -> List[dict]:
    """RAG-Sequence thorough decoding: every passage's beam candidates, exact marginal over all K."""
    gen, questions = rag.generator, [q.question for q in batch]
    hyps = passage_beams(gen, questions, ret, beams)  # [b][k] -> hypotheses
    per_q = [list(dict.fromkeys(text(gen, h) for hs in by_k for h in hs)) for by_k in hyps]
    return _answers(ret, rescore(gen, questions, ret, per_q))


@torch.no_grad()
def fast(rag, batch: Sequence[Question], ret, beams: int) -> List[dict]:
    """RAG-Sequence fast decoding: p(y|x,z_k) = 0 where z_k's beam did not produce y."""
    prior = torch.log_softmax(ret.scores.float(), dim=-1).cpu()  # (B, K)
    preds = []
    for b, (cands, lp) in enumerate(generated_logprobs(rag.generator, [q.question for q in batch], ret, beams)):
        marginal = torch.logsumexp(prior[b] + lp, dim=-1)  # (C,)
        preds.append(cands[int(marginal.argmax())])
    return _answers(ret, preds)


@torch.no_grad()
def token_mixture(rag, batch: Sequence[Question], ret, beams: int) -> List[dict]:
    """RAG-Token decoding: greedy / beam search over sum_k p(z_k|x) p(y_t|x,z_k,y_<t)."""
    gen = rag.generator
    prior = torch.log_softmax(ret.scores.float(), dim=-1)  # (B, K)
    prompts = [gen.prompt(q.question, p) for q, ps in zip(batch, ret.texts) for p in ps]  # B*K
    hyps = beam_search(gen, prompts, prior, beams)  # B lists
    return _answers(ret, [text(gen, hs[0]) for hs in hyps])


# ---- building blocks --------------------------------------------------------------------------
@torch.no_grad()
def rescore(gen, questions: List[str], ret, per_q: List[List[str]]) -> List[str]:
    """The candidate of each question with the highest log sum_k p(z_k|x) p(y|x,z_k) over all K
    (first one on ties); one answer_logprobs call for every (question, candidate)."""
    prior = torch.log_softmax(ret.scores.float(), dim=-1)  # (B, K)
    rq, rp, ra, owner = [], [], [], []
    for b, cs in enumerate(per_q):
        for c in cs:
            rq.append(questions[b])
            rp.append(ret.texts[b])
            ra.append(c)
            owner.append(b)
    tok_lp, _ = gen.answer_logprobs(rq, rp, ra)  # (R, K, T)
    marginal = torch.logsumexp(prior[owner] + tok_lp.sum(-1), dim=-1)  # (R,)
    best: Dict[int, tuple] = {}
    for r, b in enumerate(owner):
        if b not in best or marginal[r] > best[b][0]:
            best[b] = (float(marginal[r]), ra[r])
    return [best[b][1] for b in range(len(per_q))]


@torch.no_grad()
def passage_beams(gen, questions: List[str], ret, beams: int) -> List[List[List[Hypothesis]]]:
    """Beam search on each (x, z_k) on its own: [b][k] -> up to `beams` hypotheses, best first."""
    k = len(ret.texts[0])
    prompts = [gen.prompt(q, p) for q, ps in zip(questions, ret.texts) for p in ps]  # B*K
    hyps = beam_search(gen, prompts, torch.zeros(len(prompts), 1), beams)
    return [hyps[b * k : (b + 1) * k] for b in range(len(questions))]


@torch.no_grad()
def generated_logprobs(gen, questions: List[str], ret, beams: int) -> List[Tuple[List[str], torch.Tensor]]:
    """Per question: its distinct beam candidates y_c and a (C, K) table of log p(y_c|x,z_k), -inf
    where z_k's beam did not produce y_c. A generated pair's entry is its beam score when the
    generated ids are answer_logprobs' tokenisation of y_c, else one answer_logprobs forward."""
    hyps = passage_beams(gen, questions, ret, beams)
    tables, todo = [], []  # todo: (b, c, k) pairs to score by a forward pass
    for b, by_k in enumerate(hyps):
        flat = [(k, h) for k, hs in enumerate(by_k) for h in hs]
        texts = [text(gen, h) for _, h in flat]
        canon = gen._answer_ids(texts)
        cands = list(dict.fromkeys(texts))
        lp = torch.full((len(cands), len(by_k)), float("-inf"))
        need = {}
        for (k, h), t, ids in zip(flat, texts, canon):
            c = cands.index(t)
            if h.tokens == ids:
                lp[c, k] = h.score
                need.pop((c, k), None)
            elif lp[c, k] == float("-inf"):
                need[(c, k)] = True
        todo += [(b, c, k) for c, k in need]
        tables.append((cands, lp))
    if todo:
        tok_lp, _ = gen.answer_logprobs(
            [questions[b] for b, _, _ in todo],
            [[ret.texts[b][k]] for b, _, k in todo],
            [tables[b][0][c] for b, c, _ in todo],
        )  # (R, 1, T)
        for (b, c, k), s in zip(todo, tok_lp.sum(-1)[:, 0].tolist()):
            tables[b][1][c, k] = s
    return tables


def text(gen, h: Hypothesis) -> str:
    """A hypothesis as answer text, decoded as `Generator.sample` decodes."""
    return gen.tokenizer.decode(h.tokens, skip_special_tokens=True).strip()


@torch.no_grad()
def beam_search(
    gen, prompts: List[str], log_w: torch.Tensor, beams: int, max_new_tokens: Optional[int] = None
) -> List[List[Hypothesis]]:
    """Beam search over N groups of G prompts each (`prompts`: N*G, group-major), the next-token
    distribution of a group being the mixture log sum_g w_g p(v | prompt_g, y_<t) with log weights
    `log_w` (N, G). Returns per group up to `beams` hypotheses, best score first."""
    N, G = log_w.shape
    if len(prompts) != N * G:
        raise ValueError(f"{len(prompts)} prompts for {N} groups of {G}")
    max_new = max_new_tokens or gen.cfg.max_new_tokens
    p_ids = gen._prompt_ids(prompts)
    L = max(len(p) for p in p_ids)
    ids = torch.full((N * G, L), gen.pad_id, dtype=torch.long)
    attn = torch.zeros((N * G, L), dtype=torch.long)
    for i, p in enumerate(p_ids):
        ids[i, L - len(p) :] = torch.tensor(p)
        attn[i, L - len(p) :] = 1
    prompt_real, dev = int(attn.sum()), gen.device
    ids, attn = ids.to(dev), attn.to(dev)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)  # (N*G, L) positions as HF generate sets them
    w = log_w.to(dev).float()[:, None, :, None]  # (N, 1, G, 1)
    kw, t0 = _cache_kw(gen.model), clock()
    logits, cache = _forward(gen.model, kw, ids, attn, pos, None)  # (N*G, V) at the last prompt token
    t_prefill = clock() - t0
    last = pos[:, -1]  # (rows,) position of each row's last token
    seqs: List[List[List[int]]] = [[[]] for _ in range(N)]  # [n][h] tokens of live hypothesis h
    scores = torch.zeros((N, 1), device=dev)  # (N, H)
    finished: List[List[Hypothesis]] = [[] for _ in range(N)]
    done = [False] * N
    steps = real_new = 0
    while True:
        steps += 1
        H, V = scores.shape[1], logits.shape[-1]
        real_new += G * H * (N - sum(done))
        lp = torch.log_softmax(logits.float(), dim=-1).view(N, H, G, V)
        mix = torch.logsumexp(lp + w, dim=2)  # (N, H, V)
        top_s, top_i = (scores[:, :, None] + mix).view(N, H * V).topk(min(2 * beams, H * V), dim=-1)
        top_s, top_i = top_s.tolist(), top_i.tolist()  # (N, 2*beams) candidates, best first
        src = torch.zeros((N, beams), dtype=torch.long)
        nxt = torch.full((N, beams), gen.pad_id, dtype=torch.long)
        new_scores = torch.full((N, beams), float("-inf"))
        new_seqs = []
        for n in range(N):
            cands = zip(top_s[n], top_i[n])
            live = [] if done[n] else _expand(cands, V, beams, gen.eos_ids, seqs[n], finished[n])
            if not done[n] and steps == max_new:  # out of steps: the live beams end unfinished
                finished[n] += [Hypothesis(seqs[n][h] + [tok], s, False) for h, tok, s in live]
                done[n] = True
            elif not done[n]:
                done[n] = _stop(live, finished[n], beams)
            for j, (h, tok, s) in enumerate([] if done[n] else live):
                src[n, j], nxt[n, j], new_scores[n, j] = h, tok, s
            new_seqs.append([seqs[n][h] + [tok] for h, tok, _ in live] + [[]] * (beams - len(live)))
        if all(done):
            break
        # row (n, j, g) of the next step continues row (n, src[n, j], g) of this one
        idx = ((torch.arange(N)[:, None] * H + src)[:, :, None] * G + torch.arange(G)).reshape(-1).to(dev)
        cache.reorder_cache(idx)
        attn = torch.cat([attn[idx], attn.new_ones((len(idx), 1))], dim=1)
        last = last[idx] + 1
        tok_in = nxt[:, :, None].expand(N, beams, G).reshape(-1, 1).to(dev)
        logits, cache = _forward(gen.model, kw, tok_in, attn, last[:, None], cache)
        scores, seqs = new_scores.to(dev), new_seqs
    _charge(gen, L, N * G, N * beams * G, steps, prompt_real, real_new, t_prefill, clock() - t0 - t_prefill)
    return [sorted(f, key=lambda h: -h.score)[:beams] for f in finished]


def _expand(cands, V, beams, eos: frozenset, seqs, fin: List[Hypothesis]) -> List[Tuple[int, int, float]]:
    """A group's next live beams (source hypothesis, token, score) from its (score, flat index)
    candidates, best first; an end token (any of `eos`) among the top `beams` candidates finishes its hypothesis
    (appended to `fin`) instead. `seqs`: the group's live token lists."""
    live = []
    for rank, (s, i) in enumerate(cands):
        if len(live) == beams or s == float("-inf"):
            break
        h, tok = divmod(i, V)
        if tok not in eos:
            live.append((h, tok, s))
        elif rank < beams:
            fin.append(Hypothesis(seqs[h] + [tok], s, True))
    return live


def _stop(live, fin: List[Hypothesis], beams: int) -> bool:
    """Whether no live beam (best first) can still beat the `beams`-th best finished hypothesis:
    scores never grow with length, so searching on could not change the group's result."""
    best = sorted((h.score for h in fin), reverse=True)
    return not live or (len(best) >= beams and live[0][-1] <= best[beams - 1])


def _cache_kw(model) -> str:
    """The name under which this transformers version passes the KV cache ("cache" since v5)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _forward(model, kw: str, ids, attn, pos, cache):
    """One cached forward; (logits at the last position (rows, V), the updated KV cache)."""
    out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1, **{kw: cache})
    return out.logits[:, -1], getattr(out, kw)


def _charge(gen, L, n0, n1, steps, prompt_real, real_new, t_prefill, t_decode) -> None:
    """As `Generator.sample` charges: rows of padded prompt length L, `steps` decoding steps each.
    With beams > 1 the prefill ran on n0 = N*G rows and the steps after it on n1 = N*beams*G."""
    shape = gen.shape()
    if n1 == n0 or steps == 1:
        gen.ledger.charge_model(
            gen.component,
            shape,
            [L] * n0,
            new_tokens=[steps] * n0,
            real_tokens=prompt_real + real_new,
            seconds=t_prefill + t_decode,
        )
        return
    gen.ledger.charge_model(
        gen.component, shape, [L] * n0, new_tokens=[1] * n0, real_tokens=prompt_real + n0, seconds=t_prefill
    )
    flops = generate_flops(shape, [L] * n1, [steps] * n1) - generate_flops(shape, [L] * n1, [1] * n1)
    gen.ledger.charge(
        gen.component, "generate", tokens=n1 * (steps - 1), flops=flops, real_tokens=real_new - n0, seconds=t_decode
    )


def _answers(ret, preds: List[str]) -> List[dict]:
    return [{"prediction": p, "retrieved_ids": ret.ids[b], "metrics": {}} for b, p in enumerate(preds)]
