"""Tokenizers built locally (no download) for the tiny and random-full models.

They are real CLIP (byte-level BPE) and T5 (Unigram) tokenizers with small vocabularies, so padding, truncation and
special tokens behave as with the released ones.
"""

from __future__ import annotations

import string
from typing import Any

CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 512

_CLIP_MERGES = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("i", "n"), ("e", "r"), ("o", "n"), ("a", "t</w>")]


def build_clip_tokenizer() -> Any:
    """A byte-level BPE CLIPTokenizer: every byte as a symbol and as a word end, plus a few merges."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    symbols = sorted(ByteLevel.alphabet())
    vocab = {s: i for i, s in enumerate(symbols)}
    for s in symbols:
        vocab[s + "</w>"] = len(vocab)
    for a, b in _CLIP_MERGES:
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=list(_CLIP_MERGES))
    tok.model_max_length = CLIP_MAX_LENGTH
    return tok


def build_t5_tokenizer() -> Any:
    """A Unigram T5 tokenizer over letters, digits and punctuation, with word-initial pieces."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + c, -2.5) for c in string.ascii_lowercase]
    pieces += [(c, -3.0) for c in string.ascii_letters + string.digits + string.punctuation]
    tok = T5TokenizerFast(vocab=pieces, extra_ids=0)
    tok.model_max_length = T5_MAX_LENGTH
    return tok
