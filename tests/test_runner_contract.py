"""The runner contract (fluxtrt.backends.runner), one test over every backend this machine can run.

torch runs everywhere; onnxruntime on the engines the build writes (conftest's ``ort_engines``); aotinductor on the
tiny packages (conftest's ``aoti_engines``, about 90 s of compiling, so under the slow marker); tensorrt where it is
installed (never in CI: its builder is only on NVIDIA's index). For each: outputs with the spec's names, dtypes and
shapes at two geometries inside the built range; ShapeError for a wrong dtype, a missing input, a wrong rank and a
symbol outside the built range; DeviceMismatchError for a tensor on another device; and the lifecycle (a closed
runner refuses to run, loads again and computes the same).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from fluxtrt.backends.base import BACKENDS
from fluxtrt.backends.tensorrt.flavour import TENSORRT, TENSORRT_RTX
from fluxtrt.errors import DeviceMismatchError, EngineError, ShapeError
from fluxtrt.specs import COMPONENTS, Resolution
from fluxtrt.specs.flux import component_dims, dims_from_components
from tests.conftest import AOTI_GEOMETRIES, ORT_MIN_RES, cannot_run_engines

ORT_GEOMETRIES = [(1, ORT_MIN_RES, ORT_MIN_RES), (2, Resolution(384, 272), Resolution(272, 400))]


FLAVOURS = {"tensorrt": TENSORRT, "tensorrt-rtx": TENSORRT_RTX}
TRT_GEOMETRIES = [(1, ORT_MIN_RES, ORT_MIN_RES), (2, Resolution(384, 272), Resolution(272, 400))]


def _runners(backend: str, request):
    """(runner per component, two geometries inside the built range, one outside it or None)."""
    tiny = request.getfixturevalue("tiny")
    if backend == "torch":
        from fluxtrt.backends.torch_runner import torch_runners

        return torch_runners(tiny), AOTI_GEOMETRIES, None
    if backend == "onnxruntime":
        from fluxtrt.engines.load import load_engine_pipeline

        pipeline = load_engine_pipeline(request.getfixturevalue("ort_engines"), "cpu")
        request.addfinalizer(pipeline.close)
        return pipeline.runners, ORT_GEOMETRIES, (3, ORT_MIN_RES, ORT_MIN_RES)  # max batch 2
    if backend == "aotinductor":
        return request.getfixturevalue("aoti_engines"), AOTI_GEOMETRIES, (1, Resolution(192, 128), Resolution(192, 128))
    if backend in FLAVOURS:
        return _trt_runners(backend, request), TRT_GEOMETRIES, (3, ORT_MIN_RES, ORT_MIN_RES)
    pytest.skip(f"the {backend} backend writes ONNX only, no engine to run")


def _trt_runners(backend: str, request):
    """The tiny fp32 engines of a TensorRT flavour, built on this GPU (once per session), loaded on it."""
    from fluxtrt.engines.build import build_engines
    from fluxtrt.engines.load import load_engine_pipeline
    from tests.conftest import ort_config

    out = request.getfixturevalue("tmp_path_factory").getbasetemp() / f"tiny-{backend}"
    if not (out / "manifest.json").exists():
        build_engines(replace(ort_config(out), backend=backend, device="cuda"))
    pipeline = load_engine_pipeline(out, "cuda")
    request.addfinalizer(pipeline.close)
    return pipeline.runners


def _params() -> list:
    """torch, then every registered engine backend, each with what it needs to run here (a skip naming what is
    missing otherwise)."""
    params = [pytest.param("torch", id="torch")]
    for name in BACKENDS:
        marks = [pytest.mark.slow] if name == "aotinductor" else []
        reason = None
        if name in FLAVOURS:  # built and loaded on a CUDA GPU
            marks.append(pytest.mark.gpu)
            reason = cannot_run_engines(FLAVOURS[name])
        if reason:
            marks.append(pytest.mark.skip(reason=reason))
        params.append(pytest.param(name, marks=marks, id=name))
    return params


@pytest.mark.parametrize("backend", _params())
@pytest.mark.parametrize("name", COMPONENTS)
def test_runner_contract(request, backend, name):
    runners, geometries, outside = _runners(backend, request)
    runner = runners[name]
    device = "cuda" if backend in FLAVOURS else "cpu"
    dims = dims_from_components(request.getfixturevalue("tiny"))
    spec = runner.spec
    outputs = []
    for batch, target, ref in geometries:
        values = component_dims(name, dims, batch, target, ref)
        feed = spec.sample_feed(values, torch.float32, device)
        out = runner.infer(feed)
        assert list(out) == list(spec.output_names)
        for t in spec.outputs:
            assert tuple(out[t.name].shape) == t.concrete(values)
            assert out[t.name].dtype == torch.float32
            assert torch.isfinite(out[t.name]).all()
        outputs.append((feed, out))

    feed = outputs[0][0]
    first = spec.inputs[0]
    with pytest.raises(ShapeError, match=first.name):
        runner.infer({**feed, first.name: feed[first.name].to(torch.float64)})
    with pytest.raises(ShapeError, match="missing"):
        runner.infer({k: v for k, v in feed.items() if k != first.name})
    with pytest.raises(ShapeError, match="rank"):
        runner.infer({**feed, first.name: feed[first.name][None]})
    with pytest.raises(DeviceMismatchError, match=f"{name}.{first.name} is on meta, expected {device}"):
        runner.infer({**feed, first.name: feed[first.name].to("meta")})
    if outside is not None:
        values = component_dims(name, dims, *outside)
        beyond = [s for s, (lo, hi) in runner.ranges.items() if not lo <= values[s] <= hi]
        if beyond:  # the text encoders do not see image sizes
            with pytest.raises(ShapeError, match=rf"{name}: {beyond[0]} is {values[beyond[0]]} but the engine was "
                                                 r"built for .* in \[\d+, \d+\]: rebuild with --"):  # fmt: skip
                runner.infer(spec.sample_feed(values, torch.float32, device))

    # Lifecycle: closed, the runner refuses; loaded again (also as a context manager), it computes the same.
    runner.close()
    with pytest.raises(EngineError, match="closed"):
        runner.infer(feed)
    with runner:
        again = runner.infer(feed)
    assert not runner.is_loaded
    runner.load()
    for key, value in outputs[0][1].items():
        torch.testing.assert_close(again[key], value, atol=0, rtol=0)
