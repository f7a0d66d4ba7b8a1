"""The web page at / in a real headless Chromium (the system's, driven by Playwright): upload an image, type a prompt,
submit; the edit appears beside the input, checked on the screenshot's pixels against the image the API returned."""

from __future__ import annotations

import base64
import io
import shutil

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api")

from fluxtrt.config import SamplerConfig  # noqa: E402
from fluxtrt.serve.options import ServeConfig, ServedSource  # noqa: E402
from tests.serve_support import KEY, KEY_ENV, LiveServer, png_bytes  # noqa: E402

CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser")) if p), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium)")


def test_page_shows_the_edit_beside_the_input(tiny_pipeline, tmp_path, monkeypatch):
    from fluxtrt.serve.load import wrap

    monkeypatch.setenv(KEY_ENV, KEY)
    config = ServeConfig(ServedSource("tiny", device="cpu"), SamplerConfig(steps=2), port=0, api_key_env=KEY_ENV,
                         keep_reference_size=True, warmup_steps=0)  # fmt: skip
    server = LiveServer(config, lambda: wrap(tiny_pipeline, "model tiny", 1))
    source = tmp_path / "in.png"
    source.write_bytes(png_bytes(96, 64))
    try:
        assert server.worker.ready.wait(120)
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1000, "height": 900})
            page.goto(server.url + "/")
            page.fill("#key", KEY)
            page.dispatch_event("#key", "change")
            page.wait_for_function("document.getElementById('status').textContent.includes('model tiny')")
            page.set_input_files("#file", str(source))
            page.fill("#prompt", "make it red")
            page.fill("#size", "96x64")
            page.fill("#steps", "2")
            page.click("#submit")
            page.wait_for_function("document.getElementById('output-image').naturalWidth > 0", timeout=120_000)
            caption = page.text_content("#output-caption")
            src = page.get_attribute("#output-image", "src")
            shot = Image.open(io.BytesIO(page.locator("#output-image").screenshot())).convert("RGB")
            inputs_shown = page.evaluate("document.getElementById('input-image').naturalWidth")
            browser.close()
    finally:
        server.close()
    assert "96x64" in caption and "model tiny" in caption
    assert inputs_shown == 96
    returned = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB")
    assert returned.size == (96, 64)
    # The screenshot of the output element is the returned image, scaled: brought back to 96x64 it matches it.
    seen = np.asarray(shot.resize(returned.size, Image.Resampling.BOX), dtype=np.float32)
    want = np.asarray(returned, dtype=np.float32)
    assert seen.std() > 5  # not an empty (uniform) box
    assert np.abs(seen - want).mean() < 12
