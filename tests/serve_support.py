"""A real `fluxtrt serve` app on a real uvicorn server in a thread of the test process, on a loopback port, over the
session's tiny pipeline; and the pipeline with a gate, so a test can hold the worker inside an edit."""

from __future__ import annotations

import io
import re
import threading
import time

import numpy as np
from PIL import Image

KEY_ENV = "FLUXTRT_TEST_SERVE_KEY"
KEY = "test-key-0123456789"
WAIT_S = 120.0


def png_bytes(width: int = 64, height: int = 64, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC).save(buffer, format="PNG")
    return buffer.getvalue()


class GatedPipeline:
    """The real pipeline behind a gate: ``edit`` waits for ``gate`` and records each call's batch size."""

    def __init__(self, pipeline):
        self._pipeline = pipeline
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.batches: list[int] = []

    def edit(self, image, prompt, **kwargs):
        self.batches.append(len(prompt) if isinstance(prompt, list) else 1)
        self.entered.set()
        assert self.gate.wait(WAIT_S), "the test never opened the gate"
        return self._pipeline.edit(image, prompt, **kwargs)

    def __getattr__(self, name):
        return getattr(self._pipeline, name)


class LiveServer:
    """``create_app`` served by uvicorn on 127.0.0.1 (a free port) from a thread; ``loader`` gives the pipeline."""

    def __init__(self, config, loader):
        import uvicorn

        from fluxtrt.serve.app import create_app
        from fluxtrt.serve.metrics import Metrics
        from fluxtrt.serve.server import bind, make_worker

        self.metrics = Metrics()
        self.worker = make_worker(config, self.metrics, loader=loader)
        app = create_app(config, self.worker, self.metrics)
        sock = bind("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.worker.start()
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + WAIT_S
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.server.started, "uvicorn did not start"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(WAIT_S)


def metric(text: str, name: str) -> float:
    """The value of one sample (``name`` with its labels, as exposed) in Prometheus text."""
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in the metrics"
    return float(match.group(1))


def wait_until(condition, what: str, timeout_s: float = WAIT_S) -> None:
    """Poll ``condition`` (bounded); fail naming ``what`` when it never holds."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")
