"""The HTTP front: an ASGI app (FastAPI) with OpenAI's image-edit route, health, readiness, metrics and the web page.

Every request is checked in full (key, body size, fields, image, prompt, geometry against the engines) before it is
queued; the worker thread alone touches the pipeline."""

from __future__ import annotations

import asyncio
import base64
import io
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from fluxtrt import __version__
from fluxtrt.errors import InputError
from fluxtrt.serve.guard import BodyTooLarge, Guard, drain, error_body
from fluxtrt.serve.loras import describe
from fluxtrt.serve.metrics import Metrics, outcome_of
from fluxtrt.serve.options import RETRY_AFTER_S, ServeConfig
from fluxtrt.serve.request import RequestError, parse_request
from fluxtrt.serve.worker import EditWorker, Job

STATIC = Path(__file__).parent / "static"
# Form fields and files a request may have (an edit has one file and a handful of fields).
MAX_FORM_FIELDS, MAX_FORM_FILES = 32, 2
# How often a queued request checks that its client is still connected, in seconds.
DISCONNECT_POLL_S = 0.25

EDIT_FORM = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image", "prompt"],
                    "properties": {
                        "image": {
                            "type": "string",
                            "format": "binary",
                            "description": "The image to edit (PNG, JPEG, WebP).",
                        },
                        "prompt": {"type": "string", "description": "The edit instruction."},
                        "n": {
                            "type": "integer",
                            "default": 1,
                            "description": "Images to make (at most the built batch).",
                        },
                        "size": {
                            "type": "string",
                            "default": "auto",
                            "description": "WIDTHxHEIGHT or auto (the input's).",
                        },
                        "response_format": {"type": "string", "enum": ["b64_json"], "default": "b64_json"},
                        "model": {"type": "string", "description": "Accepted and ignored: the server runs one model."},
                        "steps": {"type": "integer", "description": "fluxtrt: denoising steps."},
                        "seed": {"type": "integer", "description": "fluxtrt: seed of image 0 (image i gets seed + i)."},
                        "guidance": {"type": "number", "default": 2.5, "description": "fluxtrt: distilled guidance."},
                        "lora": {"type": "string", "description": "fluxtrt: one of the LoRAs /ready lists."},
                        "lora_scale": {
                            "type": "number",
                            "description": "fluxtrt: the LoRA's strength (default: its --lora SCALE, else 1).",
                        },
                    },
                }
            }
        },  # fmt: skip
    }
}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
    return JSONResponse(error_body(message, status, param, code), status_code=status, headers=headers)


def create_app(config: ServeConfig, worker: EditWorker, metrics: Metrics | None = None) -> Any:
    """The ASGI app (FastAPI wrapped in ``Guard``) serving ``worker``; its shutdown stops the worker, which finishes
    the work it holds."""
    metrics = metrics or Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await asyncio.to_thread(worker.stop)

    app = FastAPI(title="fluxtrt", version=__version__, lifespan=lifespan,
                  description="FLUX.1-Kontext image edits, in the shape of OpenAI's Images API.")  # fmt: skip
    app.state.metrics, app.state.worker = metrics, worker

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), None, None)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, f"invalid request: {exc.errors()}", None, "invalid_request")

    @app.get("/health")
    async def health() -> dict:
        """Alive: answers as soon as the server listens, loaded or not."""
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> Any:
        """200 once the model is loaded and warm, with what it runs; 503 before (or when loading failed)."""
        if worker.state != "ready":
            body = {"status": worker.state, "error": worker.error or None}
            return JSONResponse(body, status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})
        loaded = worker.loaded
        return {"status": "ready", "model": loaded.label, "device": loaded.device, "max_batch": worker.max_batch,
                "default_steps": config.sampler.num_steps, "max_steps": config.max_steps,
                "load_s": round(loaded.load_s, 3), "warmup_s": round(loaded.warmup_s, 3),
                "loras": describe(worker.loras)}  # fmt: skip

    @app.get("/metrics")
    async def prometheus() -> Response:
        """Prometheus text format."""
        metrics.ready.set(1 if worker.state == "ready" else 0)
        return Response(metrics.text(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.post("/v1/images/edits", openapi_extra=EDIT_FORM)
    async def images_edits(request: Request) -> Any:
        """Edit an image as the prompt says (OpenAI's ``images.edit``); the answer carries the images as base64 PNG
        and the server-side timings."""
        response = await _edit(request, config, worker)
        metrics.count("disconnected" if response.status_code == 499 else outcome_of(response.status_code))
        return response

    def on_refused(status: int) -> None:
        metrics.count(outcome_of(status))

    return Guard(app, config.api_key(), config.max_upload_bytes, on_refused)


async def _edit(request: Request, config: ServeConfig, worker: EditWorker) -> Response:
    if worker.state != "ready":
        return error_response(503, f"the model is {worker.state}: retry when /ready answers 200", None, "not_ready")
    try:
        fields, image_bytes = await _read_form(request)
        loaded = worker.loaded
        edit = await asyncio.to_thread(
            parse_request, fields, image_bytes, tokenizer=loaded.tokenizer, max_tokens=loaded.max_tokens,
            max_batch=worker.max_batch, max_steps=config.max_steps, default_steps=config.sampler.num_steps,
            max_pixels=config.max_pixels, keep_reference_size=config.keep_reference_size,
            loras={name: lora.spec.scale for name, lora in worker.loras.items()},
        )  # fmt: skip
        size = edit.size
        pipeline = loaded.pipeline
        target, reference = pipeline.geometry(edit.image.size, size.height if size else None,
                                              size.width if size else None, edit.max_area,
                                              not config.keep_reference_size)  # fmt: skip
        pipeline.check_fits(edit.n, target, reference)
        job = Job(edit, target, reference)
        future = worker.submit(job)
    except BodyTooLarge:
        await drain(request.receive)
        return error_response(413, f"the request body is over this server's limit of {config.max_upload_bytes:,} "
                              "bytes: upload a smaller image", None, "request_too_large")  # fmt: skip
    except RequestError as exc:
        return error_response(exc.status, str(exc), exc.param, exc.code)
    except InputError as exc:
        return error_response(400, str(exc), None, "invalid_value")
    waiting = asyncio.wrap_future(future)
    while not waiting.done():
        await asyncio.wait({waiting}, timeout=DISCONNECT_POLL_S)
        # A client gone while its request waits costs no GPU time (once running, the edit finishes).
        if not waiting.done() and await request.is_disconnected() and worker.cancel(job):
            return Response(status_code=499)
    try:
        result = waiting.result()
    except RequestError as exc:
        return error_response(exc.status, str(exc), exc.param, exc.code)
    request.app.state.metrics.answered(edit.lora, (result.queue_ms + result.edit_ms) / 1000)
    data = await asyncio.to_thread(lambda: [{"b64_json": _png_base64(img)} for img in result.images])
    return JSONResponse({
        "created": int(time.time()),
        "data": data,
        "output_format": "png",
        "size": f"{result.target.width}x{result.target.height}",
        "model": loaded.label,
        "seed": edit.seed,
        "steps": edit.steps,
        "lora": edit.lora,
        "lora_scale": edit.lora_scale if edit.lora is not None else None,
        "batch": result.batch,
        "timings_ms": {"queue": round(result.queue_ms, 2), "edit": round(result.edit_ms, 2),
                       **{k: round(v, 2) for k, v in result.timings_ms.items()}},
        "warnings": result.warnings,
    })  # fmt: skip


async def _read_form(request: Request) -> tuple[dict[str, Any], bytes | None]:
    """The text fields and the uploaded image's bytes (None when no file was sent)."""
    try:
        form = await request.form(max_files=MAX_FORM_FILES, max_fields=MAX_FORM_FIELDS)
    except HTTPException as exc:  # malformed multipart, too many fields
        raise RequestError(f"the form could not be read: {exc.detail}", None, "invalid_form") from None
    uploads = [v for key in ("image", "image[]") for v in form.getlist(key)]
    if len(uploads) > 1:
        raise RequestError(f"{len(uploads)} images were sent: FLUX.1-Kontext edits one image a request", "image")
    image_bytes = None
    if uploads:
        if not isinstance(uploads[0], UploadFile):
            raise RequestError("image was sent as a text field: upload it as a file", "image", "invalid_image")
        image_bytes = await uploads[0].read()
    fields = {k: v for k, v in form.multi_items() if isinstance(v, str)}
    if form.get("mask") is not None:
        fields["mask"] = "given"
    return fields, image_bytes


def _png_base64(image: Any) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
