"""`fluxtrt serve`'s HTTP API on a real uvicorn server over the tiny model: the official openai client, every bad
input refused before any pipeline call (and the server answering the next good request), the bearer key, the bounded
queue, batching, and a disconnected client's request dropped without a pipeline call."""

from __future__ import annotations

import base64
import io
import socket
import threading
import zlib

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from fluxtrt.config import SamplerConfig  # noqa: E402
from fluxtrt.serve.options import ServeConfig, ServedSource  # noqa: E402
from tests.serve_support import KEY, KEY_ENV, GatedPipeline, LiveServer, metric, png_bytes, wait_until  # noqa: E402

MAX_QUEUE, MAX_BATCH, STEPS = 3, 4, 2
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def live(tiny_pipeline):
    from fluxtrt.serve.load import wrap

    mp = pytest.MonkeyPatch()
    mp.setenv(KEY_ENV, KEY)
    config = ServeConfig(ServedSource("tiny", device="cpu"), SamplerConfig(steps=STEPS), port=0, max_queue=MAX_QUEUE,
                         api_key_env=KEY_ENV, max_upload_mb=1, max_pixels=2048 * 2048, keep_reference_size=True,
                         warmup_steps=0)  # fmt: skip
    gated = GatedPipeline(tiny_pipeline)
    server = LiveServer(config, lambda: wrap(gated, "model tiny", MAX_BATCH))
    assert server.worker.ready.wait(120)
    server.gated = gated
    yield server
    gated.gate.set()
    server.close()
    mp.undo()


def good_edit(live, **extra) -> httpx.Response:
    form = {"prompt": "make it red", "size": "64x64", **extra}
    return httpx.post(f"{live.url}/v1/images/edits", data=form, files={"image": ("in.png", png_bytes())},
                      headers=AUTH, timeout=120)  # fmt: skip


def decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)


def test_openai_client_edits_and_batched_images_match_single_edits(live, tiny_pipeline):
    """client.images.edit(...) unchanged: n=2 images of the asked size, image i as an edit alone with seed + i."""
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key=KEY, max_retries=0, timeout=120)
    answer = client.images.edit(image=("in.png", png_bytes(), "image/png"), prompt="make it red", n=2, size="64x64",
                                response_format="b64_json", extra_body={"steps": STEPS, "seed": 5})  # fmt: skip
    assert len(answer.data) == 2
    extra = answer.to_dict()  # fluxtrt's fields ride along in the client's response object
    assert extra["seed"] == 5 and extra["batch"] == 2 and extra["size"] == "64x64"
    assert extra["timings_ms"]["edit"] > 0 and extra["timings_ms"]["transformer"] > 0
    images = [decode(d.b64_json) for d in answer.data]
    reference = Image.open(io.BytesIO(png_bytes())).convert("RGB")
    for i, image in enumerate(images):
        assert image.shape == (64, 64, 3)
        alone = tiny_pipeline.edit(reference, "make it red", sampler=SamplerConfig(steps=STEPS), seed=5 + i,
                                   height=64, width=64, max_area=64 * 64, auto_resize=False).images[0]  # fmt: skip
        assert np.abs(image - np.asarray(alone, dtype=np.int16)).max() <= 2
    assert np.abs(images[0] - images[1]).max() > 10  # two seeds, two images


def huge_png(side: int = 20000) -> bytes:
    """A valid 1-bit ``side`` x ``side`` PNG (all black), made without holding its pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return len(data).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")

    row = b"\x00" * (1 + (side + 7) // 8)
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = side.to_bytes(4, "big") * 2 + bytes([1, 0, 0, 0, 0])  # 1-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


BAD = {
    "no image": (dict(files=None), 400, "image"),
    "text as image": (dict(files={"image": ("in.png", b"this is not an image")}), 400, "image"),
    "truncated png": (dict(files={"image": ("in.png", png_bytes(256, 256)[:300])}), 400, "image"),
    "20000x20000 png": (dict(files={"image": ("in.png", huge_png())}), 400, "image"),
    "empty prompt": (dict(data={"prompt": "  "}), 400, "prompt"),
    "prompt over the token limit": (dict(data={"prompt": "word " * 600}), 400, "prompt"),
    "n=1000": (dict(data={"n": "1000"}), 400, "n"),
    "bad size": (dict(data={"size": "huge"}), 400, "size"),
    "size not a multiple of 16": (dict(data={"size": "100x100"}), 400, "size"),
    "steps over the limit": (dict(data={"steps": "100000"}), 400, "steps"),
    "url response format": (dict(data={"response_format": "url"}), 400, "response_format"),
    "wrong key": (dict(headers={"Authorization": "Bearer wrong"}), 401, None),
    "no key": (dict(headers={}), 401, None),
    "upload over the limit": (dict(files={"image": ("in.png", b"\x89PNG" + b"0" * (2 * 1024 * 1024))}), 413, None),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_refused_before_the_pipeline_and_the_next_edit_succeeds(live, case):
    overrides, status, param = BAD[case]
    form = {"prompt": "make it red", "size": "64x64", "steps": str(STEPS), **overrides.get("data", {})}
    files = overrides["files"] if "files" in overrides else {"image": ("in.png", png_bytes())}
    headers = overrides.get("headers", AUTH)
    calls = len(live.gated.batches)
    answer = httpx.post(f"{live.url}/v1/images/edits", data=form, files=files, headers=headers, timeout=120)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    assert len(live.gated.batches) == calls  # no pipeline call
    after = good_edit(live, steps=str(STEPS))
    assert after.status_code == 200 and decode(after.json()["data"][0]["b64_json"]).shape == (64, 64, 3)


def test_routes_health_ready_metrics_docs(live):
    assert httpx.get(f"{live.url}/health").json() == {"status": "ok"}  # no key needed
    assert httpx.get(f"{live.url}/ready").status_code == 401
    ready = httpx.get(f"{live.url}/ready", headers=AUTH).json()
    assert ready["status"] == "ready" and ready["max_batch"] == MAX_BATCH
    text = httpx.get(f"{live.url}/metrics", headers=AUTH).text
    for name in ("fluxtrt_requests_total", "fluxtrt_queue_depth", "fluxtrt_edit_seconds_bucket",
                 "fluxtrt_batch_images_bucket", "fluxtrt_ready"):  # fmt: skip
        assert name in text
    assert httpx.get(f"{live.url}/docs", headers=AUTH).status_code == 200
    assert "/v1/images/edits" in httpx.get(f"{live.url}/openapi.json", headers=AUTH).json()["paths"]


def post_in_thread(live, results: list, **extra) -> threading.Thread:
    thread = threading.Thread(target=lambda: results.append(good_edit(live, steps=str(STEPS), **extra)))
    thread.start()
    return thread


def queue_depth(live) -> float:
    return metric(httpx.get(f"{live.url}/metrics", headers=AUTH).text, "fluxtrt_queue_depth")


def test_full_queue_answers_503_and_queued_requests_share_one_pipeline_call(live):
    live.gated.gate.clear()
    live.gated.entered.clear()
    results: list = []
    first = post_in_thread(live, results)
    assert live.gated.entered.wait(120)  # the worker holds the first request
    calls = len(live.gated.batches)
    queued = [post_in_thread(live, results, seed=str(i)) for i in range(MAX_QUEUE)]
    wait_until(lambda: queue_depth(live) == MAX_QUEUE, "a full queue")
    refused = good_edit(live, steps=str(STEPS))
    assert refused.status_code == 503 and int(refused.headers["retry-after"]) > 0
    assert refused.json()["error"]["code"] == "queue_full"
    live.gated.gate.set()
    for thread in [first, *queued]:
        thread.join(120)
    assert [r.status_code for r in results] == [200] * (1 + MAX_QUEUE)
    assert live.gated.batches[calls:] == [MAX_QUEUE]  # the queued three ran as one batch


def test_disconnected_client_costs_no_pipeline_call(live):
    live.gated.gate.clear()
    live.gated.entered.clear()
    results: list = []
    first = post_in_thread(live, results)
    assert live.gated.entered.wait(120)
    calls = len(live.gated.batches)
    before = metric(
        httpx.get(f"{live.url}/metrics", headers=AUTH).text, 'fluxtrt_requests_total{outcome="disconnected"}'
    )
    request = httpx.Request("POST", f"{live.url}/v1/images/edits", headers=AUTH,
                            data={"prompt": "make it blue", "size": "64x64"},
                            files={"image": ("in.png", png_bytes())})  # fmt: skip
    body = request.read()
    host, port = live.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        head = f"POST /v1/images/edits HTTP/1.1\r\nHost: {host}\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in request.headers.items() if k.lower() != "host"
        )
        sock.sendall(head.encode() + b"\r\n" + body)
        wait_until(lambda: queue_depth(live) == 1, "the request to be queued")
    text = lambda: httpx.get(f"{live.url}/metrics", headers=AUTH).text  # noqa: E731
    wait_until(lambda: metric(text(), 'fluxtrt_requests_total{outcome="disconnected"}') == before + 1, "the drop")
    assert queue_depth(live) == 0
    live.gated.gate.set()
    first.join(120)
    assert results[0].status_code == 200
    assert live.gated.batches[calls:] == []  # the dropped request never reached the pipeline


def test_ready_is_503_until_loaded_and_edits_wait_for_it(tiny_pipeline, monkeypatch):
    from fluxtrt.serve.load import wrap

    release = threading.Event()

    def slow_loader():
        assert release.wait(120)
        return wrap(tiny_pipeline, "model tiny", 1)

    config = ServeConfig(ServedSource("tiny", device="cpu"), SamplerConfig(steps=STEPS), port=0, warmup_steps=0,
                         keep_reference_size=True)  # fmt: skip
    server = LiveServer(config, slow_loader)
    try:
        assert httpx.get(f"{server.url}/health").status_code == 200
        loading = httpx.get(f"{server.url}/ready")
        assert loading.status_code == 503 and loading.json()["status"] == "loading"
        early = httpx.post(f"{server.url}/v1/images/edits", data={"prompt": "x"},
                           files={"image": ("in.png", png_bytes())})  # fmt: skip
        assert early.status_code == 503 and early.json()["error"]["code"] == "not_ready"
        assert "retry-after" in early.headers
        release.set()
        assert server.worker.ready.wait(120)
        assert httpx.get(f"{server.url}/ready").json()["status"] == "ready"
    finally:
        release.set()
        server.close()
