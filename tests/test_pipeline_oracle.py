"""Oracle: the fluxtrt pipeline on torch runners equals diffusers' own FluxKontextPipeline on the same components."""

from __future__ import annotations

import pytest
import torch

from fluxtrt.config import SamplerConfig
from tests.conftest import make_image

STEPS = 4
MAX_AREA = 128 * 128  # diffusers fits explicit sizes to max_area; keep the tiny target small


def diffusers_latents(tiny, images, prompts, height, width, seed):
    pipe = tiny.diffusers_pipeline()
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        image=images,
        prompt=prompts,
        height=height,
        width=width,
        max_area=MAX_AREA,
        num_inference_steps=STEPS,
        guidance_scale=2.5,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
    )
    return out.images  # packed latents [B, S_target, 64]


@pytest.mark.parametrize(
    ("ref_size", "target", "prompts"),
    [
        ((256, 256), (128, 128), ["turn the sky green"]),
        ((400, 224), (96, 160), ["add a red hat to the person"]),
        ((224, 320), (128, 96), ["make it night", "make it snow"]),
    ],
    ids=["square", "non-square", "batch2"],
)
def test_matches_diffusers_kontext_pipeline(tiny, tiny_pipeline, ref_size, target, prompts):
    image = make_image(*ref_size, seed=1)
    height, width = target
    ours = tiny_pipeline.edit(
        image,
        prompts,
        sampler=SamplerConfig("euler", "flux-shift", STEPS),
        seed=7,
        guidance=2.5,
        height=height,
        width=width,
        max_area=MAX_AREA,
    )
    theirs = diffusers_latents(tiny, image, prompts, height, width, seed=7)
    assert ours.latents.shape == theirs.shape
    assert ours.latents.shape[0] == len(prompts)
    diff = (ours.latents - theirs.float()).abs().max().item()
    assert diff <= 1e-4, f"max abs diff {diff} against diffusers"
    # The latents moved far from the initial noise (drawn as the pipeline draws it), so the comparison is not
    # trivially of two copies of that noise: relative distance 0.58-0.60 for these edits, 0 for the noise itself.
    from fluxtrt.pipeline.latents import pack

    h, w = 2 * (ours.target.height // 16), 2 * (ours.target.width // 16)
    generator = torch.Generator().manual_seed(7)
    noise = pack(torch.randn((len(prompts), tiny.vae.config.latent_channels, h, w), generator=generator))
    assert noise.shape == ours.latents.shape
    moved = ((ours.latents - noise).norm() / noise.norm()).item()
    assert moved > 0.3, moved


def test_reference_and_target_geometry(tiny_pipeline):
    """Default target = the reference's preferred Kontext resolution, as diffusers' list and rule give it."""
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

    for w, h in [(640, 480), (480, 640), (1000, 1000), (1920, 600), (333, 777)]:
        target, reference = tiny_pipeline.geometry((w, h), None, None, 1024**2)
        fw, fh = w // 16 * 16, h // 16 * 16
        _, ew, eh = min((abs(fw / fh - pw / ph), pw, ph) for pw, ph in PREFERRED_KONTEXT_RESOLUTIONS)
        assert (reference.width, reference.height) == (ew, eh)
        assert target == reference
    target, _ = tiny_pipeline.geometry((640, 480), 512, 768, 1024**2)
    assert target.width % 16 == 0 and target.height % 16 == 0
    assert target.width * target.height <= 1024**2
    assert abs(target.width / target.height - 768 / 512) < 0.02
