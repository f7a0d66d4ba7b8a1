"""A repeated prompt reuses its CLIP and T5 outputs: no encoder call, and the same edit bit for bit."""

from __future__ import annotations

import torch

from fluxtrt.config import SamplerConfig
from tests.conftest import make_image

SAMPLER = SamplerConfig(steps=1)


def pipeline(tiny):
    from fluxtrt.backends.recording import RecordingRunner
    from fluxtrt.backends.torch_runner import torch_runners
    from fluxtrt.pipeline.kontext import KontextPipeline

    runners = torch_runners(tiny)
    counted = {name: RecordingRunner(runners[name]) for name in ("clip", "t5")}
    return KontextPipeline.from_components(tiny, runners={**runners, **counted}), counted


def edit(pipe, prompt):
    # A 64x64 edit of the reference at its own size: the cache is about the text encoders.
    return pipe.edit(make_image(64, 64), prompt, sampler=SAMPLER, seed=3, height=64, width=64, max_area=64 * 64,
                     auto_resize=False)  # fmt: skip


def test_repeated_prompt_skips_the_encoders_and_edits_identically(tiny):
    cached, counted = pipeline(tiny)
    first, again = edit(cached, "make it red"), edit(cached, "make it red")
    assert [len(c.calls) for c in counted.values()] == [1, 1]
    assert again.calls.get("clip", 0) == again.calls.get("t5", 0) == 0
    assert again.timings_ms["clip"] == again.timings_ms["t5"] == 0.0
    assert torch.equal(first.latents, again.latents)

    fresh, fresh_counted = pipeline(tiny)
    fresh.prompt_cache = 0
    reference = edit(fresh, "make it red")
    assert torch.equal(reference.latents, again.latents)  # reuse changes nothing in the edit
    edit(fresh, "make it red")
    assert [len(c.calls) for c in fresh_counted.values()] == [2, 2]  # off: every edit encodes


def test_prompt_cache_keeps_the_most_recent_prompts(tiny):
    pipe, counted = pipeline(tiny)
    pipe.prompt_cache = 1
    for prompt in ("a", "b", "b", "a"):  # "a" was evicted by "b"
        edit(pipe, prompt)
    assert [len(c.calls) for c in counted.values()] == [3, 3]


def test_reused_prompt_repeats_its_truncation_warning(tiny):
    pipe, _ = pipeline(tiny)
    long = " ".join(["house"] * 600)
    first, again = edit(pipe, long), edit(pipe, long)
    assert any("T5 keeps" in w for w in first.warnings)
    assert again.warnings == first.warnings
