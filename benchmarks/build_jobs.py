"""One build, from scratch, at each ``--jobs`` value, in the same run on the same machine: wall time from process start
to exit, what ``--jobs auto`` decided, and each component's seconds from the manifest.

    python -m benchmarks.build_jobs --model tiny --backend aotinductor --precision fp8 --jobs 1,auto --out DIR \
        [-- more fluxtrt build options]

Each build runs as ``fluxtrt build ... --out DIR/<jobs> --force`` in a fresh process, one after the other (so each has
the machine to itself). DIR/build_jobs.json holds the records (one per build, with the environment); a build that
fails is one record with a one-line reason and its output in a log beside it, and the next one still runs.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

from benchmarks.failures import PhaseFailed, child_env, run_logged
from benchmarks.records import Records

ROOT = Path(__file__).resolve().parents[1]


def build_once(args, jobs: str, records: Records, extra: list[str]) -> dict:
    out = Path(args.out) / f"jobs-{jobs}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "fluxtrt", "build", "--model", args.model, "--backend", args.backend,
           "--precision", args.precision, "--jobs", jobs, "--out", str(out), *extra]  # fmt: skip
    child = run_logged(cmd, records.logs, f"build-jobs-{jobs}", cwd=ROOT, env=child_env())
    if not child.ok:
        raise PhaseFailed(child.reason, child.log, returncode=child.returncode)
    decided = re.search(r"build: (building .*)$", child.stdout + child.stderr, re.MULTILINE)
    manifest = json.loads((out / "manifest.json").read_text())
    seconds = {name: round(entry["build_s"], 1) for name, entry in manifest["components"].items()}
    calibration = re.search(r"calibration\W+\w+\W+([\d.]+)", child.stdout)  # the summary table's row
    shutil.rmtree(out, ignore_errors=True)
    return {
        "jobs": jobs,
        "command": " ".join(["fluxtrt", *cmd[3:]]),
        "wall_s": round(child.wall_s, 1),
        "decided": decided.group(1) if decided else None,
        "calibration_s": float(calibration.group(1)) if calibration else None,
        "component_s": seconds,
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--backend", default="aotinductor")
    parser.add_argument("--precision", default="fp8")
    parser.add_argument("--jobs", default="1,auto", help="Comma-separated --jobs values, one build each.")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    records = Records(args.out / "build_jobs.json")
    given = [*argv, "--", *extra] if extra else argv
    records.emit({"phase": "command", "argv": ["python", "-m", "benchmarks.build_jobs", *given]})
    for jobs in (j.strip() for j in args.jobs.split(",") if j.strip()):
        with records.phase("build", jobs=jobs):
            records.emit({"phase": "build", **build_once(args, jobs, records, extra)})
    from fluxtrt.environment import environment

    records.emit({"phase": "environment", **environment()})
    return records.done()


if __name__ == "__main__":
    sys.exit(main())
