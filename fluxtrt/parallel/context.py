"""The worker side of ``--gpus N``: join the process group and split the transformer's sequence over the ranks with
diffusers' context parallelism (Ulysses attention), the library's collectives throughout.

diffusers' plan for FLUX splits the image tokens and the 512 text tokens over the ranks at the model's input and
gathers the output after ``proj_out``; inside each attention, an all-to-all turns the sequence split into a split of
the heads, so every rank attends over the whole sequence for 24 / N heads. Everything else (text encoders, VAE,
the sampler) runs whole on every rank: the gathered prediction is identical everywhere, so the latents stay
identical too, and rank 0 writes the result.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from fluxtrt.errors import InputError
from fluxtrt.parallel.launch import require_context_parallel


@dataclass
class World:
    """This process's place among the ``size`` processes of one edit.

    Attributes:
        rank, size, local_rank: as torchrun numbers them (one host: rank == local_rank).
        device: ``cuda:<local_rank>`` or ``cpu``.
        backend: the process group's backend (nccl on CUDA, gloo on the CPU).
    """

    rank: int
    size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def main(self) -> bool:
        """Rank 0: the process that prints and writes."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait until every process gets here (before a timed edit: a rank still compiling would otherwise stall the
        others inside their first all-to-all, and their clocks would count its compile)."""
        if torch.distributed.is_initialized():
            torch.distributed.barrier()

    def prepare(self, transformer: Any) -> None:
        """Split ``transformer``'s sequence over this world (``enable_context_parallel``)."""
        enable_context_parallel(transformer, self)

    def close(self) -> None:
        """Leave the process group."""
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def init_world(gpus: int, device: str) -> World:
    """Join the process group torchrun set up (nccl on CUDA, each rank on GPU ``LOCAL_RANK``; gloo on the CPU).

    Raises:
        InputError: this process was not started for ``gpus`` processes (torchrun's --nproc-per-node differs).
        MissingDependencyError: no torch.distributed or no context parallelism in diffusers.
    """
    require_context_parallel()
    # diffusers 0.42's gather calls a torch function deprecated in torch 2.12; the warning is no concern of the user.
    warnings.filterwarnings("ignore", message=r".*all_gather_tensor.* is deprecated", category=FutureWarning)
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size != gpus:
        raise InputError(
            f"--gpus {gpus} but this process is one of {size} (torchrun --nproc-per-node {size}): run the command "
            f"without torchrun (fluxtrt launches it), or with --nproc-per-node {gpus}"
        )
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev, backend = torch.device("cuda", local_rank), "nccl"
        torch.distributed.init_process_group(backend, device_id=dev)
    else:
        dev, backend = torch.device("cpu"), "gloo"
        torch.distributed.init_process_group(backend)
    return World(rank, size, local_rank, dev, backend)


def ulysses_degrees(heads: int, limit: int = 64) -> list[int]:
    """The process counts Ulysses attention can split ``heads`` over (the divisors of ``heads``)."""
    return [n for n in range(1, min(heads, limit) + 1) if heads % n == 0]


def enable_context_parallel(transformer: Any, world: World) -> None:
    """Split ``transformer``'s sequence over the world with diffusers' Ulysses attention (in place, once).

    On CUDA this is ``transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=N))``. On the CPU,
    the same three steps with the device given: diffusers 0.42 picks the device as rank modulo the accelerator count,
    which is 0 on a machine without one.

    Raises:
        InputError: the heads do not split over the world.
    """
    from diffusers import ContextParallelConfig

    heads = transformer.config.num_attention_heads
    if heads % world.size:
        raise InputError(
            f"--gpus {world.size}: Ulysses attention splits the transformer's {heads} attention heads evenly over "
            f"the GPUs, and {heads} is not a multiple of {world.size}: use --gpus one of "
            f"{', '.join(map(str, ulysses_degrees(heads)))}"
        )
    config = ContextParallelConfig(ulysses_degree=world.size)
    if world.device.type == "cuda":
        with _quiet("diffusers.models.modeling_utils"):  # "experimental feature" warning, on every rank
            transformer.enable_parallelism(config=config)
    else:
        _enable_on_cpu(transformer, config, world)
    attach_processors(transformer)


def _enable_on_cpu(transformer: Any, config: Any, world: World) -> None:
    """``enable_parallelism``'s steps with the CPU as the device: mesh and config, the processors, the hooks."""
    from diffusers import ParallelConfig
    from diffusers.hooks import apply_context_parallel
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", config.mesh_shape, mesh_dim_names=config.mesh_dim_names)
    parallel = ParallelConfig(context_parallel_config=config)
    parallel.setup(world.rank, world.size, world.device, mesh=mesh)
    transformer._parallel_config = parallel
    apply_context_parallel(transformer, config, transformer._cp_plan)


def attach_processors(transformer: Any) -> int:
    """Give every attention processor the model's parallel config, as ``enable_parallelism`` does; call it again
    after a stage sets new processors. Returns how many processors run context-parallel.

    Raises:
        InputError: a processor cannot (one that does not go through diffusers' attention dispatcher).
    """
    from diffusers.models.attention import AttentionModuleMixin

    config = transformer._parallel_config
    count = 0
    for module in transformer.modules():
        if isinstance(module, AttentionModuleMixin):
            processor = module.processor
            if not hasattr(processor, "_parallel_config"):
                raise InputError(
                    f"attention processor {type(processor).__name__} runs outside diffusers' attention dispatcher "
                    "and cannot split the sequence over GPUs: use attention=sdpa with --gpus"
                )
            processor._parallel_config = config
            count += 1
    return count


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
