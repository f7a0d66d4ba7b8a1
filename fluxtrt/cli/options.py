"""The options several ``fluxtrt`` commands share, as click decorators, and the backend options' flags as the
backends declare them."""

from __future__ import annotations

import typing
from collections.abc import Callable
from pathlib import Path

import click

from fluxtrt.backends.base import DeclaredOption, declared_options
from fluxtrt.config import DEVICES, DTYPES, SIGMA_SCHEDULES, SOLVERS

MODEL_HELP = (
    "tiny (seeded miniature, CPU), random-full (full size, random weights, GPU), random-full-2blocks (its widths, "
    "two blocks of each kind), or a diffusers-format FLUX.1-Kontext directory / downloaded hub id."
)


def model_option(f):
    return click.option("--model", required=True, help=MODEL_HELP)(f)


def seed_option(f):
    return click.option("--seed", type=int, default=0, show_default=True,
                        help="Seed of the initial noise, 0 to 2**64-1; the same seed gives the same edit (there is "
                        "no random seed).")(f)  # fmt: skip


def device_options(f):
    """``--device`` (auto: cuda where PyTorch sees a GPU, else cpu) and ``--dtype``, alike for infer and compare."""
    f = click.option(
        "--dtype",
        default="auto",
        show_default=True,
        help=f"One of {', '.join(DTYPES)}; auto = bf16 on cuda, fp32 on cpu.",
    )(f)
    help_ = (f"One of auto, {', '.join(DEVICES)}; auto = cuda where PyTorch sees a GPU, else cpu (and cpu for "
             "--engines built for it).")  # fmt: skip
    return click.option("--device", default="auto", show_default=True, help=help_)(f)


def gpus_option(f):
    help_ = ("Split the transformer's sequence over N GPUs of this host (Ulysses attention; launched under "
             "torchrun; with --device cpu, N CPU processes).")  # fmt: skip
    return click.option("--gpus", type=int, default=1, show_default=True, help=help_)(f)


def relaunched(gpus: int, device: str, check: Callable[[], None] | None = None) -> bool:
    """True when this process launched ``gpus`` workers for the command (and they finished); ``check`` runs in this
    process before any worker starts."""
    from fluxtrt.parallel.launch import relaunch

    return relaunch(gpus, device, click.get_current_context().find_root().obj["args"], check)


def vae_option(what: str):
    """``--vae tiny|DIR``: the slim autoencoder (AutoencoderTiny with FLUX's 16 latent channels, as TAEF1)."""
    help_ = what + "tiny (random weights, for timing) or a diffusers-format AutoencoderTiny directory (taef1)."
    return click.option("--vae", default=None, help=help_)


def sampler_options(f):
    f = click.option("--steps", type=int, default=None, help="Denoising steps (default: 28 euler, 14 dpmpp-2m).")(f)
    sigmas_help = f"One of {', '.join(SIGMA_SCHEDULES)} (default: log-snr for dpmpp-2m, flux-shift for euler)."
    f = click.option("--sigmas", default=None, help=sigmas_help)(f)
    return click.option("--scheduler", default="dpmpp-2m", show_default=True, help=f"One of {', '.join(SOLVERS)}.")(f)


def backend_options(f):
    """A flag per backend option, as the backends declare them (``fluxtrt.backends.base.option``): an option several
    backends take (``--cuda-graph``) is one flag. Not given, each passes None (a plain on flag: False)."""
    for declared in reversed(declared_options().values()):
        if declared.flag is not None:
            f = click.option(*declared.flag.decls, declared.name, help=declared.flag.help, **_click_type(declared))(f)
    return f


def _click_type(declared: DeclaredOption) -> dict:
    """How click reads the option's value, by its declared type."""
    if declared.type is bool:
        return {"default": None} if "/" in declared.flag.decls[0] else {"is_flag": True}
    if declared.type is Path:
        return {"type": click.Path(path_type=Path), "default": None}
    if typing.get_origin(declared.type) is tuple:  # a comma-separated list
        return {"default": None, "callback": lambda ctx, param, text: _comma_list(text)}
    return {"type": declared.type, "default": None}


def _comma_list(text: str | None) -> tuple[str, ...] | None:
    return tuple(c.strip() for c in text.split(",")) if text else None


def given_options(values: dict) -> dict:
    """The backend options given on the command line (those not left at None, and the plain on flags turned on),
    each value checked as its declaration says (before the backend is asked whether it takes the option)."""
    declared = declared_options()
    plain = {n for n, d in declared.items() if d.type is bool and d.flag and "/" not in d.flag.decls[0]}
    given = {k: v for k, v in values.items() if v is not None and not (k in plain and v is False)}
    for name, value in given.items():
        declared[name].flag.validate(value)
    return given
