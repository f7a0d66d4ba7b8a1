"""Backend options are declared once, on the backend's options class (``fluxtrt.backends.base.option``): the flags of
``fluxtrt build``, the options a BuildConfig carries, the settings the manifest records and their reading back all
come from those declarations."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import click
import pytest

from fluxtrt.backends.aotinductor.options import AotInductorOptions
from fluxtrt.backends.base import BACKENDS, declared_options, option, options_type
from fluxtrt.cli import build
from fluxtrt.cli.options import backend_options, given_options
from fluxtrt.errors import InputError


def test_every_declared_flag_is_one_build_option_with_its_help():
    declared = {d.name: d for d in declared_options().values() if d.flag is not None}
    params = {p.name: p for p in build.params}
    for name, d in declared.items():
        opts = [*params[name].opts, *params[name].secondary_opts]
        assert opts == [o for decl in d.flag.decls for o in decl.split("/")], name
        assert params[name].help == d.flag.help
    # Every flag of the command is either one of the build's own or a declared backend option, and no two options
    # share a flag.
    own = {"model", "backend", "precision", "out", "min_resolution", "opt_resolution", "max_resolution", "max_batch",
           "components", "first_block_cache", "force", "device", "onnx_dir", "calibration_edits", "calibration",
           "vae", "jobs"}  # fmt: skip
    assert set(params) == own | set(declared)
    flags = [o for p in build.params for o in [*p.opts, *p.secondary_opts]]
    assert len(flags) == len(set(flags))
    # The spellings users' scripts rely on.
    for flag in (
        "--workspace-gib",
        "--opt-level",
        "--timing-cache",
        "--aoti-weights",
        "--cuda-graph",
        "--aoti-cuda-graph",
        "--aoti-fp8-attention",
        "--aoti-no-fp8-attention",
        "--compute-capability",
    ):
        assert flag in flags


def test_command_line_to_typed_options_to_manifest_settings_and_back():
    args = ["--model", "tiny", "--out", "x", "--aoti-weights", "external", "--aoti-cuda-graph",
            "--aoti-no-fp8-attention", "--compute-capability", "8.9,12.0", "--timing-cache", "/tmp/tc"]  # fmt: skip
    params = build.make_context("build", args).params
    given = given_options({k: v for k, v in params.items() if k in declared_options()})
    assert given == {"weights": "external", "cuda_graph": True, "fp8_attention": False,
                     "compute_capabilities": ("8.9", "12.0"), "timing_cache": Path("/tmp/tc")}  # fmt: skip
    # Not given: nothing (a plain flag left off is not an "off" setting; a pair's --no- side is).
    empty = build.make_context("build", ["--model", "tiny", "--out", "x"]).params
    assert given_options({k: v for k, v in empty.items() if k in declared_options()}) == {}
    for backend in BACKENDS:
        cls = options_type(backend)
        mine = {k: v for k, v in given.items() if k in {d.name for d in cls.declared()}}
        options = cls.from_dict(mine, backend)
        settings = json.loads(json.dumps(options.to_dict()))  # as manifest.json holds them
        assert sorted(settings) == sorted(d.name for d in cls.declared())
        assert cls.from_dict(settings, backend) == options


def test_an_option_declared_on_a_class_is_a_flag_a_setting_and_a_check():
    """What adding an option to a backend takes: one field on its options class."""

    @dataclass(frozen=True)
    class Extended(AotInductorOptions):
        tile: int = option(64, "--aoti-tile", choices=(32, 64), help="aotinductor: a tile size.")

    declared = {d.name: d for d in Extended.declared()}
    assert (declared["tile"].type, declared["tile"].default, declared["tile"].flag.decls) == (int, 64, ("--aoti-tile",))
    assert Extended.from_dict({"tile": 32}, "aotinductor").to_dict()["tile"] == 32
    with pytest.raises(InputError, match="--aoti-tile is '16', expected one of 32, 64"):
        Extended(tile=16)

    @backend_options
    @click.command()
    def command(**options):
        return options

    assert {p.name for p in command.params} == {d.name for d in declared_options().values() if d.flag}


def test_an_option_of_another_backend_is_refused_by_its_flag():
    with pytest.raises(InputError, match="--aoti-weights is not an option of the tensorrt backend .*--workspace-gib"):
        options_type("tensorrt").from_dict({"weights": "external"}, "tensorrt")
    with pytest.raises(InputError, match="--cuda-graph is not an option of the onnxruntime backend"):
        options_type("onnxruntime").from_dict({"cuda_graph": True}, "onnxruntime")
