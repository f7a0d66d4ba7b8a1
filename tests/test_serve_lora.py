"""`fluxtrt serve --lora` over the tiny model, one server for every check: a request's LoRA edit equals the edit of
the pipeline `fluxtrt infer --lora` loads (same file, scale and seed), a request without it afterwards equals the
LoRA-free edit exactly, and an unknown LoRA or a bad scale is refused before any edit; a LoRA file that is not one,
or that does not fit the model, stops `fluxtrt serve` with one error line."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("peft")
httpx = pytest.importorskip("httpx")

from fluxtrt.config import SamplerConfig  # noqa: E402
from fluxtrt.serve.options import ServeConfig, ServedSource  # noqa: E402
from tests.serve_support import LiveServer, metric, png_bytes  # noqa: E402

STEPS, SIZE = 2, 64


@pytest.fixture(scope="module")
def lora_file(tiny, tmp_path_factory):
    from tests.test_lora import make_lora

    path = tmp_path_factory.mktemp("serve-lora") / "style.safetensors"
    make_lora(tiny.transformer, path, seed=1)
    return path


@pytest.fixture(scope="module")
def live(lora_file):
    """The server as `fluxtrt serve --model tiny --lora FILE:0.5` loads it (the tiny model loaded by the server)."""
    config = ServeConfig(ServedSource("tiny", device="cpu"), SamplerConfig(steps=STEPS), port=0, warmup_steps=0,
                         keep_reference_size=True, loras=(f"{lora_file}:0.5",))  # fmt: skip
    server = LiveServer(config, None)
    assert server.worker.ready.wait(120), server.worker.error
    yield server
    server.close()


def post(live, **fields) -> httpx.Response:
    form = {"prompt": "make it red", "size": f"{SIZE}x{SIZE}", "seed": "7", **fields}
    return httpx.post(f"{live.url}/v1/images/edits", data=form, files={"image": ("in.png", png_bytes())}, timeout=120)


def image(answer: httpx.Response) -> np.ndarray:
    assert answer.status_code == 200, answer.text
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(answer.json()["data"][0]["b64_json"]))).convert("RGB"))


def test_lora_edit_equals_infer_lora_and_the_next_edit_without_it_is_lora_free(live, lora_file):
    from fluxtrt.lora.files import read_loras
    from fluxtrt.models.options import ModelOptions
    from fluxtrt.pipeline.model import ModelSource

    before = image(post(live))
    answer = post(live, lora="style", lora_scale="0.8")
    with_lora = image(answer)
    assert answer.json()["lora"] == "style" and answer.json()["lora_scale"] == 0.8
    after = image(post(live))
    assert np.array_equal(after, before)  # the LoRA came out bit for bit
    assert np.abs(with_lora.astype(int) - before).mean() > 1  # and it changed the edit
    # `infer --lora FILE:0.8` loads the model with the LoRA fused: the same edit.
    with ModelSource(ModelOptions("tiny", "cpu", "fp32")).load(read_loras([f"{lora_file}:0.8"])) as pipeline:
        reference = Image.open(io.BytesIO(png_bytes())).convert("RGB")
        want = pipeline.edit(reference, "make it red", sampler=SamplerConfig(steps=STEPS), seed=7, height=SIZE,
                             width=SIZE, max_area=SIZE * SIZE, auto_resize=False).images[0]  # fmt: skip
    assert np.array_equal(with_lora, np.asarray(want))
    default = post(live, lora="style")  # the scale given at start
    assert default.json()["lora_scale"] == 0.5 and not np.array_equal(image(default), with_lora)
    ready = httpx.get(f"{live.url}/ready").json()
    assert [(lora["name"], lora["scale"]) for lora in ready["loras"]] == [("style", 0.5)]
    text = httpx.get(f"{live.url}/metrics").text
    assert metric(text, 'fluxtrt_lora_requests_total{lora="style"}') == 2
    assert metric(text, 'fluxtrt_lora_requests_total{lora="none"}') >= 2


@pytest.mark.parametrize(("fields", "param"), [({"lora": "nope"}, "lora"),
                                               ({"lora": "style", "lora_scale": "strong"}, "lora_scale"),
                                               ({"lora": "style", "lora_scale": "inf"}, "lora_scale"),
                                               ({"lora_scale": "0.5"}, "lora_scale")])  # fmt: skip
def test_unknown_lora_or_bad_scale_is_400_before_any_edit(live, fields, param):
    batches = lambda: metric(httpx.get(f"{live.url}/metrics").text, 'fluxtrt_batches_total{outcome="ok"}')  # noqa: E731
    calls = batches()
    answer = post(live, **fields)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    if param == "lora":
        assert "nope" in error["message"] and "style" in error["message"]
    assert batches() == calls


def test_serve_refuses_a_bad_lora_in_one_line(tmp_path, tiny):
    """Not a LoRA: refused before listening. A LoRA of another model size: refused once the model is loaded, and
    the server stops without serving."""
    from tests.conftest import run_cli
    from tests.test_lora import write_lora

    text = tmp_path / "notes.safetensors"
    text.write_text("not a LoRA")
    result = run_cli("serve", "--model", "tiny", "--device", "cpu", "--port", "0", "--lora", str(text))
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(errors) == 1 and "is not a readable safetensors file" in errors[0]
    misfit = write_lora(tmp_path / "big.safetensors", {
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 3072),
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(3072, 4)})  # fmt: skip
    result = run_cli("serve", "--model", "tiny", "--device", "cpu", "--port", "0", "--warmup-steps", "0", "--lora",
                     f"big={misfit}")  # fmt: skip
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert result.exit_code == 1 and len(errors) == 1, result.stderr
    assert "transformer_blocks.0.attn.to_q has lora_A (4, 3072)" in errors[0]
    assert "ready:" not in result.stderr


def test_edits_file_with_a_lora_edits_as_infer_lora(tmp_path, lora_file):
    """`infer --edits --lora FILE:0.5`: a line without `lora` edits with it, as `infer --lora FILE:0.5` does; a line
    naming no --lora file fails alone."""
    from fluxtrt.lora.files import read_loras
    from fluxtrt.models.options import ModelOptions
    from fluxtrt.pipeline.model import ModelSource
    from tests.conftest import make_image, run_cli

    make_image(96, 64).save(tmp_path / "in.png")
    lines = [{"image": "in.png", "prompt": "red", "out": "with.png"},
             {"image": "in.png", "prompt": "red", "out": "other.png", "lora": "other"}]  # fmt: skip
    (tmp_path / "edits.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = run_cli("infer", "--model", "tiny", "--device", "cpu", "--steps", "1", "--seed", "4", "--edits",
                     str(tmp_path / "edits.jsonl"), "--lora", f"{lora_file}:0.5")  # fmt: skip
    failures = [line for line in result.stderr.splitlines() if line.startswith("failed: ")]
    assert result.exit_code == 1 and len(failures) == 1, result.stderr
    assert "line 2: lora is 'other'" in failures[0] and not (tmp_path / "other.png").exists()
    image = Image.open(tmp_path / "in.png").convert("RGB")
    with ModelSource(ModelOptions("tiny", "cpu", "fp32")).load(read_loras([f"{lora_file}:0.5"])) as pipeline:
        want = pipeline.edit(image, "red", sampler=SamplerConfig(steps=1), seed=4).images[0]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "with.png")), np.asarray(want))


def test_edits_lines_pick_their_loras(tmp_path):
    """A line's LoRAs: every --lora at its scale by default, none for null, one by its name at its own scale or
    the --lora one; a bad name or scale is the line's error."""
    from fluxtrt.errors import InputError
    from fluxtrt.lora.files import Lora, LoraSpec
    from fluxtrt.serve.edits import parse_line

    loras = {"a": Lora(LoraSpec(tmp_path / "a.safetensors", 0.5)), "b": Lora(LoraSpec(tmp_path / "b.safetensors", 1.0))}

    def picked(**keys):
        return parse_line(1, json.dumps({"image": "i.png", "prompt": "p", "out": "o.png", **keys}), tmp_path).loras(
            loras
        )

    assert picked() == (("a", 0.5), ("b", 1))
    assert picked(lora=None) == ()
    assert picked(lora="b") == (("b", 1),)
    assert picked(lora="a", lora_scale=0.25) == (("a", 0.25),)
    with pytest.raises(InputError, match="lora is 'c', not the stem of a --lora file"):
        picked(lora="c")
    for bad in ({"lora": "a", "lora_scale": "x"}, {"lora_scale": 0.5}, {"lora": 3}):
        with pytest.raises(InputError, match="lora"):
            picked(**bad)
