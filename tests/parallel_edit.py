"""A worker of tests/test_parallel.py, started by ``fluxtrt.parallel.launch.launch`` under torchrun: one tiny edit
with the transformer split over the processes, eager and then regionally compiled with fused QKV (stage 1 as
``--gpus`` runs it); rank 0 saves both final latents.

    python tests/parallel_edit.py OUT.pt STEPS
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.conftest, also where PYTHONPATH is unset

from fluxtrt.config import SamplerConfig
from fluxtrt.models import load_components
from fluxtrt.parallel.context import attach_processors, enable_context_parallel, init_world
from fluxtrt.pipeline.kontext import KontextPipeline
from fluxtrt.stages.apply import StagedModel
from fluxtrt.stages.config import restrict_stage, stage_config
from tests.conftest import make_image

# The edit of test_parallel.py's single-process reference: the same image, prompt, seed and size (the reference at
# its own 320x240, not its ~1 MP preferred size).
EDIT = {"height": 256, "width": 256, "max_area": 256 * 256, "seed": 3, "auto_resize": False}


def main(out: str, steps: int) -> None:
    world = init_world(int(os.environ["WORLD_SIZE"]), "cpu")
    components = load_components("tiny", "cpu", "fp32", seed=0)
    enable_context_parallel(components.transformer, world)
    sampler = SamplerConfig(steps=steps)
    image = make_image(320, 240)
    eager = KontextPipeline.from_components(components).edit(image, "a red door", sampler=sampler, **EDIT)
    config, notes = restrict_stage(stage_config("1:compile=aot_eager:vae=off"))
    applied = StagedModel(components).apply(config)
    processors = attach_processors(components.transformer)
    staged = KontextPipeline.from_components(components, runners=applied.runners)
    compiled = staged.edit(image, "a red door", sampler=sampler, **EDIT)
    if world.main:
        torch.save({"eager": eager.latents, "compiled": compiled.latents, "notes": notes, "processors": processors,
                    "features": applied.report.features, "world": world.size}, out)  # fmt: skip
    world.close()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
