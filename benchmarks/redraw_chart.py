"""report.png again from a ``fluxtrt compare`` report.json, with matplotlib or Pillow.

    python -m benchmarks.redraw_chart benchmarks/results/compare_h100/report.json \
        benchmarks/results/compare_h100/report_pillow.png --renderer pillow

The bars are the report's: each contender's median-total run, split by component.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    from fluxtrt.bench.report import redraw_chart

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path, help="a report.json written by fluxtrt compare")
    parser.add_argument("out", type=Path, help="the PNG to write")
    parser.add_argument("--renderer", choices=("matplotlib", "pillow"), default=None,
                        help="default: matplotlib where installed, else Pillow")  # fmt: skip
    args = parser.parse_args()
    used = redraw_chart(json.loads(args.report.read_text()), args.out, args.renderer)
    print(f"wrote {args.out} ({used})")


if __name__ == "__main__":
    main()
