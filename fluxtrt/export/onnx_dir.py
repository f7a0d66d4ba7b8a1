"""``--onnx-dir``: ONNX exported elsewhere (e.g. NVIDIA's published FLUX.1-Kontext ONNX) used instead of exporting.

The directory holds ``<component>/model.onnx`` (with any external-data files beside it). A graph is accepted when
its input and output names are the spec's, with the spec's ranks; it is linked (or copied) into the engines
directory's ``onnx/<component>/`` so the engines directory stays self-contained.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from fluxtrt.errors import BuildError, InputError
from fluxtrt.export.onnx import MODEL_FILE
from fluxtrt.specs.component import ComponentSpec


def check_onnx_interface(spec: ComponentSpec, path: Path) -> None:
    """Raise BuildError unless the ONNX at ``path`` has the spec's input/output names (any order) and ranks."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    for kind, values, tensors in (("inputs", graph.input, spec.inputs), ("outputs", graph.output, spec.outputs)):
        have = {v.name: v for v in values if v.name not in initializers}
        want = [t.name for t in tensors]
        if sorted(have) != sorted(want):
            raise BuildError(
                f"{spec.name}: {path} has {kind} {sorted(have)}, expected {want}: --onnx-dir must hold graphs with "
                "fluxtrt's input/output names"
            )
        for t in tensors:
            rank = len(have[t.name].type.tensor_type.shape.dim)
            if rank != len(t.shape):
                raise BuildError(
                    f"{spec.name}: {path} input/output {t.name} has rank {rank}, expected {len(t.shape)} {t.shape}"
                )


def import_onnx(spec: ComponentSpec, onnx_dir: Path, out_dir: Path) -> Path:
    """Check ``onnx_dir/<component>/model.onnx`` and link or copy its folder's files into ``out_dir``.

    Returns:
        ``out_dir/model.onnx``.

    Raises:
        InputError: the component's folder or model.onnx is missing.
        BuildError: its interface differs from the spec.
    """
    src = Path(onnx_dir) / spec.name
    model = src / MODEL_FILE
    if not model.is_file():
        raise InputError(
            f"--onnx-dir '{onnx_dir}' has no {spec.name}/{MODEL_FILE}: give a directory with <component>/{MODEL_FILE} "
            "for every component built, or leave --onnx-dir out to export from the model"
        )
    check_onnx_interface(spec, model)
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        if f.is_file():
            try:
                os.link(f, out_dir / f.name)  # same filesystem: no copy of a 24 GB weights file
            except OSError:
                shutil.copy2(f, out_dir / f.name)
    return out_dir / MODEL_FILE
