"""The ``fluxtrt`` command: a thin shell over the library. Heavy packages are imported inside commands only."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from fluxtrt import __version__
from fluxtrt.config import DEVICES, DTYPES, SIGMA_SCHEDULES, SOLVERS, InferConfig, SamplerConfig
from fluxtrt.errors import FluxtrtError


class FluxtrtGroup(click.Group):
    """Prints any failure as one line on stderr and exits non-zero; ``--verbose`` re-raises for the traceback."""

    def main(self, args=None, prog_name=None, **extra):  # type: ignore[override]
        args = list(sys.argv[1:] if args is None else args)
        verbose = "--verbose" in args
        try:
            return super().main(args, prog_name, standalone_mode=False, **extra)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("error: aborted", err=True)
            sys.exit(130)
        except click.ClickException as exc:
            click.echo(f"error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except FluxtrtError as exc:
            if verbose:
                raise
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)


def model_option(f):
    return click.option(
        "--model",
        required=True,
        help="tiny (seeded miniature, CPU), random-full (full size, random weights, GPU), or a diffusers-format "
        "FLUX.1-Kontext directory / downloaded hub id.",
    )(f)


def device_options(f):
    f = click.option(
        "--dtype",
        default="auto",
        show_default=True,
        help=f"One of {', '.join(DTYPES)}; auto = bf16 on cuda, fp32 on cpu.",
    )(f)
    return click.option("--device", default="cpu", show_default=True, help=f"One of {', '.join(DEVICES)}.")(f)


def sampler_options(f):
    f = click.option("--steps", type=int, default=None, help="Denoising steps (default: 28 euler, 14 dpmpp-2m).")(f)
    f = click.option("--sigmas", default="flux-shift", show_default=True, help=f"One of {', '.join(SIGMA_SCHEDULES)}.")(
        f
    )
    return click.option("--scheduler", default="dpmpp-2m", show_default=True, help=f"One of {', '.join(SOLVERS)}.")(f)


@click.group(cls=FluxtrtGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fluxtrt")
@click.option("--verbose", is_flag=True, help="Show the full traceback of an error.")
def main(verbose: bool) -> None:
    """FLUX.1-Kontext image edits with fast inference engines."""


@main.command()
@model_option
@click.option("--image", "image", required=True, type=click.Path(path_type=Path), help="Reference image to edit.")
@click.option("--prompt", required=True, help="The edit instruction.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output PNG path.")
@sampler_options
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the initial noise.")
@click.option("--guidance", type=float, default=2.5, show_default=True, help="Distilled guidance scale.")
@click.option(
    "--height",
    type=int,
    default=None,
    help="Target height (with --width); default keeps the input's aspect ratio at its preferred Kontext resolution.",
)
@click.option("--width", type=int, default=None, help="Target width (with --height).")
@device_options
def infer(model, image, prompt, out, scheduler, sigmas, steps, seed, guidance, height, width, device, dtype) -> None:
    """Edit IMAGE as PROMPT says and write OUT.png."""
    config = InferConfig(
        model=model,
        image=image,
        prompt=prompt,
        out=out,
        sampler=SamplerConfig(solver=scheduler, sigmas=sigmas, steps=steps),
        seed=seed,
        guidance=guidance,
        height=height,
        width=width,
        device=device,
        dtype=dtype,
    )
    from fluxtrt.console import print_infer_report, step_progress
    from fluxtrt.infer import run_infer

    with step_progress() as on_step:
        report = run_infer(config, on_step=on_step)
    print_infer_report(report, config.out)


if __name__ == "__main__":
    main()
