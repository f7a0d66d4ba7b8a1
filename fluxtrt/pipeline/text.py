"""Prompt tokenisation with truncation reported, not silent."""

from __future__ import annotations

from typing import Any


def tokenize(tokenizer: Any, prompts: list[str], max_length: int, label: str) -> tuple[Any, list[str]]:
    """Token ids padded/truncated to ``max_length``, and one message per truncated prompt.

    Args:
        tokenizer: a CLIP or T5 tokenizer.
        prompts: one prompt per batch item.
        max_length: tokens the encoder takes (77 CLIP, 512 T5).
        label: encoder name used in messages.

    Returns:
        int64 ids [B, max_length] and the truncation messages.
    """
    ids = tokenizer(
        prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    ).input_ids
    messages = []
    for i, full in enumerate(tokenizer(prompts, padding=False, truncation=False).input_ids):
        if len(full) > max_length:
            dropped = tokenizer.decode(full[max_length - 1 : -1], skip_special_tokens=True)
            messages.append(
                f"prompt {i}: {label} keeps {max_length} of {len(full)} tokens; dropped: '{dropped.strip()}'"
            )
    return ids, messages
