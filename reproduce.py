#!/usr/bin/env python
"""Reproduce a table: train every (arch, block type, seed) with do_acnet.py, then compare them over seeds.

::

    python reproduce.py --archs cfqkbnc src56 vc --blocks base acb dbb --seeds 0 1 2 3 4
    python reproduce.py --archs cfqkbnc --blocks base acb --seeds 0 1 --dataset synthetic -- --epochs 3
    python reproduce.py ... --gpus 0,1,2,3 --nproc-per-run 2      # two runs at a time, 2 GPUs each (torchrun)
    python reproduce.py ... --dry-run                              # print the commands, run nothing

(``--dry-run`` writes ``python`` for the interpreter that runs reproduce.py, which the sweep itself uses.)

Each run is ``do_acnet.py -a ARCH -b BLOCK --seed SEED --output-dir DIR [--dataset D] [extra options]``
and lands in do_acnet.py's folder for it (``<arch>_<block>[_<dataset>][_s<seed>]_train``). Options after
``--`` go to every run unchanged (recipe overrides such as ``--epochs``, ``--amp``, ...).

Scheduling: one run per GPU of ``--gpus`` (default: every visible GPU) through ``CUDA_VISIBLE_DEVICES``,
or per group of ``--nproc-per-run`` GPUs launched with ``torchrun --standalone``; without CUDA (or with
``--gpus cpu``) ``--cpu-jobs`` runs at a time (default 1). A "free" GPU is one no other run of this
sweep holds.

Resuming: each run folder's record (``recipe.json``, :mod:`utils.rundir.record`) is compared with the sweep's
run: a folder of another identity (recipe, dataset, seed, ...) or with an unreadable record is a
*conflict*, reported, not run and left out of the final tables; a run whose ``summary.json`` records a
tested deploy model is done and skipped; one that started (a record, ``latest.pth`` or ``finish.hdf5``)
is continued with ``-c continue``; any other starts from scratch. So running the same command again finishes an
interrupted sweep without redoing finished runs. Each run's console output is appended to its
folder's ``console.txt``; a failed run is reported with that path and does not stop the others.
Ctrl-C (or SIGTERM) stops the running runs (they continue next time). The end prints show_log.py's
tables for the sweep's runs. Exit status: 0 when every run is done, 1 when some failed or conflict,
2 for a bad command line, 130 when interrupted.
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import constructor
from acnet.registry import block_type_names
from utils.analysis.collect import read_run
from utils.analysis.tables import report
from utils.errors import USER_ERRORS, OneLineUsageParser, UsageError, report_error
from utils.modes.cli import build_parser as do_acnet_parser, check_args, command_from_args, given_options
from utils.modes.registry import MODES
from utils.rundir.identity import ExperimentPaths
from utils.rundir.record import RecordError, describe_conflicts, differing_fields, identity, make_record, \
    read_json_object, read_record

REPO = Path(__file__).resolve().parent
DO_ACNET = REPO / "do_acnet.py"
#: do_acnet.py options that the sweep sets itself, per run, and that may not come after ``--`` (besides
#: the options of the modes that are not training runs: :func:`sweep_owned`).
SWEEP_OWNED = {"arch": "--archs", "block_type": "--blocks", "seed": "--seeds", "conti_or_fs": "(resuming)",
               "output_dir": "--output-dir", "exp_name": "(the run's folder)", "dataset": "--dataset"}
STOP_GRACE_SECONDS = 20.0


class SweepError(UsageError):
    """A command line that cannot run: one line, exit status 2."""


@dataclass
class PlannedRun:
    """One (arch, block type, seed) of the sweep and what to do with it."""

    arch: str
    block_type: str
    seed: int
    folder: Path
    argv: list  # do_acnet.py's arguments, without -c
    action: str = "fs"  # fs | continue | done | conflict
    conflict: str = ""
    status: str = "queued"  # queued | running | done | failed | skipped | conflict | stopped
    error: str = ""
    seconds: Optional[float] = None

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def paths(self) -> ExperimentPaths:
        return ExperimentPaths(self.folder)

    @property
    def console(self) -> Path:
        return self.paths.console


# ------------------------------------------------------------------------------------------ planning
def build_parser() -> argparse.ArgumentParser:
    parser = OneLineUsageParser(prog="reproduce.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                short_usage="reproduce.py --archs ARCH [ARCH ...] [options] [-- do_acnet.py options]")
    parser.add_argument("--archs", nargs="+", required=True, metavar="ARCH")
    parser.add_argument("--blocks", nargs="+", default=["base", "acb", "dbb"], metavar="BLOCK",
                        help="block types (default: base acb dbb)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4], metavar="SEED",
                        help="seeds (default: 0 1 2 3 4, as the DBB paper's CIFAR means of 5 runs)")
    parser.add_argument("--dataset", help="dataset of every run (default: each arch's own)")
    parser.add_argument("--output-dir", default="acnet_exps", help="default: acnet_exps")
    parser.add_argument("--gpus", default="auto",
                        help="comma-separated GPU ids to use, 'cpu', or 'auto' (default: every visible GPU, "
                             "else CPU)")
    parser.add_argument("--nproc-per-run", type=int, default=1,
                        help="processes (GPUs) per run; >1 launches each run with torchrun (default 1)")
    parser.add_argument("--cpu-jobs", type=int, default=1, help="runs at a time on CPU (default 1)")
    parser.add_argument("--dry-run", action="store_true", help="print each run's command and state, run nothing")
    parser.add_argument("-n", "--num-evals", type=int, default=5,
                        help="show_log.py's -n: a run's score is its mean top-1 over the last N evaluations")
    parser.add_argument("--format", choices=("text", "markdown", "csv"), default="text",
                        help="format of the closing tables (default text)")
    parser.add_argument("--status-every", type=float, default=60.0, help=argparse.SUPPRESS)
    return parser


def split_extra(argv: Sequence[str]) -> tuple[list, list]:
    """``(reproduce.py's arguments, do_acnet.py's extra options)``, split at the first ``--``."""
    argv = list(argv)
    if "--" in argv:
        index = argv.index("--")
        return argv[:index], argv[index + 1:]
    return argv, []


def sweep_owned() -> dict[str, str]:
    """do_acnet.py dest -> what to use instead: the sweep's own options, and the option of every mode that is
    not a training run (the table of modes, :data:`utils.modes.registry.MODES`, says which)."""
    return {**SWEEP_OWNED, **{mode.dest: "(training only)" for mode in MODES.values()
                              if not mode.sweepable and mode.dest is not None}}


def _do_acnet_options(parse):
    """``parse()``, do_acnet.py's parser at work, with its refusals as :class:`SweepError` s."""
    try:
        return parse()
    except UsageError as exc:
        raise SweepError(f"options for do_acnet.py: {exc}") from None
    except SystemExit:  # --help among the extra options
        raise SweepError("options for do_acnet.py: see python do_acnet.py --help") from None


def plan(args: argparse.Namespace, extra: list) -> list:
    """Every run of the sweep with its do_acnet.py arguments and what to do (``PlannedRun.action``)."""
    unknown = [a for a in args.archs if a not in constructor.list_archs()]
    if unknown:
        raise SweepError(f"unknown arch {unknown[0]!r}; choose from {', '.join(constructor.list_archs())}")
    bad_blocks = [b for b in args.blocks if b not in block_type_names()]
    if bad_blocks:
        raise SweepError(f"unknown block type {bad_blocks[0]!r}; choose from "
                         f"{', '.join(block_type_names())}")
    owned_by_sweep = sweep_owned()
    owned = list(_do_acnet_options(lambda: given_options(extra, list(owned_by_sweep))))  # any spelling
    if owned:
        raise SweepError(f"do_acnet.py's {owned[0].replace('_', '-')} is set by the sweep, not after '--': "
                         f"use {owned_by_sweep[owned[0]]}")
    parser = do_acnet_parser(raise_errors=True)
    runs = []
    for arch in _unique(args.archs):
        for block in _unique(args.blocks):
            for seed in _unique(args.seeds):
                argv = ["-a", arch, "-b", block, "--seed", str(seed), "--output-dir", args.output_dir]
                if args.dataset:
                    argv += ["--dataset", args.dataset]
                if "--no-progress" not in extra:
                    argv.append("--no-progress")  # the console goes to a file: no progress bar
                argv += extra
                ns = _do_acnet_options(lambda: parser.parse_args(argv))
                try:
                    cmd = command_from_args(ns, check_args(ns), argv)
                except UsageError as exc:
                    raise SweepError(f"{arch} / {block}: {exc}") from None
                folder = cmd.paths().root
                run = PlannedRun(arch, block, seed, folder, argv)
                _resolve_action(run, identity(make_record(cmd, cmd.recipe, "finetune" if cmd.options.init_weights
                                                          else "train")))
                runs.append(run)
    return runs


def _unique(values: Sequence) -> list:
    return list(dict.fromkeys(values))


def _resolve_action(run: PlannedRun, expected: dict) -> None:
    """done / continue / fs from the folder's record (:mod:`utils.rundir.record`) and files; a run folder holding
    another identity (a finished run of another recipe, an interrupted one) or an unreadable record is a
    conflict: it is not run and never enters the sweep's tables."""
    paths = run.paths
    try:
        recorded = read_record(paths) or {}
        summary = read_json_object(paths.summary) or {}
    except RecordError as exc:
        run.action, run.status, run.conflict = "conflict", "conflict", f"{exc}"
        return
    differ = [f"{key} {recorded[key]!r} (sweep: {expected[key]!r})" for key in differing_fields(recorded, expected)]
    if differ:
        run.action, run.status = "conflict", "conflict"
        what = "finished" if paths.summary.is_file() else "holds a run"
        run.conflict = (f"{what} with another recipe: " + describe_conflicts(differ)
                        + "; use another --output-dir or remove the folder")
    elif paths.summary.is_file():
        run.action, run.status = "done", "skipped"
    elif paths.state.is_file() or paths.finish_weights.is_file() or recorded:
        run.action = "continue"  # -c continue also restarts a run that saved no epoch yet


# ------------------------------------------------------------------------------------------ launching
def slots(args: argparse.Namespace) -> list:
    """The device groups runs are given, as CUDA_VISIBLE_DEVICES values ('' = CPU)."""
    if args.nproc_per_run < 1 or args.cpu_jobs < 1:
        raise SweepError("--nproc-per-run and --cpu-jobs must be >= 1")
    spec = args.gpus.strip()
    if spec == "auto":
        ids = [str(i) for i in range(visible_gpu_count())]
    elif spec == "cpu":
        ids = []
    else:
        ids = [g.strip() for g in spec.split(",") if g.strip()]
        if not ids or not all(g.isdigit() for g in ids):
            raise SweepError(f"--gpus takes comma-separated GPU ids, 'cpu' or 'auto', got {args.gpus!r}")
    if not ids:
        return [""] * args.cpu_jobs
    if len(ids) < args.nproc_per_run:
        raise SweepError(f"--nproc-per-run {args.nproc_per_run} needs that many GPUs; --gpus gives {len(ids)}")
    groups = len(ids) // args.nproc_per_run
    return [",".join(ids[g * args.nproc_per_run:(g + 1) * args.nproc_per_run]) for g in range(groups)]


def visible_gpu_count() -> int:
    """The GPUs a CUDA process started from here sees, as ``torch.cuda.device_count()`` counts them, without
    importing torch (planning and --dry-run stay torch-free): the GPUs ``nvidia-smi -L`` lists (none without
    the NVIDIA driver), narrowed by ``CUDA_VISIBLE_DEVICES`` when it is set (read as CUDA does: up to its
    first entry that is not a device)."""
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
        physical = sum(line.startswith("GPU ") for line in listed.stdout.splitlines()) if listed.returncode == 0 else 0
    except (OSError, subprocess.SubprocessError):
        physical = 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return physical
    count = 0
    for entry in visible.split(","):
        entry = entry.strip()
        if not (entry.isdigit() and int(entry) < physical or entry.startswith(("GPU-", "MIG-"))):
            break
        count += 1
    return min(count, physical)


def command(run: PlannedRun, nproc: int, python: str = sys.executable) -> list:
    """The process a run is: do_acnet.py, through torchrun for more than one process per run."""
    resume = ["-c", "continue"] if run.action == "continue" else []
    if nproc > 1:
        launcher = [python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    else:
        launcher = [python]
    return [*launcher, str(DO_ACNET.relative_to(Path.cwd()) if DO_ACNET.is_relative_to(Path.cwd()) else DO_ACNET),
            *run.argv, *resume]


def last_error_line(path: Path) -> str:
    """The run's one-line error (do_acnet.py's ``error:`` line, else the last line of its console)."""
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()
                 if line.strip()]
    except OSError:
        return ""
    errors = [line for line in lines if "error:" in line]
    return (errors or lines or [""])[-1][:300]


@dataclass
class Sweep:
    """Runs the planned runs over the slots and reports progress (one line per event)."""

    runs: list
    slots: list
    nproc: int
    status_every: float = 60.0
    out: object = sys.stdout
    children: dict = field(default_factory=dict)  # slot index -> (run, Popen, start time)
    started: float = field(default_factory=time.monotonic)

    def say(self, message: str) -> None:
        print(message, file=self.out, flush=True)

    def progress(self) -> str:
        count = {s: sum(r.status == s for r in self.runs) for s in ("done", "skipped", "running", "failed",
                                                                     "queued", "conflict")}
        finished = count["done"] + count["skipped"]
        text = (f"[{finished}/{len(self.runs)} done, {count['running']} running, {count['failed']} failed, "
                f"{count['queued']} queued")
        if count["conflict"]:
            text += f", {count['conflict']} conflict"
        durations = [r.seconds for r in self.runs if r.status == "done" and r.seconds is not None]
        if durations and (count["queued"] or count["running"]):
            per_run = sum(durations) / len(durations)
            elapsed_running = sum(min(per_run, time.monotonic() - t) for _, _, t in self.children.values())
            left = (count["queued"] + count["running"]) * per_run - elapsed_running
            text += f"; ETA {_clock(max(0.0, left) / len(self.slots))}"
        return text + f"; {_clock(time.monotonic() - self.started)} elapsed]"

    def start(self, slot: int, run: PlannedRun) -> None:
        run.folder.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env["CUDA_VISIBLE_DEVICES"] = self.slots[slot]
        env.setdefault("PYTHONUNBUFFERED", "1")
        argv = command(run, self.nproc)
        with open(run.console, "a", encoding="utf-8") as console:
            console.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} reproduce.py: "
                          f"CUDA_VISIBLE_DEVICES={self.slots[slot]!r} {shlex.join(argv)}\n")
        console = open(run.console, "a", encoding="utf-8")
        try:
            process = subprocess.Popen(argv, stdout=console, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env=env, start_new_session=True)
        finally:
            console.close()
        run.status = "running"
        self.children[slot] = (run, process, time.monotonic())
        where = f"GPU {self.slots[slot]}" if self.slots[slot] else "CPU"
        verb = "continuing" if run.action == "continue" else "starting"
        self.say(f"{self.progress()} {verb} {run.name} on {where}")

    def reap(self) -> bool:
        """Collect finished children; True if any finished."""
        any_done = False
        for slot, (run, process, t0) in list(self.children.items()):
            code = process.poll()
            if code is None:
                continue
            any_done = True
            del self.children[slot]
            run.seconds = time.monotonic() - t0
            if code == 0 and run.paths.summary.is_file():
                run.status = "done"
                self.say(f"{self.progress()} done {run.name} in {_clock(run.seconds)}")
            else:
                run.status = "failed"
                run.error = last_error_line(run.console) or f"exit status {code}"
                self.say(f"{self.progress()} FAILED {run.name} (exit status {code}): {run.error} "
                         f"[log: {run.console}]")
        return any_done

    def run(self) -> None:
        queue = [r for r in self.runs if r.status == "queued"]
        last_report = time.monotonic()
        while queue or self.children:
            for slot in range(len(self.slots)):
                if slot not in self.children and queue:
                    self.start(slot, queue.pop(0))
            if not self.reap():
                time.sleep(0.2)
            if time.monotonic() - last_report >= self.status_every:
                last_report = time.monotonic()
                self.say(self.progress() + " running: " + ", ".join(r.name for r, _, _ in self.children.values()))

    def stop(self) -> int:
        """Stop the running children (SIGTERM to each one's process group, SIGKILL after a grace period)."""
        running = list(self.children.values())
        for _, process, _ in running:
            _signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for run, process, _ in running:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(process, signal.SIGKILL)
                process.wait()
            run.status = "stopped"
        self.children.clear()
        return len(running)


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)  # the child's own session: do_acnet.py and torchrun's workers
    except (ProcessLookupError, PermissionError):
        pass


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


# ------------------------------------------------------------------------------------------ main
def print_dry_run(runs: list, slot_list: list, nproc: int) -> None:
    where = ("CPU, one run at a time" if slot_list == [""] else
             f"CPU, {len(slot_list)} runs at a time" if not slot_list[0] else
             f"{len(slot_list)} run(s) at a time on GPUs " + " | ".join(slot_list))
    print(f"# {len(runs)} runs ({where}); each line is one run, to paste into any scheduler "
          "(give each its own CUDA_VISIBLE_DEVICES)")
    for run in runs:
        if run.action in ("done", "conflict"):
            print(f"# {run.action}: {run.name}" + (f": {run.conflict}" if run.conflict else ""))
        else:
            print(shlex.join(command(run, nproc, python="python")))


def final_report(runs: list, n: int, fmt: str) -> str:
    records = [read_run(r.folder) for r in runs if r.folder.is_dir() and r.status != "conflict"]
    return report(records, n, fmt) if records else "(no run has written anything yet)"


def main(argv: Optional[Sequence[str]] = None) -> int:
    own, extra = split_extra(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(own)
    try:
        if args.num_evals < 1:
            raise SweepError(f"-n must be at least 1, got {args.num_evals}")
        slot_list = slots(args)
        runs = plan(args, extra)
    except USER_ERRORS as exc:
        parser.print_usage_hint()
        return report_error("reproduce.py", exc)
    if args.dry_run:
        print_dry_run(runs, slot_list, args.nproc_per_run)
        return 0
    sweep = Sweep(runs, slot_list, args.nproc_per_run, args.status_every)
    skipped = sum(r.status == "skipped" for r in runs)
    sweep.say(f"sweep of {len(runs)} runs into {args.output_dir}: {skipped} already done, "
              f"{sum(r.action == 'continue' for r in runs)} to continue, "
              f"{sum(r.status == 'queued' and r.action == 'fs' for r in runs)} to start")
    for run in runs:
        if run.status == "conflict":
            sweep.say(f"CONFLICT {run.name}: {run.conflict}")

    def terminate(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        sweep.run()
    except KeyboardInterrupt:
        stopped = sweep.stop()
        print(f"reproduce.py: interrupted: stopped {stopped} running run(s); run the same command again to "
              "continue the sweep", file=sys.stderr, flush=True)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    failed = [r for r in runs if r.status == "failed"]
    conflicts = [r for r in runs if r.status == "conflict"]
    print(f"\nsweep finished in {_clock(time.monotonic() - sweep.started)}: "
          f"{sum(r.status in ('done', 'skipped') for r in runs)}/{len(runs)} runs done, {len(failed)} failed"
          + (f", {len(conflicts)} conflict" if conflicts else ""), flush=True)
    for run in failed:
        print(f"  failed: {run.name}: {run.error} [log: {run.console}]")
    print("\n" + final_report(runs, args.num_evals, args.format), flush=True)
    return 1 if failed or conflicts else 0


if __name__ == "__main__":
    sys.exit(main())
