"""Reading runs: a run folder's log.txt, recipe.json, summary.json (and reproduce.py's console.txt).

:func:`read_run` collects one run (its evaluations, identity, figures and *state*), :func:`discover_runs`
the runs under a folder; nothing here raises on a bad run (it is listed with what went wrong). The
record and the state are read through :mod:`utils.rundir.record` (the state: ``run_state.json``, ``running``
only while the folder's lock is held); runs without a state file are judged from their files. Only
*finished* runs (a ``summary.json`` recording a tested deploy model) enter statistics
(:mod:`utils.analysis.tables`). Standard library only (the arch registry is asked, lazily, for an arch's dataset).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from constructor.registry import get_arch_spec
from utils.rundir.record import LOCK_FILE, STATE_FILE, RecordError, identity, lock_holder, read_state, record_kind
from utils.rundir.identity import RUN_FILES, ExperimentPaths, parse_run_name

#: A run's states. Only ``finished`` runs enter the statistics; the others are listed and counted.
FINISHED, RUNNING, INTERRUPTED, FAILED, INCOMPLETE, UNREADABLE = (
    "finished", "running", "interrupted", "failed", "incomplete", "unreadable")
STATES = (FINISHED, RUNNING, INTERRUPTED, FAILED, INCOMPLETE, UNREADABLE)
DEPLOY_MISMATCH = "DEPLOY MISMATCH"


_NUMBER = r"(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?|nan|inf)"
TOP1_PATTERN = re.compile(r"top1=" + _NUMBER)
TOP5_PATTERN = re.compile(r"top5=" + _NUMBER)
LOSS_PATTERN = re.compile(r"(?<![A-Za-z_])loss=" + _NUMBER)
EPOCH_PATTERN = re.compile(r"\bepoch[ =:]*(\d+)")
# The original's end-of-training line: "TRAIN speed: from A to B iterations, ..., examples/sec=1234.5"
ORIGINAL_SPEED_PATTERN = re.compile(r"TRAIN speed:.*examples/sec=" + _NUMBER)
# do_acnet.py's line after the final test: "final training-time model: acc1 ... on 10000 images"
EVAL_IMAGES_PATTERN = re.compile(r"final training-time model:.* on (\d+) images")
# log.txt lines start with "YYYY-MM-DD HH:MM:SS " (utils/rundir/log.py)
_TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2} ")
# How a run's own log ends when it stopped without finishing (utils/engine/trainer.py, utils/engine/posttrain.py)
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
    kind: str = "train"  # utils.rundir.record.KINDS: train, or derived from other weights (finetune, qat)
    recipe_key: tuple = ()  # the record's identity fields but arch, block, dataset, seed: runs of one recipe share it
    saved_epoch: Optional[int] = None  # the last saved epoch (run_state.json)

    @property
    def derived(self) -> bool:
        """A fine-tune or QAT run: listed apart, in no statistic and no training curve."""
        return self.kind != "train"

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
        if self.state == INTERRUPTED and self.saved_epoch is not None:
            parts = [f"{self.state} at epoch {self.saved_epoch}"]
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
    """The JSON object in ``path`` (``{}`` if absent); a corrupt one makes the run unreadable."""
    if not path.is_file():
        return {}
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        run.problems.append(f"{path.name} unreadable ({type(exc).__name__})")
        run.unreadable = True
        return {}
    if not isinstance(content, dict):
        run.problems.append(f"{path.name} is not a JSON object")
        run.unreadable = True
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
    try:
        return get_arch_spec(arch).dataset
    except ValueError:  # unknown arch: leave it unknown
        return None


def read_run(run_dir: Path) -> Run:
    """Collect one run from its ``log.txt``, ``recipe.json`` and ``summary.json``; never raises."""
    run = Run(name=run_dir.name, path=run_dir)
    paths = ExperimentPaths(run_dir)
    recipe = _read_json(paths.recipe, run)
    summary = _read_json(paths.summary, run)
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
    if recipe:
        run.kind = record_kind(recipe)
        run.recipe_key = tuple((key, value if not isinstance(value, list) else tuple(value))
                               for key, value in identity(recipe).items()
                               if key not in ("kind", "arch", "block_type", "dataset", "seed"))
    corrupt = run.unreadable

    log_path = paths.log
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
    _apply_recorded_state(run, run_dir, summary)
    if corrupt:
        run.state = UNREADABLE
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
    console_last = _last_line(ExperimentPaths(run_dir).console)
    if console_last and _CONSOLE_ERROR in console_last:
        message = console_last.split(_CONSOLE_ERROR, 1)[1].strip()
        if message.startswith("interrupted"):
            return INTERRUPTED, message
        return FAILED, message
    if summary:
        return INCOMPLETE, "summary.json has no deploy_top1"
    return RUNNING, None


def _apply_recorded_state(run: Run, run_dir: Path, summary: dict) -> None:
    """The state the run recorded (``run_state.json``, :func:`utils.rundir.record.read_state`) wins over the
    guess from its files: ``running`` only while its process holds the folder's lock. A run folder with a
    lock file but no state file stopped before it wrote anything: never ``running`` unless locked."""
    try:
        recorded = read_state(run_dir)
    except RecordError:
        run.problems.append(f"{STATE_FILE} unreadable")
        run.unreadable = True
        return
    if recorded is None:
        if run.state == RUNNING and (run_dir / LOCK_FILE).exists() and lock_holder(run_dir) is None:
            run.state, run.end_message = INTERRUPTED, "killed before it recorded a state"
        return
    state = recorded.get("state")
    run.saved_epoch = _as_int(recorded.get("epoch"))
    reason = recorded.get("reason") or None
    if state == FINISHED:
        if run.kind == "train" and _as_float(summary.get("deploy_top1")) is None:
            run.state, run.end_message = INCOMPLETE, "summary.json has no deploy_top1"
        else:
            run.state, run.end_message = FINISHED, None
    elif state in (RUNNING, INTERRUPTED, FAILED):
        run.state, run.end_message = state, reason


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
