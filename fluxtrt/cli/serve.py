"""``fluxtrt serve``: the command line of ``fluxtrt.serve``."""

from __future__ import annotations

from pathlib import Path

import click

from fluxtrt.cli.options import MODEL_HELP, device_options, sampler_options, vae_option
from fluxtrt.config import SamplerConfig
from fluxtrt.specs.flux import Resolution


@click.command()
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
@click.option("--lora", "loras", multiple=True, metavar="[NAME=]FILE[:SCALE]",
              help="A FLUX LoRA loaded at start (NAME: the file's stem unless given); a request picks it with the "
              "form field lora=NAME and its strength with lora_scale (default SCALE, else 1). Repeatable.")  # fmt: skip
@device_options
def serve(model, engines, host, port, max_queue, max_batch, api_key_env, max_upload_mb, max_pixels, max_steps,
          keep_reference_size, warmup_size, warmup_steps, scheduler, sigmas, steps, fbc, vae, low_vram, loras, device,
          dtype):  # fmt: skip
    """Serve edits over HTTP: POST /v1/images/edits (OpenAI's Images API), a web page at /, /health, /ready,
    /metrics, /docs. Loads and warms up once; SIGTERM finishes the requests taken and exits 0."""
    from fluxtrt.console import err
    from fluxtrt.serve.options import ServeConfig, ServedSource

    source = ServedSource(model, engines, device, dtype, fbc, vae, low_vram)
    config = ServeConfig(source, SamplerConfig(scheduler, sigmas, steps), host, port, max_queue, max_batch,
                         api_key_env, max_upload_mb, max_pixels, max_steps, keep_reference_size,
                         Resolution.parse(warmup_size, "--warmup-size") if warmup_size else None,
                         warmup_steps, tuple(loras))  # fmt: skip
    from fluxtrt.serve.server import serve as run_server

    run_server(config, on_line=lambda line: err().print(line, markup=False, highlight=False, soft_wrap=True))
