"""The GPU's SM clock and power while it works hard, from an ``nvidia-smi`` log: one row per stretch of samples above a
power threshold (a timed phase of a benchmark), with the mean, least and greatest SM clock, the mean power and the
clock event reasons seen (``0x4``: the software power cap).

    nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_event_reasons.active \\
        --format=csv -lms 100 > clocks.csv &          # beside the benchmark, then
    python -m benchmarks.clocks clocks.csv [--above 600]
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path


def _number(cell: str) -> float:
    """``'1590 MHz'`` or ``'690.12 W'`` -> the number."""
    return float(cell.strip().split()[0])


def segments(path: Path, above_w: float = 600.0, least: int = 5) -> list[dict]:
    """Runs of consecutive samples drawing more than ``above_w`` watts, each at least ``least`` samples long."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))[1:]
    runs: list[list[list[str]]] = [[]]
    for row in rows:
        if _number(row[3]) > above_w:
            runs[-1].append(row)
        elif runs[-1]:
            runs.append([])
    out = []
    for run in (r for r in runs if len(r) >= least):
        clocks, watts = [_number(r[1]) for r in run], [_number(r[3]) for r in run]
        out.append({
            "start": run[0][0].strip(), "end": run[-1][0].strip(), "samples": len(run),
            "sm_mhz_mean": sum(clocks) / len(clocks), "sm_mhz_min": min(clocks), "sm_mhz_max": max(clocks),
            "power_w_mean": sum(watts) / len(watts),
            "reasons": sorted({r[5].strip() for r in run}) if len(run[0]) > 5 else [],
        })  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", type=Path)
    parser.add_argument("--above", type=float, default=600.0, help="watts")
    args = parser.parse_args()
    print("| from | to | samples | SM clock mean (min-max) | power | reasons |")
    print("|---|---|---|---|---|---|")
    for s in segments(args.csv, args.above):
        clock = f"{s['sm_mhz_mean']:.0f} MHz ({s['sm_mhz_min']:.0f}-{s['sm_mhz_max']:.0f})"
        print(f"| {s['start']} | {s['end']} | {s['samples']} | {clock} | {s['power_w_mean']:.0f} W | "
              f"{' '.join(s['reasons'])} |")  # fmt: skip


if __name__ == "__main__":
    main()
