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
2. one row per (arch, dataset, block type) over the seeds of its **finished** runs: count, mean,
   standard deviation (n-1), min and max of the scores, and mean / std of the deploy top-1;
3. each non-base group against the base group of its (arch, dataset), finished runs only: gain of the
   mean score with a 95 % Welch confidence interval and its two-sided p-value (``utils/stats.py``;
   needs two finished runs on each side, else the note says so), gain of the mean deploy top-1,
   which seeds are paired, beside the published numbers.

A run is *finished* when its ``summary.json`` records a deploy top-1 (the deploy model was built from
``finish_deploy.hdf5`` and tested). Every other run is *running*, *interrupted* (its log ends with the
engine's ``interrupted`` line), *failed* (its log ends with an ``ERROR`` line, or reproduce.py's
``console.txt`` with ``do_acnet.py: error:``), *incomplete* (a ``summary.json`` without a deploy top-1) or
*unreadable*: it is listed in the runs table with that state and left out of every statistic, and each
group line counts what was left out and why. A finished run whose deploy top-1 differs from its
training-time top-1 by more than one evaluation image is flagged ``DEPLOY MISMATCH`` in every table
that shows it. Beyond the standard library it needs matplotlib only for ``--plot``.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, NamedTuple, Optional, Sequence

from utils.errors import USER_ERRORS, UsageError, report_error
from utils.stats import Summary, summarize, welch



def __getattr__(name: str):
    """``BLOCK_TYPES``: the registered block type names, read live from :mod:`acnet.registry` (no copy)."""
    if name == "BLOCK_TYPES":
        return _block_types()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _block_types() -> tuple:
    from acnet.registry import block_type_names

    return block_type_names()
RUN_FILES = ("log.txt", "recipe.json", "summary.json")
#: reproduce.py appends each run's console output here (its last line names a failure).
CONSOLE_FILE = "console.txt"

#: A run's states. Only ``finished`` runs enter the statistics; the others are listed and counted.
FINISHED, RUNNING, INTERRUPTED, FAILED, INCOMPLETE, UNREADABLE = (
    "finished", "running", "interrupted", "failed", "incomplete", "unreadable")
STATES = (FINISHED, RUNNING, INTERRUPTED, FAILED, INCOMPLETE, UNREADABLE)
DEPLOY_MISMATCH = "DEPLOY MISMATCH"


# --------------------------------------------------------------------------------------------
# Published results: declared with each arch (constructor.registry.ArchSpec.published)
# --------------------------------------------------------------------------------------------
def published_results(arch: str) -> tuple:
    """The published results the arch registry declares for ``arch`` (``()`` for an unknown arch)."""
    try:  # the arch registry imports torch: only when numbers are asked for
        from constructor import get_arch_spec
        return tuple(get_arch_spec(arch).published)
    except ValueError:  # an arch no registry knows (e.g. a log of the original code's other nets)
        return ()


def published_reference(arch: str, dataset: Optional[str], block_type: str):
    """The preferred published result for ``arch`` on ``dataset`` reporting ``block_type``.

    ``dataset=None`` (unknown) matches the arch's first listed dataset, which is its own.
    """
    candidates = list(published_results(arch))
    if dataset is not None:
        candidates = [p for p in candidates if p.dataset == dataset]
    elif candidates:
        candidates = [p for p in candidates if p.dataset == candidates[0].dataset]
    for result in candidates:
        if result.has("base") and result.has(block_type):
            return result
    return None


# --------------------------------------------------------------------------------------------
# Reading runs
# --------------------------------------------------------------------------------------------
_NUMBER = r"(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?|nan|inf)"
TOP1_PATTERN = re.compile(r"top1=" + _NUMBER)
TOP5_PATTERN = re.compile(r"top5=" + _NUMBER)
LOSS_PATTERN = re.compile(r"(?<![A-Za-z_])loss=" + _NUMBER)
EPOCH_PATTERN = re.compile(r"\bepoch[ =:]*(\d+)")
# The original's end-of-training line: "TRAIN speed: from A to B iterations, ..., examples/sec=1234.5"
ORIGINAL_SPEED_PATTERN = re.compile(r"TRAIN speed:.*examples/sec=" + _NUMBER)
# do_acnet.py's line after the final test: "final training-time model: acc1 ... on 10000 images"
EVAL_IMAGES_PATTERN = re.compile(r"final training-time model:.* on (\d+) images")
# log.txt lines start with "YYYY-MM-DD HH:MM:SS " (utils/runlog.py)
_TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2} ")
# How a run's own log ends when it stopped without finishing (utils/engine.py, utils/posttrain.py)
_INTERRUPTED_LINE = re.compile(r"^interrupted\b")
_FAILED_LINE = re.compile(r"^ERROR\b")
_CONSOLE_ERROR = "do_acnet.py: error:"


@dataclass(frozen=True)
class Evaluation:
    """One validation line of ``log.txt``."""

    epoch: int
    top1: float
    top5: float
    loss: float


@dataclass
class ParsedLog:
    evaluations: list = field(default_factory=list)
    malformed_lines: int = 0
    last_epoch_seen: Optional[int] = None
    images_per_sec: Optional[float] = None  # from the original's "TRAIN speed" line, if any
    eval_images: Optional[int] = None  # size of the final test set, from do_acnet.py's final line
    last_message: Optional[str] = None  # the last non-empty line, without its timestamp


def parse_log_text(text: str) -> ParsedLog:
    """Evaluation records of a log; lines with ``top1=`` lacking a token count as malformed.

    A line is an evaluation iff it contains ``top1=``; it must also carry ``epoch <int>``,
    ``top5=`` and ``loss=``. ``last_epoch_seen`` is the largest ``epoch <int>`` on any line.
    """
    parsed = ParsedLog()
    for line in text.splitlines():
        if line.strip():
            parsed.last_message = _TIMESTAMP.sub("", line.strip())
        images_match = EVAL_IMAGES_PATTERN.search(line)
        if images_match:
            parsed.eval_images = int(images_match.group(1))
        speed_match = ORIGINAL_SPEED_PATTERN.search(line)
        if speed_match:
            parsed.images_per_sec = _as_float(speed_match.group(1))
        epoch_match = EPOCH_PATTERN.search(line)
        if epoch_match:
            epoch = int(epoch_match.group(1))
            if parsed.last_epoch_seen is None or epoch > parsed.last_epoch_seen:
                parsed.last_epoch_seen = epoch
        if "top1=" not in line:
            continue
        matches = [p.search(line) for p in (TOP1_PATTERN, TOP5_PATTERN, LOSS_PATTERN)]
        if epoch_match is None or any(m is None for m in matches):
            parsed.malformed_lines += 1
            continue
        top1, top5, loss = (float(m.group(1)) for m in matches)
        parsed.evaluations.append(Evaluation(int(epoch_match.group(1)), top1, top5, loss))
    return parsed


@dataclass
class Run:
    """Everything ``show_log`` knows about one run directory."""

    name: str
    path: Path
    arch: str = "?"
    block_type: str = "?"
    dataset: Optional[str] = None
    seed: Optional[int] = None
    epochs_planned: Optional[int] = None
    epochs_done: Optional[int] = None
    evaluations: list = field(default_factory=list)
    state: str = RUNNING
    end_message: Optional[str] = None  # the line that says why an interrupted / failed run stopped
    deploy_top1: Optional[float] = None
    train_top1: Optional[float] = None  # the training-time model's final top-1 (summary.json)
    eval_images: Optional[int] = None  # how many images that final test had
    params_train: Optional[int] = None
    params_deploy: Optional[int] = None
    images_per_sec: Optional[float] = None
    problems: list = field(default_factory=list)
    unreadable: bool = False

    @property
    def finished(self) -> bool:
        """True when ``summary.json`` records a deploy top-1: the only runs the statistics use."""
        return self.state == FINISHED

    def deploy_mismatch(self) -> Optional[str]:
        """``DEPLOY MISMATCH: ...`` when the deploy top-1 differs from the training-time top-1 by more
        than one evaluation image (``100 / eval_images`` points), else None."""
        if self.deploy_top1 is None or self.train_top1 is None:
            return None
        diff = abs(self.deploy_top1 - self.train_top1)
        if self.eval_images:
            one_image = 100.0 / self.eval_images
            if diff <= one_image * (1 + 1e-9):
                return None
            return (f"{DEPLOY_MISMATCH}: deploy {self.deploy_top1:.2f} vs training-time {self.train_top1:.2f} "
                    f"(> 1 of {self.eval_images} images)")
        if diff == 0:
            return None
        return (f"{DEPLOY_MISMATCH}: deploy {self.deploy_top1:.2f} vs training-time {self.train_top1:.2f} "
                "(test-set size unknown)")

    def top1_values(self) -> list:
        return [e.top1 for e in self.evaluations]

    def mean_last(self, n: int) -> Optional[float]:
        values = self.top1_values()[-n:]
        return sum(values) / len(values) if values else None

    def max_top1(self) -> Optional[float]:
        values = self.top1_values()
        return max(values) if values else None

    def last_top1(self) -> Optional[float]:
        values = self.top1_values()
        return values[-1] if values else None

    def status(self, n: int) -> str:
        """The state (:data:`STATES`), then warnings: ``3/5 evals``, a deploy mismatch, why it stopped."""
        if self.state == UNREADABLE:
            return "unreadable: " + "; ".join(self.problems)
        parts = [self.state]
        count = len(self.evaluations)
        if count == 0:
            parts.append("no evals")
        elif count < n:
            parts.append(f"{count}/{n} evals")
        mismatch = self.deploy_mismatch()
        if mismatch:
            parts.append(mismatch)
        if self.end_message and self.state != FINISHED:
            parts.append(self.end_message)
        parts.extend(self.problems)
        return ", ".join(parts)


def _read_json(path: Path, run: Run) -> dict:
    if not path.is_file():
        return {}
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        run.problems.append(f"{path.name} unreadable ({type(exc).__name__})")
        return {}
    if not isinstance(content, dict):
        run.problems.append(f"{path.name} is not a JSON object")
        return {}
    return content


def _as_int(value) -> Optional[int]:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _as_float(value) -> Optional[float]:
    try:
        result = float(value)
    except (TypeError, ValueError):
        return None
    return result if math.isfinite(result) else None


class RunName(NamedTuple):
    """The parts of a run directory's name; those it does not carry are None."""

    arch: Optional[str]
    block_type: Optional[str]
    dataset: Optional[str]
    seed: Optional[int]


_SEED_TOKEN = re.compile(r"s(\d+)")


def parse_run_name(name: str) -> RunName:
    """Parts of ``<arch>_<block>[_<dataset>][_s<seed>]_train`` (do_acnet.py's ``experiment_name``).

    A name without ``_s<seed>`` has seed None here (do_acnet.py then used seed 0, other code may not
    have): :func:`run_seed` reads the seed the run recorded.
    """
    stem = name[: -len("_train")] if name.endswith("_train") else name
    tokens = stem.split("_")
    for index, token in enumerate(tokens):
        if token in _block_types() and index > 0:
            arch, rest, seed = "_".join(tokens[:index]), tokens[index + 1:], None
            if rest and _SEED_TOKEN.fullmatch(rest[-1]):
                seed = int(rest.pop()[1:])
            return RunName(arch, token, "_".join(rest) or None, seed)
    return RunName(None, None, None, None)


def run_dataset(run_dir_name: str, summary: dict, recipe: dict) -> Optional[str]:
    """The dataset a run used: ``summary.json``, else ``recipe.json`` (do_acnet.py records the dataset
    actually used), else the directory name (which names any dataset that is not the arch's own)."""
    return summary.get("dataset") or recipe.get("dataset") or parse_run_name(run_dir_name).dataset


def run_seed(run_dir_name: str, summary: dict, recipe: dict) -> Optional[int]:
    """The seed a run used: ``summary.json``, else ``recipe.json`` (do_acnet.py records it in both),
    else the directory name's ``_s<seed>``; None when unknown (e.g. a log of the original code)."""
    for source in (summary, recipe):
        seed = _as_int(source.get("seed"))
        if seed is not None:
            return seed
    return parse_run_name(run_dir_name).seed


def own_dataset(arch: str) -> Optional[str]:
    """The dataset an arch is defined for (its run directory name then omits it); ``None``: unknown arch."""
    try:  # the arch registry imports torch: only now
        from constructor import get_arch_spec
        return get_arch_spec(arch).dataset
    except ValueError:  # unknown arch: leave it unknown
        return None


def read_run(run_dir: Path) -> Run:
    """Collect one run from its ``log.txt``, ``recipe.json`` and ``summary.json``; never raises."""
    run = Run(name=run_dir.name, path=run_dir)
    recipe = _read_json(run_dir / "recipe.json", run)
    summary = _read_json(run_dir / "summary.json", run)
    name_arch, name_block, _, _ = parse_run_name(run_dir.name)

    def pick(*keys, default=None):
        for source in (summary, recipe):
            for key in keys:
                if source.get(key) not in (None, ""):
                    return source[key]
        return default

    run.arch = str(pick("arch", default=name_arch or "?"))
    run.block_type = str(pick("block_type", "block", default=name_block or "?"))
    dataset = run_dataset(run_dir.name, summary, recipe)  # else the arch's own
    if dataset is None and run.arch != "?":
        dataset = own_dataset(run.arch)
    run.dataset = str(dataset) if dataset is not None else None
    run.seed = run_seed(run_dir.name, summary, recipe)
    run.epochs_planned = _as_int(pick("epochs"))
    run.deploy_top1 = _as_float(summary.get("deploy_top1"))
    run.train_top1 = _as_float(summary.get("train_top1"))
    run.params_train = _as_int(summary.get("params_train"))
    run.params_deploy = _as_int(summary.get("params_deploy"))
    run.images_per_sec = _as_float(summary.get("train_images_per_sec"))

    log_path = run_dir / "log.txt"
    try:
        text = log_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        run.unreadable, run.state = True, UNREADABLE
        run.problems.append("no log.txt")
        return run
    except UnicodeDecodeError:
        run.unreadable, run.state = True, UNREADABLE
        run.problems.append("log.txt is not UTF-8 text")
        return run
    except OSError as exc:
        run.unreadable, run.state = True, UNREADABLE
        run.problems.append(f"log.txt: {exc.strerror or exc}")
        return run
    parsed = parse_log_text(text)
    run.evaluations = parsed.evaluations
    run.eval_images = parsed.eval_images
    run.state, run.end_message = _run_state(run_dir, summary, parsed)
    if run.images_per_sec is None:
        run.images_per_sec = parsed.images_per_sec
    if parsed.malformed_lines:
        run.problems.append(f"{parsed.malformed_lines} malformed eval line(s) skipped")
    if run.finished and run.epochs_planned is not None:
        run.epochs_done = run.epochs_planned
    else:
        run.epochs_done = parsed.last_epoch_seen
    return run


def _run_state(run_dir: Path, summary: dict, parsed: ParsedLog) -> tuple:
    """``(state, message)`` of a readable run: finished when ``summary.json`` records a deploy top-1;
    else interrupted / failed when its log (or reproduce.py's console.txt) ends saying so; else incomplete
    (a summary without a deploy result) or running."""
    if _as_float(summary.get("deploy_top1")) is not None:
        return FINISHED, None
    last = parsed.last_message or ""
    if _INTERRUPTED_LINE.match(last):
        return INTERRUPTED, last
    if _FAILED_LINE.match(last):
        return FAILED, last
    console_last = _last_line(run_dir / CONSOLE_FILE)
    if console_last and _CONSOLE_ERROR in console_last:
        message = console_last.split(_CONSOLE_ERROR, 1)[1].strip()
        if message.startswith("interrupted"):
            return INTERRUPTED, message
        return FAILED, message
    if summary:
        return INCOMPLETE, "summary.json has no deploy_top1"
    return RUNNING, None


def _last_line(path: Path) -> Optional[str]:
    """The last non-empty line of a text file (its last 64 KiB), None if absent or unreadable."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, 2)
            size = handle.tell()
            handle.seek(max(0, size - 65536))
            tail = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return None
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    return lines[-1] if lines else None


def discover_runs(root: Path, excluded: Sequence[str] = ()) -> list:
    """Runs under ``root`` (each subdirectory holding a run file), or ``root`` itself if it is one."""
    if any((root / f).exists() for f in RUN_FILES):
        candidates = [root]
    else:
        candidates = sorted(d for d in root.iterdir() if d.is_dir() and any((d / f).exists() for f in RUN_FILES))
    return [read_run(d) for d in candidates if not any(ex in str(d) for ex in excluded)]


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------
def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _fmt_signed(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:+.2f}"


def _fmt_params(value: Optional[int]) -> str:
    if value is None:
        return "-"
    return f"{value / 1e6:.3f}M" if value >= 1e5 else str(value)


def _epochs(run: Run) -> str:
    done = "?" if run.epochs_done is None else str(run.epochs_done)
    planned = "?" if run.epochs_planned is None else str(run.epochs_planned)
    return f"{done}/{planned}"


def score_header(n: int) -> str:
    """The score column's name, which says what the score is: ``mean_top1_last5``."""
    return f"mean_top1_last{n}"


def run_headers(n: int) -> tuple:
    """The runs table's columns (the score's name carries ``n``)."""
    return ("run", "arch", "block", "dataset", "seed", "epochs", "evals", score_header(n), "max_top1",
            "last_top1", "deploy_top1", "params_train", "params_deploy", "train_img/s", "status")


def run_rows(runs: Iterable[Run], n: int) -> list:
    """One row per run, in :func:`run_headers` order."""
    return [
        (run.name, run.arch, run.block_type, run.dataset or "-", _fmt(run.seed), _epochs(run),
         str(len(run.evaluations)),
         _fmt(run.mean_last(n)), _fmt(run.max_top1()), _fmt(run.last_top1()), _fmt(run.deploy_top1),
         _fmt_params(run.params_train), _fmt_params(run.params_deploy), _fmt(run.images_per_sec, 1),
         run.status(n))
        for run in runs
    ]


GROUP_HEADERS = ("arch", "dataset", "block", "runs", "seeds", "mean", "std", "min", "max", "deploy_mean",
                 "deploy_std", "note")


@dataclass
class Group:
    """The runs of one (arch, dataset, block type): the seeds of one table cell.

    Statistics use :meth:`finished_runs` only; the others are counted in :meth:`left_out`.
    """

    arch: str
    dataset: Optional[str]
    block_type: str
    runs: list = field(default_factory=list)

    def finished_runs(self) -> list:
        """The runs whose deploy model was tested and that have evaluations: the statistics' sample."""
        return [run for run in self.runs if run.finished and run.evaluations]

    def scores(self, n: int) -> list:
        """Each finished run's score: the mean top-1 of its last ``n`` evaluations."""
        return [run.mean_last(n) for run in self.finished_runs()]

    def deploy_scores(self) -> list:
        return [run.deploy_top1 for run in self.finished_runs()]

    def seeds(self) -> list:
        """The finished runs' seeds (None: unknown)."""
        return [run.seed for run in self.finished_runs()]

    def left_out(self) -> str:
        """``"2 finished, 1 running: left out"`` when runs are left out of the statistics, else ``""``."""
        used = len(self.finished_runs())
        counts = {}
        for run in self.runs:
            if not (run.finished and run.evaluations):
                state = run.state if run.state != FINISHED else "finished without evals"
                counts[state] = counts.get(state, 0) + 1
        if not counts:
            return ""
        order = {state: index for index, state in enumerate(STATES)}
        parts = [f"{count} {state}" for state, count in sorted(counts.items(), key=lambda kv: order.get(kv[0], 99))]
        return f"{used} finished, " + ", ".join(parts) + ": left out"

    def notes(self, n: int) -> list:
        """Why the statistics may mislead: runs left out, finished runs short of evaluations or with a
        deploy mismatch, repeated seeds."""
        notes = [self.left_out()] if self.left_out() else []
        for run in self.finished_runs():
            if len(run.evaluations) < n:
                notes.append(f"{run.name}: {len(run.evaluations)}/{n} evals")
            mismatch = run.deploy_mismatch()
            if mismatch:
                notes.append(f"{run.name}: {mismatch}")
            if run.problems:
                notes.append(f"{run.name}: " + "; ".join(run.problems))
        seeds = [seed for seed in self.seeds() if seed is not None]
        repeated = sorted({seed for seed in seeds if seeds.count(seed) > 1})
        if repeated:
            notes.append("seed " + ", ".join(map(str, repeated)) + " counted more than once")
        return notes


def _block_order(block_type: str) -> tuple:
    names = _block_types()
    return (names.index(block_type) if block_type in names else len(names), block_type)


def group_runs(runs: Iterable[Run]) -> list:
    """Runs grouped by (arch, dataset, block type), sorted; an unreadable run whose arch or block type is
    unknown belongs to no group (one whose directory name tells both is counted in its group as left out)."""
    groups: dict = {}
    for run in runs:
        if run.unreadable and "?" in (run.arch, run.block_type):
            continue
        key = (run.arch, run.dataset, run.block_type)
        groups.setdefault(key, Group(*key)).runs.append(run)
    return [groups[k] for k in sorted(groups, key=lambda k: (k[0], k[1] or "", _block_order(k[2])))]


def _seeds(group: Group) -> str:
    seeds = sorted(seed for seed in group.seeds() if seed is not None)
    unknown = sum(seed is None for seed in group.seeds())
    return ",".join([str(s) for s in seeds] + ["?"] * unknown) or "-"


def group_rows(groups: Iterable[Group], n: int) -> list:
    """One row per group, in GROUP_HEADERS order: ``runs`` and every statistic count finished runs only
    (std needs two); the note says how many runs were left out and why."""
    rows = []
    for group in groups:
        score: Optional[Summary] = summarize(group.scores(n))
        deploy = summarize(group.deploy_scores())
        rows.append((group.arch, group.dataset or "-", group.block_type, str(len(group.finished_runs())), _seeds(group),
                     _fmt(score and score.mean), _fmt(score and score.std), _fmt(score and score.min),
                     _fmt(score and score.max), _fmt(deploy and deploy.mean), _fmt(deploy and deploy.std),
                     "; ".join(group.notes(n))))
    return rows


COMPARISON_HEADERS = ("arch", "dataset", "block", "base_runs", "runs", "base_mean", "mean", "gain_mean",
                      "ci95_low", "ci95_high", "p_value", "gain_deploy", "paper_base", "paper", "paper_gain",
                      "paper_source", "note")


@dataclass(frozen=True)
class Comparison:
    """An (arch, dataset)'s base group against one of its other groups (``other`` None: base alone)."""

    base: Optional[Group]
    other: Optional[Group]


def comparisons(runs: Iterable[Run]) -> list:
    """Pair each (arch, dataset)'s base group with each of its non-base groups (acb, dbb, ...)."""
    by_key: dict = {}
    for group in group_runs(runs):
        by_key.setdefault((group.arch, group.dataset), []).append(group)
    result = []
    for members in by_key.values():
        base = next((g for g in members if g.block_type == "base"), None)
        others = [g for g in members if g.block_type != "base"]
        if not others and base is not None:
            result.append(Comparison(base, None))
        result.extend(Comparison(base, other) for other in others)
    return result


def _diff(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b is None else a - b


def _mean(values: list) -> Optional[float]:
    summary = summarize(values)
    return summary.mean if summary else None


def _fmt_p(value: Optional[float]) -> str:
    if value is None:
        return "-"
    return f"{value:.2g}" if value < 0.001 else f"{value:.3f}"


def seed_pairing(base: Group, other: Group) -> str:
    """Which seeds the two groups' finished runs share, when their seed sets differ (else ``""``):
    ``"seeds paired: 0,1; unpaired: base 2, acb 3"``."""
    base_seeds, seeds = base.seeds(), other.seeds()
    known_base = {s for s in base_seeds if s is not None}
    known = {s for s in seeds if s is not None}
    unknown = sum(s is None for s in base_seeds) + sum(s is None for s in seeds)
    if known_base == known and not unknown:
        return ""
    if not known_base and not known:
        return ""  # no run recorded its seed (e.g. logs of other code): nothing to pair

    def listing(values) -> str:
        return ",".join(map(str, sorted(values))) or "none"

    parts = [f"seeds paired: {listing(known_base & known)}"]
    unpaired = [f"{label} {listing(values)}" for label, values in
                (("base", known_base - known), (other.block_type, known - known_base)) if values]
    if unpaired:
        parts.append("unpaired: " + ", ".join(unpaired))
    if unknown:
        parts.append(f"{unknown} run(s) of unknown seed")
    return "; ".join(parts)


def comparison_rows(items: Iterable[Comparison], n: int) -> list:
    """Rows in COMPARISON_HEADERS order, finished runs only: the gain of the mean score over seeds, its 95 %
    Welch interval and p-value (two finished runs or more on each side), the gain of the mean deploy top-1,
    the published gain; the note says which seeds are paired and what was left out."""
    rows = []
    for item in items:
        ref = item.other or item.base
        block = ref.block_type
        base_scores = item.base.scores(n) if item.base else []
        scores = item.other.scores(n) if item.other else []
        base_mean, mean = _mean(base_scores), _mean(scores)
        test = welch(scores, base_scores) if item.base and item.other else None
        gain_deploy = (_diff(_mean(item.other.deploy_scores()), _mean(item.base.deploy_scores()))
                       if item.base and item.other else None)
        paper = published_reference(ref.arch, ref.dataset, block)
        paper_base = paper.top1["base"] if paper else None
        paper_block = paper.top1[block] if paper and block != "base" else None
        notes = []
        if item.base is None:
            notes.append("no base run")
        elif item.other is not None and test is None:
            notes.append(f"no interval: {len(base_scores)} finished base and {len(scores)} finished {block} run(s), "
                         "needs 2+ on each side")
        if item.base is not None and item.other is not None and base_scores and scores:
            pairing = seed_pairing(item.base, item.other)
            if pairing:
                notes.append(pairing)
        for group in (item.base, item.other):
            if group is not None:
                notes.extend((f"{group.block_type}: {note}" if note == group.left_out() else note)
                             for note in group.notes(n))
        rows.append((
            ref.arch, ref.dataset or "-", block, str(len(base_scores)) if item.base else "0",
            str(len(scores)) if item.other else "-", _fmt(base_mean), _fmt(mean), _fmt_signed(_diff(mean, base_mean)),
            _fmt_signed(test and test.low), _fmt_signed(test and test.high), _fmt_p(test and test.p_value),
            _fmt_signed(gain_deploy), _fmt(paper_base), _fmt(paper_block), _fmt_signed(_diff(paper_block, paper_base)),
            paper.source if paper else "-", "; ".join(notes),
        ))
    return rows


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]], fmt: str) -> str:
    """Render as aligned ``text``, GitHub ``markdown`` or ``csv``."""
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(headers)
        writer.writerows(rows)
        return buffer.getvalue().rstrip("\n")
    if fmt == "markdown":
        def line(cells):
            return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
        return "\n".join([line(headers), "|" + "|".join("---" for _ in headers) + "|"] + [line(r) for r in rows])
    widths = [max([len(h)] + [len(str(r[i])) for r in rows]) for i, h in enumerate(headers)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(headers, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
    return "\n".join(lines)


def report(runs: Sequence[Run], n: int, fmt: str) -> str:
    """The three tables, titled (the csv sections are separated by one blank line)."""
    sections = [
        (f"Runs ({score_header(n)} = a run's score, the mean top-1 of its last {n} evaluations; state: "
         "finished = summary.json with a tested deploy model)", run_headers(n), run_rows(runs, n)),
        (f"Over seeds, finished runs only (score = a run's {score_header(n)}; mean, std, min, max of the scores; "
         "deploy = deploy_top1)", GROUP_HEADERS, group_rows(group_runs(runs), n)),
        ("Base vs ACB/DBB, finished runs only (gain of the mean score in top-1 points, 95 % Welch interval and "
         "p-value; paper = published numbers)", COMPARISON_HEADERS, comparison_rows(comparisons(runs), n)),
    ]
    parts = []
    for title, headers, rows in sections:
        table = render_table(headers, rows, fmt)
        if fmt == "markdown":
            parts.append(f"### {title}\n\n{table}")
        elif fmt == "text":
            parts.append(f"{title}\n{table}")
        else:
            parts.append(table)
    return "\n\n".join(parts)


# --------------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------------
def _import_pyplot():
    from utils.plotting import import_pyplot

    return import_pyplot("--plot", 'or pip install -e ".[plot]"')


_COLOURS = {"base": "tab:blue", "acb": "tab:orange", "dbb": "tab:green"}


def _colour(block_type: str, plt) -> str:
    """A fixed colour per block type (others take the next of matplotlib's cycle, stably)."""
    if block_type not in _COLOURS:
        cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        _COLOURS[block_type] = cycle[(len(_COLOURS) + 2) % len(cycle)]
    return _COLOURS[block_type]


def _plot_curves(ax, arch: str, dataset: Optional[str], runs: list, plt) -> None:
    for run in sorted(runs, key=lambda r: (_block_order(r.block_type), r.seed or 0, r.name)):
        seed = "" if run.seed is None else f" s{run.seed}"
        ax.plot([e.epoch for e in run.evaluations], run.top1_values(), marker=".", linewidth=1,
                color=_colour(run.block_type, plt), label=f"{run.block_type}{seed} ({run.name})")
    drawn = set()
    for block in sorted({r.block_type for r in runs} | set(_block_types()), key=_block_order):
        paper = published_reference(arch, dataset, block)
        if paper is not None and (paper.source, block) not in drawn and block in paper.top1:
            drawn.add((paper.source, block))
            ax.axhline(paper.top1[block], linestyle="--", linewidth=0.8, color=_colour(block, plt),
                       label=f"{block}, {paper.source}: {paper.top1[block]:.2f}")
    ax.set_title(f"{arch} on {dataset or 'its dataset'}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)


def _plot_bars(ax, groups: list, n: int, plt) -> None:
    """The seeds table as grouped bars (finished runs only): mean score per (arch, dataset) and block, +-1 std
    error bars (two finished runs or more), the published top-1 as a black diamond on its bar."""
    if not groups:
        ax.text(0.5, 0.5, "no finished run yet (statistics use finished runs only)", ha="center", va="center",
                transform=ax.transAxes)
        ax.set_axis_off()
        return
    cells = sorted({(g.arch, g.dataset) for g in groups}, key=lambda k: (k[0], k[1] or ""))
    blocks = sorted({g.block_type for g in groups}, key=_block_order)
    width = 0.8 / len(blocks)
    tops, bottoms = [], []
    papers_labelled = False
    for b_index, block in enumerate(blocks):
        for c_index, (arch, dataset) in enumerate(cells):
            group = next((g for g in groups if (g.arch, g.dataset, g.block_type) == (arch, dataset, block)), None)
            score = summarize(group.scores(n)) if group else None
            x = c_index - 0.4 + width * (b_index + 0.5)
            if score is not None:
                err = score.std or 0.0
                ax.bar(x, score.mean, width, yerr=err if score.std is not None else None, capsize=3,
                       color=_colour(block, plt), label=block)
                ax.annotate(f"n={score.count}", (x, score.mean + err), ha="center", va="bottom", fontsize=6)
                tops.append(score.mean + err)
                bottoms.append(score.mean - err)
            paper = published_reference(arch, dataset, block)
            if paper is not None and block in paper.top1:
                ax.plot([x], [paper.top1[block]], marker="D", color="black", markersize=5, linestyle="none",
                        label=None if papers_labelled else "published")
                papers_labelled = True
                tops.append(paper.top1[block])
                bottoms.append(paper.top1[block])
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=7)
    if tops:
        span = max(tops) - min(bottoms)
        ax.set_ylim(max(0.0, min(bottoms) - 0.5 * span - 0.5), min(100.0, max(tops) + 0.3 * span + 0.5))
    ax.set_xticks(range(len(cells)))
    ax.set_xticklabels([f"{arch}\n{dataset or '?'}" for arch, dataset in cells])
    ax.set_ylabel(f"mean of last {n} top-1 (%) over seeds")
    ax.set_title("over seeds: mean score, +-1 std; diamonds: published")
    ax.grid(alpha=0.3, axis="y")


def plot_runs(runs: Sequence[Run], path: Path, n: int = 5) -> None:
    """Validation top-1 over epochs (one panel per (arch, dataset), one line per run, papers dashed),
    and below them the over-seeds table as grouped bars with error bars (:func:`_plot_bars`)."""
    plt = _import_pyplot()
    from acnet.fileio import atomic_path

    curves: dict = {}
    for run in runs:
        if run.evaluations:
            curves.setdefault((run.arch, run.dataset), []).append(run)
    if not curves:
        raise UsageError("--plot: no run has any evaluation line to draw")
    keys = sorted(curves, key=lambda k: (k[0], k[1] or ""))
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig = plt.figure(figsize=(5.5 * max(cols, 2), 4 * (rows + 1)))
    grid = fig.add_gridspec(rows + 1, cols)
    for index, key in enumerate(keys):
        _plot_curves(fig.add_subplot(grid[index // cols, index % cols]), *key, curves[key], plt)
    _plot_bars(fig.add_subplot(grid[rows, :]), [g for g in group_runs(runs) if g.scores(n)], n, plt)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
            _import_pyplot()  # fail before printing anything if the plot cannot be drawn
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
