"""Summarise training runs: accuracy per run, statistics over seeds, base vs ACB/DBB with a Welch test.

Usage (as the original ``show_log.py``, plus options)::

    python show_log.py [ROOT] [EXCLUDE ...] [-n 5] [--format text|markdown|csv] [--plot FILE.png]

``ROOT`` (default ``acnet_exps``) holds one directory per run (``<arch>_<block>[_<dataset>][_s<seed>]_train``,
do_acnet.py's names) with ``log.txt`` and, once finished, ``summary.json``; ``ROOT`` may also be a single
run directory. A run whose path contains any ``EXCLUDE`` substring is skipped. Arch, block type,
dataset and seed come from ``summary.json``, else ``recipe.json``, else the directory name.

Only evaluation lines of ``log.txt`` contain ``top1=``; each carries ``epoch <int>``,
``top1=<float>``, ``top5=<float>`` and ``loss=<float>`` (the original's tokens). Three tables:

1. one row per run: its *score* ``mean_top1_last<n>`` (the mean top-1 of its last ``n`` evaluations),
   max, last and deploy top-1, parameters, training speed, state;
2. one row per (arch, dataset, recipe, block type) over the seeds of its **finished** runs: count, mean,
   standard deviation (n-1), min and max of the scores, and mean / std of the deploy top-1;
3. each non-base group against the base group of its (arch, dataset), finished runs only: gain of the
   mean score with a 95 % Welch confidence interval and its two-sided p-value (``utils/analysis/stats.py``;
   needs two finished runs on each side, else the note says so), gain of the mean deploy top-1,
   which seeds are paired, beside the published numbers.

A run's state comes from its ``run_state.json`` (:mod:`utils.rundir.record`): *finished* (and, for a training
run, its ``summary.json`` records a deploy top-1: the deploy model was built from ``finish_deploy.hdf5``
and tested), *running* only while a live process holds the folder's lock, *interrupted at epoch N*
(Ctrl-C, SIGTERM, or a killed process: a ``running`` state whose lock is free), *failed* with its
reason, *incomplete* or *unreadable* (a corrupt ``recipe.json`` / ``summary.json`` / ``run_state.json``).
Runs without a state file (older ones, the original code's logs) are judged by their files: *interrupted*
when the log ends with the engine's ``interrupted`` line, *failed* when it ends with an ``ERROR`` line
(or reproduce.py's ``console.txt`` with ``do_acnet.py: error:``), *incomplete* with a ``summary.json``
lacking a deploy top-1, else *running*. Every run but a finished one is listed in the runs table with its
state and left out of every statistic, and each group line counts what was left out and why. Groups are
per recipe too (the record's identity: runs of other epochs or lr are never pooled); derived runs
(fine-tune, QAT) are listed in a table of their own, in no statistic and no plot. A finished run whose deploy top-1 differs from its
training-time top-1 by more than one evaluation image is flagged ``DEPLOY MISMATCH`` in every table
that shows it. Run reading (:mod:`utils.analysis.collect`) is torch-free; the block type names are read live from
``acnet``'s registry; matplotlib is needed only for ``--plot``.

The parts: reading runs :mod:`utils.analysis.collect`, the tables and comparisons :mod:`utils.analysis.tables` (published
numbers: each arch's ``ArchSpec.published``), the plot :mod:`utils.analysis.plotting`; this script parses and prints.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from utils.errors import USER_ERRORS, OneLineUsageParser, UsageError, report_error
from utils.analysis.plotting import PLOT_ALTERNATIVE, import_pyplot, plot_runs
from utils.analysis.tables import (COMPARISON_HEADERS, GROUP_HEADERS, comparison_rows, comparisons,  # noqa: F401
                          group_rows, group_runs, published_reference, report, run_headers, run_rows)
from utils.rundir.identity import block_types, parse_run_name  # noqa: F401
from utils.analysis.collect import discover_runs, parse_log_text, read_run, run_dataset, run_seed  # noqa: F401


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineUsageParser(
        prog="show_log.py", short_usage="show_log.py [ROOT] [EXCLUDE ...] [options]",
        description="Summarise training runs: accuracy per run, base vs ACB/DBB gains, published numbers.")
    parser.add_argument("root", nargs="?", default="acnet_exps",
                        help="directory of run directories, or one run directory (default: acnet_exps)")
    parser.add_argument("exclude", nargs="*", default=[],
                        help="skip runs whose path contains any of these substrings")
    parser.add_argument("-n", "--num-evals", type=int, default=5,
                        help="average top-1 over the last N evaluations (default: 5)")
    parser.add_argument("--format", choices=("text", "markdown", "csv"), default="text")
    parser.add_argument("--plot", metavar="FILE.png", type=Path, default=None,
                        help="also draw validation top-1 over epochs and the over-seeds table as bars with "
                             "error bars (needs matplotlib)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    root = Path(args.root)
    try:
        if args.num_evals < 1:
            raise UsageError(f"-n must be at least 1, got {args.num_evals}")
        if not root.is_dir():
            raise UsageError(f"no such directory: {root} (pass the experiments directory, e.g. acnet_exps)")
        if args.plot is not None:
            import_pyplot("--plot", PLOT_ALTERNATIVE)  # fail before printing anything if the plot cannot be drawn
        runs = discover_runs(root, args.exclude)
        if not runs:
            raise UsageError(f"no runs under {root}: expected subdirectories holding log.txt "
                             f"(written by do_acnet.py)")
        print(report(runs, args.num_evals, args.format))
        if args.plot is not None:
            try:
                plot_runs(runs, args.plot, args.num_evals)
            except OSError as exc:  # acnet.fileio.UnwritablePathError: one line, the path and the reason
                raise UsageError(f"--plot: {exc}") from None
            print(f"\nplot written to {args.plot}", file=sys.stderr)
    except USER_ERRORS as exc:
        return report_error("show_log.py", exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
