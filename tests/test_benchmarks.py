"""The issue benchmarks run as users run them and print complete tables (no timing is asserted)."""
from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

from acnet.registry import block_type_names

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
    # the families table: every registered type beside ACB / DBB / OREPA, over the unit it replaces
    sys.path.insert(0, str(ROOT))
    from benchmarks.bench_blocks import family_form, family_types

    assert {"repvgg", "mobileone"} <= set(family_types())
    header = next(line for line in lines if line.strip().startswith("N,C,HW,K,groups"))
    assert all(f"{name}/pl" in header for name in family_types())
    for shape, kernel in (("4,8,8,3,1", 3), ("2,8,6,5,1", 5)):
        values = numbers(next(line for line in lines if line.strip().startswith(shape + " ")))
        timed = [name for name in family_types() if family_form(name, kernel, 1) is not None]  # others: "-"
        assert {"repvgg", "mobileone"} <= set(timed)
        assert len(values) == 1 + len(timed) and all(v > 0 and math.isfinite(v) for v in values)


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


def test_bench_memory_counts_saved_tensors_per_image_and_fixed():
    out = run_script("benchmarks/bench_memory.py", "--archs", "cfqkbnc", "--batch", "2", "--threads", "1")
    row = next(line for line in out.splitlines() if line.startswith("cfqkbnc "))
    assert re.search(r"(ok|ABOVE) \(orepa <= 1\.25\)$", row)
    # base, acb, acb-orig, dbb, dbb-orig, orepa, repvgg, mobileone: "per_image[+fixed]" MiB
    cells = row.split()[2:10]
    per_image = [float(c.split("+")[0]) for c in cells]
    base, acb, acb_orig, dbb, dbb_orig, orepa, repvgg, mobileone = per_image
    assert acb > base and dbb > acb and acb_orig > base and dbb_orig > base
    assert orepa == base  # the kernel assembly keeps no per-image tensor: one conv and one BN, as the base
    assert base < repvgg < dbb and mobileone == repvgg  # k = 1 and no 1x1 conv in cfqkbnc: the same branches
    ratios = numbers(" ".join(row.split()[10:17]))
    assert len(ratios) == 7 and ratios[4] < ratios[2]  # orepa below dbb


def test_gpu_check_refuses_without_cuda_in_one_line_and_smoke_runs_on_cpu(tmp_path):
    import json
    import os

    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    refused = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--output", str(tmp_path / "x.json")],
                             cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.count("\n") == 1 and "no CUDA device" in refused.stderr
    assert not (tmp_path / "x.json").exists()

    output = tmp_path / "gpu_check.json"
    result = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--steps", "1",
                             "--no-compile", "--batch", "2", "--archs", "src56", "--output", str(output)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    record = json.loads(output.read_text())
    names = list(block_type_names())
    assert record["ok"] and {r["block"] for r in record["blocks"]} == set(names)
    # every block type trains src56 but dilated re-param, which fits no conv of it (3x3 only): said, skipped
    assert [r["block"] for r in record["runs"]] == [n for n in names if n != "dilated"]
    assert "src56   dilated skipped: the block type fits no conv of src56" in result.stdout
    assert all(r["deploy_error"] <= 1e-4 and r["images_per_sec"] > 0 for r in record["runs"])
    assert "all checks passed" in result.stdout and "(c) eager training" in result.stdout


def test_bench_blocks_families_table_has_a_row_per_newer_family():
    out = run_script("benchmarks/bench_blocks.py", "--families-only", "--tiny", "--rounds", "1", "--warmup", "0",
                     "--threads", "1")
    for label in ("ECB BN-free 3x3", "ECB + BN 3x3", "dilated 7x7 dw", "dilated 13x13 dw"):
        row = next(line for line in out.splitlines() if line.strip().startswith(label))
        values = numbers(row.split("|", 3)[3])  # plain ms, block/plain
        assert len(values) == 2 and all(v > 0 and math.isfinite(v) for v in values)


def test_bench_memory_families_table_counts_more_saved_bytes_than_the_plain_unit():
    out = run_script("benchmarks/bench_memory.py", "--archs", "cfqkbnc", "--batch", "1", "--threads", "1")
    for label in ("ECB BN-free 3x3", "ECB + BN 3x3", "dilated 7x7 dw", "dilated 13x13 dw"):
        row = next(line for line in out.splitlines() if line.strip().startswith(label))
        plain, block, ratio = numbers(row)
        assert block > plain > 0 and ratio > 1  # each branch keeps its own activation
