"""The ``fluxtrt`` command: a thin shell over the library. Heavy packages are imported inside commands only.

The shared options are in ``fluxtrt.cli.options``; ``fluxtrt serve`` is in ``fluxtrt.cli.serve``."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from fluxtrt import __version__
from fluxtrt.cli.options import (
    MODEL_HELP,
    backend_options,
    device_options,
    given_options,
    gpus_option,
    model_option,
    relaunched,
    sampler_options,
    seed_option,
    vae_option,
)
from fluxtrt.cli.serve import serve
from fluxtrt.config import DEFAULT_FBC_THRESHOLD, BuildConfig, InferConfig, SamplerConfig
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


@click.group(cls=FluxtrtGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fluxtrt")
@click.option("--verbose", is_flag=True, help="Show the full traceback of an error.")
def main(verbose: bool) -> None:
    """FLUX.1-Kontext image edits with fast inference engines."""


main.add_command(serve)


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
    help="Many edits from one load: a JSON-lines file, one {image, prompt, out[, seed, steps, guidance, size, lora, "
    "lora_scale]} a line (instead of --image/--prompt/--out).",
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
        from fluxtrt.serve.edits import run_edits_command
        from fluxtrt.serve.options import ServedSource

        one = {"--image": image, "--prompt": prompt, "--out": out, "--height": height, "--width": width, "--gpus": gpus}
        source = ServedSource(model, engines, device, dtype, fbc, vae, low_vram)
        return run_edits_command(edits, one, source, SamplerConfig(scheduler, sigmas, steps), seed, guidance, loras)
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
    from fluxtrt.infer import check_split_before_launch, run_infer

    if relaunched(config.gpus, config.device, check=lambda: check_split_before_launch(config)):
        return
    from fluxtrt.console import print_infer_report, step_progress
    from fluxtrt.parallel.launch import is_main_process

    with step_progress() as on_step:
        report = run_infer(config, on_step=on_step)
    if is_main_process():
        print_infer_report(report, config.out)


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
@click.option("--check", is_flag=True, help="Also hash every file, the largest included (infer --engines hashes "
              "files up to 2 GiB and checks the size of larger ones).")  # fmt: skip
def inspect(engines_dir, check):
    """Show what ENGINES_DIR (from `fluxtrt build`) holds: components, shapes, precision, sizes, versions; for an
    ONNX-only directory, the trtexec command that builds each engine. Exits 1, naming every problem, when the
    directory is not what `infer --engines` can load: a component not built, a file missing, truncated or changed,
    a build's leftovers or a build still writing it."""
    from fluxtrt.console import print_manifest, print_problems, print_trtexec_commands
    from fluxtrt.engines.manifest import Manifest
    from fluxtrt.engines.verify import directory_problems

    manifest = Manifest.load(engines_dir, label="ENGINES_DIR")
    print_manifest(manifest, engines_dir)
    print_trtexec_commands(manifest)
    problems = directory_problems(manifest, engines_dir, full=check)
    print_problems(problems)
    if problems:
        sys.exit(1)


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
@click.option("--lora", "loras", multiple=True, metavar="FILE[:SCALE]",
              help="A FLUX LoRA every row edits with (fused into the stages' model, merged into each engines "
              "directory's transformer), so the fidelity columns compare like with like; repeatable.")  # fmt: skip
@device_options
@gpus_option
def compare(model, stages, engines, image, prompt, resolution, runs, warmup, warmup_steps, seed, diffusers_check,
            prompt_cache, engines_fbc, report_dir, vae, loras, device, dtype, gpus):  # fmt: skip
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
        loras=tuple(loras),
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
