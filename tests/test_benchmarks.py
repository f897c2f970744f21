"""The issue benchmarks run as users run them and print complete tables (no timing is asserted)."""
from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_script(*args: str) -> str:
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def numbers(line: str) -> list[float]:
    return [float(v) for v in re.findall(r"(?<![\w.])\d+\.\d+", line)]


def test_bench_blocks_prints_a_row_per_shape_and_the_geometric_means():
    out = run_script("benchmarks/bench_blocks.py", "--rounds", "2", "--warmup", "0", "--threads", "1",
                     "--shapes", "4,8,8,3", "2,8,6,5")
    lines = out.splitlines()
    for shape in ("4,8,8,3", "2,8,6,5"):
        row = next(line for line in lines if line.strip().startswith(shape + " "))
        values = numbers(row)
        assert len(values) == 5  # conv+BN ms, ACB, ACB-orig, DBB, DBB-orig (no paper figure for these shapes)
        assert all(v > 0 and math.isfinite(v) for v in values)
    geo = next(line for line in lines if line.strip().startswith("geometric mean"))
    assert len(numbers(geo)) == 6 and "targets:" in out


def test_bench_archs_prints_training_inference_and_deploy_size_tables():
    out = run_script("benchmarks/bench_archs.py", "--archs", "cfqkbnc", "--batch", "4", "--quick", "--threads", "1")
    assert "Training step" in out and "Inference" in out and "Deploy models" in out
    rows = [line for line in out.splitlines() if line.startswith("cfqkbnc ")]
    # per-arch progress tables, then the summary: training row, inference row, deploy-size row
    train, infer, size = rows[-3:]
    assert re.search(r"(ok|BELOW) \(acb >= 0\.55, orepa >= 0\.85, orepa/dbb >= 2\.5\)$", train)
    assert re.search(r"(ok|BELOW) \(deploy >= 0\.97\)$", infer)
    for row, count in ((train, 8), (infer, 9)):  # images/s and ratios, before the verdict
        values = numbers(re.split(r"\s(?:ok|BELOW)\s", row)[0])
        assert len(values) == count and all(v > 0 and math.isfinite(v) for v in values)
    params = [int(v.replace(",", "")) for v in re.findall(r"\d{1,3}(?:,\d{3})+", size)]
    assert len(params) == 4 and len(set(params)) == 1  # same deploy parameter count for base / acb / dbb / orepa
