"""How well-conditioned is the random-weight full-size transformer? (Fidelity numbers on random-full mean
something only if small input changes give small output changes.)

    python benchmarks/random_full_conditioning.py --out results.json

One 1024x1024 Kontext call (S = 4096 target + 4096 reference tokens): the same input twice (determinism), the
input perturbed by a relative 1e-3 and 1e-2 (sensitivity), and the residual stream's RMS after every block.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from fluxtrt.backends.torch_modules import TransformerModule
from fluxtrt.environment import environment
from fluxtrt.models.synthetic import FULL, build_transformer
from fluxtrt.pipeline.latents import position_ids
from fluxtrt.specs import Resolution, component_specs
from fluxtrt.specs.flux import FLUX_KONTEXT_DIMS, component_dims

FULL_DIMS = FLUX_KONTEXT_DIMS


def compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = a.float().flatten(), b.float().flatten()
    return {"cosine": torch.nn.functional.cosine_similarity(a, b, dim=0).item(),
            "rel_l2": ((a - b).norm() / b.norm()).item(), "max_abs": (a - b).abs().max().item()}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    records = [{"phase": "environment", **environment()}]
    model = build_transformer(FULL.transformer, 0, args.device, dtype)
    module = TransformerModule(model)
    spec = component_specs(FULL_DIMS)["transformer"]
    r = Resolution(1024, 1024)
    feed = spec.sample_feed(component_dims("transformer", FULL_DIMS, 1, r, r), dtype, args.device)
    feed["timestep"] = torch.full((1,), 0.5, dtype=dtype, device=args.device)
    ids = torch.cat([position_ids(128, 128, 0), position_ids(128, 128, 1)]).to(args.device)
    feed["img_ids"] = ids

    rms: list[float] = []
    hooks = [b.register_forward_hook(lambda _m, _i, out: rms.append(
                 (out[1] if isinstance(out, tuple) else out).float().pow(2).mean().sqrt().item()))
             for b in list(model.transformer_blocks) + list(model.single_transformer_blocks)]  # fmt: skip
    with torch.inference_mode():
        out = module(*(feed[n] for n in spec.input_names))
        for h in hooks:
            h.remove()
        again = module(*(feed[n] for n in spec.input_names))
        record = {"phase": "conditioning", "dtype": str(dtype), "tokens": feed["hidden_states"].shape[1],
                  "output_rms": out.float().pow(2).mean().sqrt().item(), "repeat": compare(again, out),
                  "block_residual_rms": rms}  # fmt: skip
        for eps in (1e-3, 1e-2):
            noise = torch.randn(feed["hidden_states"].shape, generator=torch.Generator().manual_seed(1)).to(
                args.device, dtype
            )
            perturbed = dict(feed, hidden_states=feed["hidden_states"] + eps * noise)
            record[f"perturb_{eps:g}"] = compare(module(*(perturbed[n] for n in spec.input_names)), out)
    records.append(record)
    print(json.dumps(record), flush=True)
    args.out.write_text(json.dumps(records, indent=2))


if __name__ == "__main__":
    main()
