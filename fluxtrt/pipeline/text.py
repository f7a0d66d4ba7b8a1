"""Prompt tokenisation with truncation reported, not silent."""

from __future__ import annotations

from typing import Any

# Words of the dropped text quoted in a truncation notice: enough to find the place in the prompt.
DROPPED_WORDS_SHOWN = 8


def tokenize(tokenizer: Any, prompts: list[str], max_length: int, label: str) -> tuple[Any, list[str]]:
    """Token ids padded/truncated to ``max_length``, and one message per truncated prompt.

    Args:
        tokenizer: a CLIP or T5 tokenizer.
        prompts: one prompt per batch item.
        max_length: tokens the encoder takes (77 CLIP, 512 T5).
        label: encoder name used in messages.

    Returns:
        int64 ids [B, max_length] and the truncation messages, one line each: how many tokens were dropped and the
        first few words of what was dropped.
    """
    ids = tokenizer(
        prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    ).input_ids
    messages = []
    # verbose=False: the untruncated ids are only counted here; transformers' "longer than the specified maximum
    # sequence length" warning would repeat what the message says.
    for i, full in enumerate(tokenizer(prompts, padding=False, truncation=False, verbose=False).input_ids):
        if len(full) > max_length:
            # The kept ids end with the end-of-text token in place of the prompt's last kept one.
            dropped = len(full) - max_length
            words = tokenizer.decode(full[max_length - 1 : -1], skip_special_tokens=True).split()
            head = " ".join(words[:DROPPED_WORDS_SHOWN]) + (" ..." if len(words) > DROPPED_WORDS_SHOWN else "")
            messages.append(
                f"prompt {i}: {label} keeps {max_length} of {len(full)} tokens; dropped {dropped} tokens starting "
                f"'{head}'"
            )
    return ids, messages
