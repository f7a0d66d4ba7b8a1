"""The ``fluxtrt`` command: a thin shell over the library. Heavy packages are imported inside commands only."""

from __future__ import annotations

import sys
import typing
from pathlib import Path

import click

from fluxtrt import __version__
from fluxtrt.backends.base import DeclaredOption, declared_options
from fluxtrt.config import (
    DEFAULT_FBC_THRESHOLD,
    DEVICES,
    DTYPES,
    SIGMA_SCHEDULES,
    SOLVERS,
    BuildConfig,
    InferConfig,
    SamplerConfig,
)
from fluxtrt.errors import FluxtrtError
from fluxtrt.specs.flux import COMPONENTS, Resolution


class FluxtrtGroup(click.Group):
    """Prints any failure as one line on stderr and exits non-zero (130 for Ctrl-C); ``--verbose`` re-raises for the
    traceback."""

    def main(self, args=None, prog_name=None, **extra):  # type: ignore[override]
        args = list(sys.argv[1:] if args is None else args)
        verbose = "--verbose" in args
        try:
            # The arguments travel with the context: `--gpus N` runs the same command again under torchrun.
            return super().main(args, prog_name, standalone_mode=False, obj={"args": args}, **extra)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.Abort:  # Ctrl-C (click turns KeyboardInterrupt into Abort)
            from fluxtrt.parallel.launch import in_worker

            if in_worker():  # Ctrl-C reaches every --gpus worker; their parent says it once
                sys.exit(130)
            command = next((a for a in args if not a.startswith("-")), None)
            kept = {
                "build": " (a build keeps the components it finished; run it again to go on)",
                "infer": ": no image was written",
                "compare": ": no report was written",
            }.get(command, "")
            click.echo(f"error: interrupted: nothing half-written was left{kept}", err=True)
            sys.exit(130)
        except click.ClickException as exc:
            click.echo(f"error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except FluxtrtError as exc:
            if verbose:
                raise
            from fluxtrt.parallel.launch import record_worker_error

            if not record_worker_error(str(exc)):  # a --gpus worker leaves it to the parent to print
                click.echo(f"error: {exc}", err=True)
            sys.exit(1)


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
    help_ = f"One of auto, {', '.join(DEVICES)}; auto = cuda where PyTorch sees a GPU, else cpu."
    return click.option("--device", default="auto", show_default=True, help=help_)(f)


def gpus_option(f):
    help_ = ("Split the transformer's sequence over N GPUs of this host (Ulysses attention; launched under "
             "torchrun; with --device cpu, N CPU processes).")  # fmt: skip
    return click.option("--gpus", type=int, default=1, show_default=True, help=help_)(f)


def relaunched(gpus: int, device: str) -> bool:
    """True when this process launched ``gpus`` workers for the command (and they finished)."""
    from fluxtrt.parallel.launch import relaunch

    return relaunch(gpus, device, click.get_current_context().find_root().obj["args"])


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


@click.group(cls=FluxtrtGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fluxtrt")
@click.option("--verbose", is_flag=True, help="Show the full traceback of an error.")
def main(verbose: bool) -> None:
    """FLUX.1-Kontext image edits with fast inference engines."""


@main.command()
@click.option("--model", default=None, help=MODEL_HELP + " Or give --engines.")
@click.option(
    "--engines", type=click.Path(path_type=Path), default=None, help="An engines directory from `fluxtrt build`."
)
@click.option("--image", "image", type=click.Path(path_type=Path), help="Reference image to edit.")
@click.option("--prompt", help="The edit instruction.")
@click.option(
    "--edits",
    type=click.Path(path_type=Path),
    default=None,
    help="Many edits from one load: a JSON-lines "
    "file, one {image, prompt, out[, seed, steps, guidance, size]} a line (instead of --image/--prompt/--out).",
)
@click.option("--out", type=click.Path(path_type=Path),
              help="Output image; its extension picks the format: .png, .jpg/.jpeg or .webp.")  # fmt: skip
@sampler_options
@seed_option
@click.option(
    "--guidance",
    type=float,
    default=2.5,
    show_default=True,
    help="Distilled guidance scale, >= 0 (the model was distilled for about 1 to 4).",
)
@click.option(
    "--height",
    type=int,
    default=None,
    help="Target height (with --width); default keeps the input's aspect ratio at its preferred Kontext resolution.",
)
@click.option("--width", type=int, default=None, help="Target width (with --height).")
@click.option("--fbc", default=None, help="Engines built with --first-block-cache: the cache's threshold, or off "
              f"(default {DEFAULT_FBC_THRESHOLD}).")  # fmt: skip
@vae_option("Replace the model's VAE with the slim autoencoder: ")
@click.option("--low-vram", is_flag=True,
              help="24 GB mode: FP8 transformer linears (sm89+) quantized while loading, text encoders streamed from "
              "host memory, VAE tiled above 1024 px a side.")  # fmt: skip
@click.option("--lora", "loras", multiple=True, metavar="FILE[:SCALE]",
              help="A FLUX LoRA (.safetensors: diffusers, kohya or XLabs format) merged into the transformer at SCALE "
              "(default 1.0); repeatable. Engines take it without a rebuild (onnxruntime; aotinductor built with "
              "--aoti-weights external).")  # fmt: skip
@device_options
@gpus_option
def infer(model, engines, image, prompt, edits, out, scheduler, sigmas, steps, seed, guidance, height, width, fbc,
          vae, low_vram, loras, device, dtype, gpus):  # fmt: skip
    """Edit an image as the prompt says and write it, on PyTorch (--model) or on built engines (--engines).

    The summary goes to stdout; progress and notices (a changed size, dropped prompt tokens...) to stderr."""
    if edits is not None:
        if loras:
            raise click.UsageError("--lora is not taken with --edits yet: run one `fluxtrt infer --lora` per edit.")
        from fluxtrt.serve.edits import run_edits_command
        from fluxtrt.serve.options import ServedSource

        one = {"--image": image, "--prompt": prompt, "--out": out, "--height": height, "--width": width, "--gpus": gpus}
        source = ServedSource(model, engines, device, dtype, fbc, vae, low_vram)
        return run_edits_command(edits, one, source, SamplerConfig(scheduler, sigmas, steps), seed, guidance)
    for name, value in (("--image", image), ("--prompt", prompt), ("--out", out)):
        if value is None:
            raise click.UsageError(f"Missing option '{name}' (or give --edits FILE.jsonl).")
    config = InferConfig(
        model=model,
        engines=engines,
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
        gpus=gpus,
        fbc=fbc,
        vae=vae,
        low_vram=low_vram,
        loras=tuple(loras),
    )
    if relaunched(config.gpus, config.device):
        return
    from fluxtrt.console import print_infer_report, step_progress
    from fluxtrt.infer import run_infer
    from fluxtrt.parallel.launch import is_main_process

    with step_progress() as on_step:
        report = run_infer(config, on_step=on_step)
    if is_main_process():
        print_infer_report(report, config.out)


@main.command()
@click.option("--model", default=None, help=MODEL_HELP + " Or give --engines.")
@click.option("--engines", type=click.Path(path_type=Path), default=None, help="An engines directory to serve.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (another than loopback "
              "is reachable from the network: set --api-key-env).")  # fmt: skip
@click.option("--port", type=int, default=8000, show_default=True, help="Port to listen on (0: a free one).")
@click.option("--max-queue", type=int, default=16, show_default=True, help="Requests that may wait; then 503.")
@click.option("--max-batch", type=int, default=None, help="Images per engine call (default: the built batch; 1 "
              "for --model).")  # fmt: skip
@click.option("--api-key-env", default=None, metavar="VAR", help="Require 'Authorization: Bearer $VAR' on every "
              "route but /health and the page.")  # fmt: skip
@click.option("--max-upload-mb", type=float, default=20.0, show_default=True, help="Largest request body.")
@click.option("--max-pixels", type=int, default=4096 * 4096, show_default=True, help="Largest uploaded image.")
@click.option("--max-steps", type=int, default=100, show_default=True, help="Most steps a request may ask for.")
@click.option("--keep-reference-size", is_flag=True, help="Use the uploaded image at its own size as the reference, "
              "not at its closest ~1 MP Kontext size.")  # fmt: skip
@click.option("--warmup-size", default=None, help="WIDTHxHEIGHT of the warm-up edits (default: the engines' opt "
              "resolution, 1024x1024 for --model).")  # fmt: skip
@click.option("--warmup-steps", type=int, default=2, show_default=True, help="Steps per warm-up edit (0: none).")
@sampler_options
@click.option("--fbc", default=None, help="Engines built with --first-block-cache: the threshold, or off.")
@vae_option("Replace the model's VAE with the slim autoencoder: ")
@click.option("--low-vram", is_flag=True, help="--model: the 24 GB mode of `fluxtrt infer`.")
@device_options
def serve(model, engines, host, port, max_queue, max_batch, api_key_env, max_upload_mb, max_pixels, max_steps,
          keep_reference_size, warmup_size, warmup_steps, scheduler, sigmas, steps, fbc, vae, low_vram, device,
          dtype):  # fmt: skip
    """Serve edits over HTTP: POST /v1/images/edits (OpenAI's Images API), a web page at /, /health, /ready,
    /metrics, /docs. Loads and warms up once; SIGTERM finishes the requests taken and exits 0."""
    from fluxtrt.console import err
    from fluxtrt.serve.options import ServeConfig, ServedSource

    source = ServedSource(model, engines, device, dtype, fbc, vae, low_vram)
    config = ServeConfig(source, SamplerConfig(scheduler, sigmas, steps), host, port, max_queue, max_batch,
                         api_key_env, max_upload_mb, max_pixels, max_steps, keep_reference_size,
                         Resolution.parse(warmup_size, "--warmup-size") if warmup_size else None,
                         warmup_steps)  # fmt: skip
    from fluxtrt.serve.server import serve as run_server

    run_server(config, on_line=lambda line: err().print(line, markup=False, highlight=False, soft_wrap=True))


@main.command()
@model_option
@click.option("--backend", default="onnxruntime", show_default=True,
              help="onnxruntime, aotinductor, tensorrt (TensorRT 10), tensorrt-rtx or onnx (no engine)")  # fmt: skip
@click.option("--precision", default="fp32", show_default=True, help="fp32, bf16, fp8 or fp4 (as the backend allows).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Engines directory to write.")
@click.option("--min-resolution", default="512x512", show_default=True, help="Smallest WIDTHxHEIGHT accepted.")
@click.option("--opt-resolution", default="1024x1024", show_default=True, help="WIDTHxHEIGHT the engines tune for.")
@click.option("--max-resolution", default="1568x1568", show_default=True, help="Largest WIDTHxHEIGHT accepted.")
@click.option("--max-batch", type=int, default=1, show_default=True, help="Largest batch accepted.")
@click.option(
    "--components",
    default=",".join(COMPONENTS),
    show_default=True,
    help="Comma-separated subset (transformer_first, transformer_rest: the transformer's two parts).",
)
@click.option("--first-block-cache", is_flag=True, help="Build the transformer as two engines (embeddings + first "
              "block, the rest) so infer/compare can skip the rest on steps that barely change it.")  # fmt: skip
@click.option("--force", is_flag=True, help="Rebuild everything, even components whose settings match.")
@click.option("--device", default="cpu", show_default=True, help="Where the model is loaded for export: cpu or cuda.")
@click.option("--onnx-dir", type=click.Path(path_type=Path), default=None,
              help="Use DIR/<component>/model.onnx (same input/output names) instead of exporting.")  # fmt: skip
@click.option("--calibration-edits", type=int, default=8, show_default=True,
              help="fp8/fp4: calibration edits to run when no saved calibration fits.")  # fmt: skip
@click.option("--calibration", type=click.Path(path_type=Path), default=None,
              help="fp8/fp4: use this calibration file (an earlier build's calibration/*.safetensors).")  # fmt: skip
@backend_options
@vae_option("Build the VAE components from the slim autoencoder: ")
@click.option("--jobs", default="auto", show_default=True, metavar="N|auto",
              help="Build up to N components at once, in separate processes, each loading only the part of the model "
              "it builds; auto picks N from the free GPU and host memory and each component's footprint.")  # fmt: skip
def build(model, backend, precision, out, min_resolution, opt_resolution, max_resolution, max_batch, components,
          first_block_cache, force, device, onnx_dir, calibration_edits, calibration, vae, jobs,
          **options):  # fmt: skip
    """Export every component to ONNX and build an engine per component, with a manifest."""
    config = BuildConfig(
        model=model,
        backend=backend,
        precision=precision,
        out=out,
        min_resolution=Resolution.parse(min_resolution, "--min-resolution"),
        opt_resolution=Resolution.parse(opt_resolution, "--opt-resolution"),
        max_resolution=Resolution.parse(max_resolution, "--max-resolution"),
        max_batch=max_batch,
        components=tuple(c.strip() for c in components.split(",") if c.strip()),
        force=force,
        device=device,
        onnx_dir=onnx_dir,
        calibration_edits=calibration_edits,
        calibration=calibration,
        options=given_options(options),
        first_block_cache=first_block_cache,
        vae=vae,
        jobs=jobs,
    )
    from fluxtrt.console import build_progress, print_build_report
    from fluxtrt.engines.build import build_engines, range_notices

    with build_progress(range_notices(config)) as on_progress:
        report = build_engines(config, on_progress)
    print_build_report(report)


@main.command()
@click.argument("engines_dir", metavar="ENGINES_DIR", type=click.Path(path_type=Path))
def inspect(engines_dir):
    """Show what ENGINES_DIR (from `fluxtrt build`) holds: components, shapes, precision, sizes, versions; for an
    ONNX-only directory, the trtexec command that builds each engine."""
    from fluxtrt.console import print_manifest, print_trtexec_commands
    from fluxtrt.engines.manifest import Manifest

    manifest = Manifest.load(engines_dir, label="ENGINES_DIR")
    print_manifest(manifest, engines_dir)
    print_trtexec_commands(manifest)


@main.command()
@model_option
@click.option("--stages", default="0,1,2,3,4,4f,4k", show_default=True,
              help="Stage specs, e.g. 0,1:fbc=off,4,4:vae=tiny,4:lowvram=on.")  # fmt: skip
@click.option("--engines", "engines", multiple=True, type=click.Path(path_type=Path), help="Engines dir (repeatable).")
@click.option("--image", type=click.Path(path_type=Path), default=None, help="Reference image (default: synthetic).")
@click.option("--prompt", default="make the house blue", show_default=True, help="The edit instruction.")
@click.option("--resolution", default=None, help="Target WIDTHxHEIGHT (default: the reference's preferred size).")
@click.option("--runs", type=int, default=3, show_default=True, help="Timed edits per contender.")
@click.option("--warmup", type=int, default=2, show_default=True, help="Untimed edits per contender first.")
@click.option("--warmup-steps", type=int, default=2, show_default=True, help="Denoising steps of a warmup edit.")
@seed_option
@click.option("--diffusers-check", is_flag=True, help="Time diffusers' own pipeline against stage 0.")
@click.option("--prompt-cache", is_flag=True, help="Reuse the prompt's CLIP and T5 outputs after a contender's first "
              "edit, as a server repeating a prompt would (CLIP and T5 then show 0 ms).")  # fmt: skip
@click.option("--engines-fbc", default=None, help="First-block-cache threshold, or off, for engines built with "
              f"--first-block-cache (default {DEFAULT_FBC_THRESHOLD}, the stages').")  # fmt: skip
@click.option("--report", "report_dir", required=True, type=click.Path(path_type=Path), help="Report directory.")
@vae_option("The slim autoencoder of stages with vae=tiny (e.g. 4:vae=tiny): ")
@device_options
@gpus_option
def compare(model, stages, engines, image, prompt, resolution, runs, warmup, warmup_steps, seed, diffusers_check,
            prompt_cache, engines_fbc, report_dir, vae, device, dtype, gpus):  # fmt: skip
    """Run PyTorch stages and engines on the same inputs; write report.md, report.json and report.png."""
    from fluxtrt.bench.config import CompareConfig

    config = CompareConfig(
        model=model,
        stages=tuple(s.strip() for s in stages.split(",") if s.strip()),
        engines=tuple(engines),
        report_dir=report_dir,
        image=image,
        prompt=prompt,
        resolution=Resolution.parse(resolution, "--resolution") if resolution else None,
        runs=runs,
        warmup=warmup,
        warmup_steps=warmup_steps,
        device=device,
        dtype=dtype,
        seed=seed,
        diffusers_check=diffusers_check,
        prompt_cache=prompt_cache,
        gpus=gpus,
        engines_fbc=engines_fbc,
        vae=vae,
    )
    if relaunched(config.gpus, config.device):
        return
    from fluxtrt.bench.compare import compare as run_compare
    from fluxtrt.bench.console import print_compare_report, print_event
    from fluxtrt.parallel.launch import is_main_process

    report = run_compare(config, on_event=print_event)
    if is_main_process():
        print_compare_report(report, config.report_dir)
    report.raise_for_failures()


if __name__ == "__main__":
    main()
