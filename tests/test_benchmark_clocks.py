"""benchmarks/clocks.py: stretches of high power in an nvidia-smi log, and what the committed H200 log says."""

from __future__ import annotations

from pathlib import Path

from benchmarks.clocks import segments

HEADER = ("timestamp, clocks.current.sm [MHz], clocks.current.memory [MHz], power.draw [W], temperature.gpu, "
          "clocks_event_reasons.active")  # fmt: skip
RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "step_limits_h200"


def write_log(path: Path, samples: list[tuple[int, float, str]]) -> Path:
    lines = [HEADER] + [f"t{i}, {mhz} MHz, 3201 MHz, {watts} W, 50, {why}" for i, (mhz, watts, why) in
                        enumerate(samples)]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")
    return path


def test_runs_above_the_threshold_are_split_at_each_dip_and_short_runs_dropped(tmp_path):
    hot = [(1500, 690.0, "0x4"), (1600, 680.0, "0x4"), (1700, 700.0, "0x0")]
    cool = [(1980, 120.0, "0x0")]
    log = write_log(tmp_path / "c.csv", hot + cool + hot[:2] + cool + [(1400, 650.0, "0x4")] + cool)
    runs = segments(log, above_w=600, least=2)
    assert [r["samples"] for r in runs] == [3, 2]  # the lone hot sample is shorter than least
    assert (runs[0]["start"], runs[0]["end"]) == ("t0", "t2")
    assert runs[0]["sm_mhz_mean"] == 1600 and (runs[0]["sm_mhz_min"], runs[0]["sm_mhz_max"]) == (1500, 1700)
    assert runs[0]["power_w_mean"] == 690.0 and runs[0]["reasons"] == ["0x0", "0x4"]
    assert runs[1]["sm_mhz_mean"] == 1550 and runs[1]["reasons"] == ["0x4"]


def test_the_committed_fp8_step_ran_power_capped_below_full_clock():
    """The five timed phases of aoti_fp8_head_h200.json: the engine, its graph replay, the FP32 reference, stages 1
    and 3. Every BF16/FP8 phase hit the 700 W software cap (reason 0x4) and ran well under the 1980 MHz full clock;
    the FP32 reference, slower per watt, did not."""
    runs = segments(RESULTS / "aoti_fp8_head_h200_clocks.csv")
    assert len(runs) == 5
    capped = [runs[i] for i in (0, 1, 3, 4)]
    assert all("0x0000000000000004" in r["reasons"] and r["sm_mhz_mean"] < 1700 for r in capped)
    assert runs[2]["reasons"] == ["0x0000000000000000"] and runs[2]["sm_mhz_mean"] == 1980
