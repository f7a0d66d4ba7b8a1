"""Load test of a running `fluxtrt serve`: C clients at once, each sending R edits one after the other, for each
concurrency C; per level, the answers by status, whether every 200 holds an image of the asked size, p50/p95 latency
and edits per minute; then whether the server still answers /health.

    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --image in.png --size 1024x1024 \
        --concurrency 1,4,16 --requests 4 [--api-key-env VAR] [--out results.json]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Level:
    concurrency: int
    statuses: dict[str, int] = field(default_factory=dict)
    wrong_images: int = 0
    missing_retry_after: int = 0
    latencies_s: list[float] = field(default_factory=list)
    server_edit_ms: list[float] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def ok(self) -> int:
        return self.statuses.get("200", 0)

    def summary(self) -> dict:
        lat = sorted(self.latencies_s)
        pick = (lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]) if lat else (lambda q: None)
        return {"concurrency": self.concurrency, "statuses": self.statuses, "wrong_images": self.wrong_images,
                "missing_retry_after": self.missing_retry_after, "p50_s": pick(0.5), "p95_s": pick(0.95),
                "server_edit_ms_median": statistics.median(self.server_edit_ms) if self.server_edit_ms else None,
                "edits_per_minute": 60 * self.ok / self.wall_s if self.wall_s else 0.0,
                "wall_s": self.wall_s}  # fmt: skip


def image_size(b64: str) -> tuple[int, int] | None:
    """The size of a base64 PNG, or None when it does not decode."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(base64.b64decode(b64))) as img:
            img.load()
            return img.size
    except Exception:  # noqa: BLE001 (any failure to decode is a wrong image)
        return None


async def run_level(client, url: str, image: bytes, form: dict, concurrency: int, requests: int,
                    size: tuple[int, int] | None) -> Level:  # fmt: skip
    """``concurrency`` clients, ``requests`` edits each, one after the other."""
    level = Level(concurrency)

    async def one_client() -> None:
        for _ in range(requests):
            t0 = time.perf_counter()
            answer = await client.post(f"{url}/v1/images/edits", data=form, files={"image": ("in.png", image)})
            elapsed = time.perf_counter() - t0
            level.statuses[str(answer.status_code)] = level.statuses.get(str(answer.status_code), 0) + 1
            if answer.status_code == 503 and "retry-after" not in answer.headers:
                level.missing_retry_after += 1
            if answer.status_code != 200:
                continue
            body = answer.json()
            sizes = [image_size(d.get("b64_json", "")) for d in body.get("data", [])]
            expected = size or tuple(int(v) for v in body["size"].split("x"))
            if not sizes or any(s != expected for s in sizes):
                level.wrong_images += 1
            level.latencies_s.append(elapsed)
            level.server_edit_ms.append(body["timings_ms"]["edit"])

    t0 = time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(concurrency)))
    level.wall_s = time.perf_counter() - t0
    return level


async def load_test(url: str, image: bytes, prompt: str, size: str, steps: int | None, levels: list[int],
                    requests: int, api_key: str | None = None, timeout_s: float = 600.0) -> dict:  # fmt: skip
    """Run every level against ``url``; returns the levels' summaries and whether /health answered afterwards."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    form = {"prompt": prompt, "size": size, "response_format": "b64_json", "seed": "0"}
    if steps is not None:
        form["steps"] = str(steps)
    asked = None if size == "auto" else tuple(int(v) for v in size.split("x"))
    limits = httpx.Limits(max_connections=max(levels) + 2)
    async with httpx.AsyncClient(headers=headers, timeout=timeout_s, limits=limits) as client:
        results = [await run_level(client, url, image, form, c, requests, asked) for c in levels]
        health = (await client.get(f"{url}/health")).status_code
    return {"url": url, "size": size, "steps": steps, "requests_per_client": requests, "health_after": health,
            "levels": [r.summary() for r in results]}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--image", type=Path, required=True, help="The image every request edits.")
    parser.add_argument("--prompt", default="make the house blue")
    parser.add_argument("--size", default="auto", help="WIDTHxHEIGHT or auto.")
    parser.add_argument("--steps", type=int, default=None, help="Steps per edit (default: the server's).")
    parser.add_argument("--concurrency", default="1,4,16", help="Comma-separated levels.")
    parser.add_argument("--requests", type=int, default=4, help="Edits per client per level.")
    parser.add_argument("--api-key-env", default=None, metavar="VAR")
    parser.add_argument("--out", type=Path, default=None, help="Write the results as JSON here.")
    args = parser.parse_args(argv)
    key = os.environ.get(args.api_key_env, "") if args.api_key_env else None
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    try:
        result = asyncio.run(load_test(args.url, args.image.read_bytes(), args.prompt, args.size, args.steps, levels,
                                       args.requests, key))  # fmt: skip
    except Exception as exc:  # noqa: BLE001 (a server that does not answer, say: one line, not a traceback)
        first = (str(exc).strip().splitlines() or [""])[0]  # run as a file: no fluxtrt or benchmarks to import
        print(f"error: {args.url}: {type(exc).__name__}: {first}"[:240], file=sys.stderr)
        return 1
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    bad = [lv for lv in result["levels"] if set(lv["statuses"]) - {"200", "503"} or lv["wrong_images"]]
    return 1 if bad or result["health_after"] != 200 else 0


if __name__ == "__main__":
    sys.exit(main())
