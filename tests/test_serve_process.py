"""`fluxtrt serve` as a real process: listening at once, ready after warm-up, the load test at concurrency 1, 4 and 16
(every answer 200 or 503, every 200 an image of the asked size, the server answering afterwards), and SIGTERM while
an edit runs: the edit is answered and the process exits 0."""

from __future__ import annotations

import asyncio
import os
import queue
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from benchmarks.serve_load import load_test  # noqa: E402
from tests.serve_support import metric, png_bytes, wait_until  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SIZE = "64x64"


@pytest.fixture(scope="module")
def process():
    command = [sys.executable, "-m", "fluxtrt", "serve", "--model", "tiny", "--device", "cpu", "--port", "0",
               "--max-batch", "4", "--max-queue", "4", "--keep-reference-size", "--warmup-size", SIZE,
               "--warmup-steps", "1", "--steps", "2"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()
    try:
        first = lines.get(timeout=120)
        match = re.search(r"listening on (http://127\.0\.0\.1:\d+)", first)
        assert match, first
        proc.url, proc.lines = match.group(1), lines
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def test_health_at_once_then_ready_after_warm_up(process):
    assert httpx.get(f"{process.url}/health", timeout=30).status_code == 200
    wait_until(lambda: httpx.get(f"{process.url}/ready", timeout=30).status_code == 200, "ready", 300)
    assert httpx.get(f"{process.url}/ready").json()["max_batch"] == 4


def test_load_at_concurrency_1_4_16(process):
    wait_until(lambda: httpx.get(f"{process.url}/ready", timeout=30).status_code == 200, "ready", 300)
    result = asyncio.run(load_test(process.url, png_bytes(), "make it red", SIZE, 2, [1, 4, 16], 2))
    levels = {lv["concurrency"]: lv for lv in result["levels"]}
    for level in levels.values():
        assert set(level["statuses"]) <= {"200", "503"}, level
        assert level["wrong_images"] == 0 and level["missing_retry_after"] == 0, level
    assert levels[1]["statuses"] == {"200": 2}  # one client never finds the queue full
    assert sum(lv["statuses"].get("200", 0) for lv in levels.values()) >= 2 + 4
    assert result["health_after"] == 200
    text = httpx.get(f"{process.url}/metrics").text
    assert metric(text, 'fluxtrt_requests_total{outcome="ok"}') == sum(
        lv["statuses"].get("200", 0) for lv in levels.values()
    )


def test_sigterm_answers_the_running_edit_and_exits_0(process):
    wait_until(lambda: httpx.get(f"{process.url}/ready", timeout=30).status_code == 200, "ready", 300)
    answers: list = []
    form = {"prompt": "make it red", "size": SIZE, "steps": "40"}
    files = {"image": ("in.png", png_bytes())}
    post = lambda: answers.append(httpx.post(f"{process.url}/v1/images/edits", data=form, files=files, timeout=300))  # noqa: E731
    thread = threading.Thread(target=post)
    thread.start()
    running = lambda: metric(httpx.get(f"{process.url}/metrics").text, "fluxtrt_running_images") == 1  # noqa: E731
    wait_until(running, "the edit to run", 120)
    process.send_signal(signal.SIGTERM)
    thread.join(300)
    assert answers and answers[0].status_code == 200
    assert len(answers[0].json()["data"]) == 1
    assert process.wait(120) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{process.url}/health", timeout=5)
