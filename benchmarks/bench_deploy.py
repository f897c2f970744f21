"""The deployment table: accuracy of the deploy, int8 PTQ and int8-after-QAT models, and inference speed of
onnxruntime fp32 / int8 against PyTorch eager, per arch and block type; prints a markdown table.

Accuracy comes from the runs' ``summary.json`` files under ``--exps``:

* ``<arch>_<block>..._train/``: ``deploy_top1`` (training run), ``int8_top1`` (written by
  ``do_acnet.py --export-onnx .../finish.hdf5 OUT.onnx --quantize int8``);
* ``<arch>_<block>..._qat/``: ``int8_top1`` and ``qat_top1`` (``do_acnet.py --qat``).

Speed is measured here on the files those commands wrote (``onnx_path`` / ``int8_path`` of the
training run's summary; a run without them is exported from its ``finish_deploy.hdf5`` into a temporary
folder, int8 calibrated on random images, for speed only). Each round runs PyTorch eager (the deploy
model under ``torch.inference_mode``), onnxruntime fp32 and onnxruntime int8 on the same batch, one after
the other in an order that rotates every round; the table gives the median images/s over rounds and the
median over rounds of each per-round ratio to PyTorch eager. Timings on a shared machine are noisy:
rerun on a quiet one.

    python benchmarks/bench_deploy.py --exps acnet_exps --archs cfqkbnc src56 --rounds 7
    python benchmarks/bench_deploy.py --dataset-tag synthetic     # only runs whose name has this tag
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import constructor  # noqa: E402
from acnet.export import require_extra  # noqa: E402
from utils.rundir.identity import ExperimentPaths  # noqa: E402

BLOCKS = ("base", "acb", "dbb")
VARIANTS = ("torch eager", "ort fp32", "ort int8")


def read_summary(folder: Path) -> Optional[dict[str, Any]]:
    try:
        return json.loads(ExperimentPaths(folder).summary.read_text())
    except (OSError, ValueError):
        return None


def find_run(exps: Path, arch: str, block: str, kind: str, tag: Optional[str]) -> Optional[Path]:
    """The run folder ``<arch>_<block>[_<tag>]_<kind>`` (``kind``: train or qat) with a summary for arch/block."""
    for folder in sorted(exps.glob(f"{arch}_{block}*_{kind}")):
        if tag is not None and f"_{tag}_" not in f"_{folder.name}_":
            continue
        summary = read_summary(folder)
        if summary and summary.get("arch") == arch and summary.get("block_type") == block:
            return folder
    return None


def session(path: Path, threads: int):
    ort = require_extra("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_files(run: Path, summary: dict[str, Any], arch: str, block: str, scratch: Path, batch: np.ndarray):
    """``(fp32 onnx, int8 onnx)`` of a run: its own, else exported from finish_deploy.hdf5 into ``scratch``."""
    own = [summary.get("onnx_path"), summary.get("int8_path")]
    candidates = [Path(p) if p and Path(p).is_absolute() else (Path.cwd() / p if p else None) for p in own]
    if all(p is not None and p.is_file() for p in candidates):
        return candidates[0], candidates[1]
    from utils.engine.deploy import export_weights, int8_path, quantize_int8

    spec = constructor.get_arch_spec(arch)
    out = scratch / f"{arch}_{block}.onnx"
    export_weights(arch, block, ExperimentPaths(run).deploy_weights, out, input_size=spec.input_size)
    return out, quantize_int8(out, int8_path(out), [batch])


def measure(runners: Dict[str, Callable[[], Any]], rounds: int, steps: int) -> Dict[str, List[float]]:
    """Per-variant images/s per round (``steps`` calls each), order rotating every round."""
    names = list(runners)
    rates: Dict[str, List[float]] = {name: [] for name in names}
    for name in names:  # warm-up
        runners[name]()
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            start = time.perf_counter()
            for _ in range(steps):
                runners[name]()
            rates[name].append(steps / (time.perf_counter() - start))
    return rates


def fmt(value: Optional[float], digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exps", default="acnet_exps", help="folder holding the runs (default acnet_exps)")
    parser.add_argument("--archs", nargs="+", default=["cfqkbnc", "src56"])
    parser.add_argument("--dataset-tag", help="only runs whose folder name contains _TAG_ (e.g. synthetic)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=3, help="forward passes per variant per round")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    exps = Path(args.exps)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_deploy_") as scratch:
        for arch in args.archs:
            spec = constructor.get_arch_spec(arch)
            x = torch.randn(args.batch, 3, spec.input_size, spec.input_size, generator=torch.Generator().manual_seed(0))
            batch = x.numpy()
            for block in BLOCKS:
                run = find_run(exps, arch, block, "train", args.dataset_tag)
                if run is None:
                    continue
                summary = read_summary(run) or {}
                qat = find_run(exps, arch, block, "qat", args.dataset_tag)
                qat_summary = read_summary(qat) if qat else {}
                fp32_path, int8_file = onnx_files(run, summary, arch, block, Path(scratch), batch)
                from utils.engine.evaluation import load_model_for_eval

                model = load_model_for_eval(arch, block, run / "finish_deploy.hdf5", "cpu")
                fp32_session, int8_session = session(fp32_path, args.threads), session(int8_file, args.threads)

                def eager(model=model):
                    with torch.inference_mode():
                        model(x)

                runners = {"torch eager": eager,
                           "ort fp32": lambda s=fp32_session: s.run(None, {"input": batch}),
                           "ort int8": lambda s=int8_session: s.run(None, {"input": batch})}
                rates = measure(runners, args.rounds, args.steps)
                images = {name: statistics.median(r) * args.batch for name, r in rates.items()}
                ratio = {name: statistics.median(v / e for v, e in zip(rates[name], rates["torch eager"]))
                         for name in VARIANTS[1:]}
                rows.append([arch, block, summary.get("dataset", "?"), fmt(summary.get("deploy_top1")),
                             fmt(summary.get("int8_top1")), fmt((qat_summary or {}).get("qat_top1")),
                             fmt((qat_summary or {}).get("int8_top1")), fmt(images["torch eager"], 1),
                             fmt(images["ort fp32"], 1), fmt(images["ort int8"], 1), fmt(ratio["ort fp32"]),
                             fmt(ratio["ort int8"])])
                print(f"measured {arch}/{block} ({run.name})", file=sys.stderr, flush=True)
    header = ["arch", "block", "data", "fp32 deploy top-1", "int8 PTQ top-1", "QAT top-1", "int8 after QAT top-1",
              "eager img/s", "ort fp32 img/s", "ort int8 img/s", "ort fp32/eager", "ort int8/eager"]
    print(f"Deployment (batch {args.batch}, {args.threads} threads, {args.rounds} alternated rounds; "
          "medians of images/s and of per-round ratios)")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(["---"] * 3 + ["---:"] * (len(header) - 3)) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if not rows:
        print(f"no runs found under {exps} for {', '.join(args.archs)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
