"""Summarise training runs: accuracy table, base-vs-ACB/DBB/OREPA comparison and the papers' numbers.

Usage (as the original ``show_log.py``, plus options)::

    python show_log.py [ROOT] [EXCLUDE ...] [-n 5] [--format text|markdown|csv] [--plot FILE.png]

``ROOT`` (default ``acnet_exps``) holds one directory per run (``<arch>_<block>_train`` or
``<arch>_<block>_<dataset>_train``) with ``log.txt`` and, once finished, ``summary.json``; ``ROOT``
may also be a single run directory. A run whose path contains any ``EXCLUDE`` substring is skipped.

Only evaluation lines of ``log.txt`` contain ``top1=``; each carries ``epoch <int>``,
``top1=<float>``, ``top5=<float>`` and ``loss=<float>`` (the original's tokens). For each run the
table shows the mean top-1 over the last ``n`` evaluations, the max and the last top-1, the deploy
top-1, parameters and training speed; the comparison pairs each arch's ``base`` run with its
``acb``/``dbb``/``orepa`` runs (gain in mean and in max top-1) beside the published numbers. Runs in
progress, runs with fewer than ``n`` evaluations and unreadable logs are listed with their status,
never dropped. Beyond the standard library it needs matplotlib only for ``--plot``.
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
from typing import Iterable, Optional, Sequence

BLOCK_TYPES = ("base", "acb", "dbb", "orepa")  # = acnet.registry.block_type_names() (tests/test_registry.py)
RUN_FILES = ("log.txt", "recipe.json", "summary.json")


# --------------------------------------------------------------------------------------------
# Published results: the one place the papers' numbers live (REFERENCE.md section 1).
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PublishedResult:
    """Top-1 (%) reported by one source for one arch on one dataset, per block type."""

    arch: str
    dataset: str
    source: str
    top1: dict  # block type -> top-1 %

    def has(self, block_type: str) -> bool:
        return block_type in self.top1


ACNET_REPO = "ACNet repo"
ACNET_PAPER = "ACNet paper"
DBB_PAPER = "DBB paper T2"
OREPA_PAPER = "OREPA paper T4"

# Listed in order of preference: for an (arch, dataset, block) the first source reporting both the
# baseline and that block type is shown. "acb" in the DBB paper is its own re-run of ACNet.
PUBLISHED_RESULTS: tuple[PublishedResult, ...] = (
    PublishedResult("cfqkbnc", "cifar10", ACNET_REPO, {"base": 86.20, "acb": 86.87}),
    PublishedResult("vc", "cifar10", ACNET_REPO, {"base": 93.99, "acb": 94.54}),
    PublishedResult("vc", "cifar10", DBB_PAPER, {"base": 93.95, "acb": 94.43, "dbb": 94.62}),
    PublishedResult("vc", "cifar100", DBB_PAPER, {"base": 74.05, "acb": 75.30, "dbb": 75.72}),
    PublishedResult("src56", "cifar10", ACNET_REPO, {"base": 94.55, "acb": 95.06}),
    PublishedResult("src56", "cifar10", ACNET_PAPER, {"base": 94.31, "acb": 95.09}),
    PublishedResult("wrnc16plain", "cifar10", ACNET_REPO, {"base": 95.89, "acb": 96.33}),
    PublishedResult("sres18", "imagenet", "ACNet repo (approx.)", {"base": 70.6, "acb": 71.2}),
    PublishedResult("sres18", "imagenet", DBB_PAPER, {"base": 69.54, "acb": 70.53, "dbb": 70.99}),
    PublishedResult("sres50", "imagenet", DBB_PAPER, {"base": 76.14, "acb": 76.46, "dbb": 76.71}),
    PublishedResult("smi1", "imagenet", DBB_PAPER, {"base": 71.89, "acb": 72.14, "dbb": 72.88}),
    # OREPA (CVPR 2022) Table 4: ImageNet, 120 epochs, its own baseline and DBB re-runs.
    PublishedResult("sres18", "imagenet", OREPA_PAPER, {"base": 71.21, "dbb": 71.77, "orepa": 72.13}),
    PublishedResult("sres50", "imagenet", OREPA_PAPER, {"base": 76.70, "dbb": 76.89, "orepa": 77.31}),
)


def published_reference(arch: str, dataset: Optional[str], block_type: str) -> Optional[PublishedResult]:
    """The preferred published result for ``arch`` on ``dataset`` reporting ``block_type``.

    ``dataset=None`` (unknown) matches the arch's first listed dataset, which is its own.
    """
    candidates = [p for p in PUBLISHED_RESULTS if p.arch == arch]
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


def parse_log_text(text: str) -> ParsedLog:
    """Evaluation records of a log; lines with ``top1=`` lacking a token count as malformed.

    A line is an evaluation iff it contains ``top1=``; it must also carry ``epoch <int>``,
    ``top5=`` and ``loss=``. ``last_epoch_seen`` is the largest ``epoch <int>`` on any line.
    """
    parsed = ParsedLog()
    for line in text.splitlines():
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
    epochs_planned: Optional[int] = None
    epochs_done: Optional[int] = None
    evaluations: list = field(default_factory=list)
    finished: bool = False
    deploy_top1: Optional[float] = None
    params_train: Optional[int] = None
    params_deploy: Optional[int] = None
    images_per_sec: Optional[float] = None
    problems: list = field(default_factory=list)
    unreadable: bool = False

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
        """``done``, ``running``, ``unreadable``, plus warnings such as ``3/5 evals``."""
        if self.unreadable:
            return "unreadable: " + "; ".join(self.problems)
        parts = ["done" if self.finished else "running"]
        count = len(self.evaluations)
        if count == 0:
            parts.append("no evals")
        elif count < n:
            parts.append(f"{count}/{n} evals")
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


def parse_run_name(name: str) -> tuple:
    """``(arch, block, dataset)`` from ``<arch>_<block>[_<dataset>]_train``; unknown parts are None."""
    stem = name[: -len("_train")] if name.endswith("_train") else name
    tokens = stem.split("_")
    for index, token in enumerate(tokens):
        if token in BLOCK_TYPES and index > 0:
            arch = "_".join(tokens[:index])
            dataset = "_".join(tokens[index + 1:]) or None
            return arch, token, dataset
    return None, None, None


def run_dataset(run_dir_name: str, summary: dict, recipe: dict) -> Optional[str]:
    """The dataset a run used: ``summary.json``, else ``recipe.json`` (do_acnet.py records the dataset
    actually used), else the directory name (which names any dataset that is not the arch's own)."""
    return summary.get("dataset") or recipe.get("dataset") or parse_run_name(run_dir_name)[2]


def own_dataset(arch: str) -> Optional[str]:
    """The dataset an arch is defined for (its run directory name then omits it)."""
    for result in PUBLISHED_RESULTS:
        if result.arch == arch:
            return result.dataset
    try:  # archs without published numbers: ask the registry (imports torch, so only now)
        from constructor import get_arch_spec
        return get_arch_spec(arch).dataset
    except Exception:  # unknown arch or framework not importable: leave it unknown
        return None


def read_run(run_dir: Path) -> Run:
    """Collect one run from its ``log.txt``, ``recipe.json`` and ``summary.json``; never raises."""
    run = Run(name=run_dir.name, path=run_dir)
    recipe = _read_json(run_dir / "recipe.json", run)
    summary = _read_json(run_dir / "summary.json", run)
    name_arch, name_block, _ = parse_run_name(run_dir.name)

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
    run.epochs_planned = _as_int(pick("epochs"))
    run.finished = bool(summary)
    run.deploy_top1 = _as_float(summary.get("deploy_top1"))
    run.params_train = _as_int(summary.get("params_train"))
    run.params_deploy = _as_int(summary.get("params_deploy"))
    run.images_per_sec = _as_float(summary.get("train_images_per_sec"))

    log_path = run_dir / "log.txt"
    try:
        text = log_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        run.unreadable = True
        run.problems.append("no log.txt")
        return run
    except UnicodeDecodeError:
        run.unreadable = True
        run.problems.append("log.txt is not UTF-8 text")
        return run
    except OSError as exc:
        run.unreadable = True
        run.problems.append(f"log.txt: {exc.strerror or exc}")
        return run
    parsed = parse_log_text(text)
    run.evaluations = parsed.evaluations
    if run.images_per_sec is None:
        run.images_per_sec = parsed.images_per_sec
    if parsed.malformed_lines:
        run.problems.append(f"{parsed.malformed_lines} malformed eval line(s) skipped")
    if run.finished and run.epochs_planned is not None:
        run.epochs_done = run.epochs_planned
    else:
        run.epochs_done = parsed.last_epoch_seen
    return run


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


RUN_HEADERS = ("run", "arch", "block", "dataset", "epochs", "evals", "mean_top1", "max_top1",
               "last_top1", "deploy_top1", "params_train", "params_deploy", "train_img/s", "status")


def run_rows(runs: Iterable[Run], n: int) -> list:
    """One row per run, in RUN_HEADERS order."""
    return [
        (run.name, run.arch, run.block_type, run.dataset or "-", _epochs(run), str(len(run.evaluations)),
         _fmt(run.mean_last(n)), _fmt(run.max_top1()), _fmt(run.last_top1()), _fmt(run.deploy_top1),
         _fmt_params(run.params_train), _fmt_params(run.params_deploy), _fmt(run.images_per_sec, 1),
         run.status(n))
        for run in runs
    ]


COMPARISON_HEADERS = ("arch", "dataset", "block", "base_mean", "mean", "gain_mean", "base_max", "max",
                      "gain_max", "paper_base", "paper", "paper_gain", "paper_source", "note")


@dataclass(frozen=True)
class Comparison:
    """An arch's base run against one of its acb/dbb runs (``other`` None: base run alone)."""

    base: Optional[Run]
    other: Optional[Run]


def _pick_base(candidates: list) -> Optional[Run]:
    """Prefer a finished base run, then the one with most evaluations."""
    if not candidates:
        return None
    return max(candidates, key=lambda r: (r.finished, len(r.evaluations)))


def comparisons(runs: Iterable[Run]) -> list:
    """Pair each (arch, dataset)'s base run with each of its non-base runs."""
    groups: dict = {}
    for run in runs:
        if run.unreadable and not run.evaluations:
            continue
        groups.setdefault((run.arch, run.dataset), []).append(run)
    result = []
    for key in sorted(groups, key=lambda k: (k[0], k[1] or "")):
        members = groups[key]
        base = _pick_base([r for r in members if r.block_type == "base"])
        others = sorted((r for r in members if r.block_type != "base"), key=lambda r: (r.block_type, r.name))
        if not others and base is not None:
            result.append(Comparison(base, None))
        result.extend(Comparison(base, other) for other in others)
    return result


def _diff(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b is None else a - b


def comparison_rows(items: Iterable[Comparison], n: int) -> list:
    """Rows in COMPARISON_HEADERS order: our gains beside the published ones."""
    rows = []
    for item in items:
        ref_run = item.other or item.base
        block = item.other.block_type if item.other else "base"
        base_mean = item.base.mean_last(n) if item.base else None
        base_max = item.base.max_top1() if item.base else None
        mean = item.other.mean_last(n) if item.other else None
        best = item.other.max_top1() if item.other else None
        paper = published_reference(ref_run.arch, ref_run.dataset, block)
        paper_base = paper.top1["base"] if paper else None
        paper_block = paper.top1[block] if paper and block != "base" else None
        notes = []
        if item.base is None:
            notes.append("no base run")
        for run in (item.base, item.other):
            if run is not None and (not run.finished or len(run.evaluations) < n):
                notes.append(f"{run.name}: {run.status(n)}")
        rows.append((
            ref_run.arch, ref_run.dataset or "-", block, _fmt(base_mean), _fmt(mean),
            _fmt_signed(_diff(mean, base_mean)), _fmt(base_max), _fmt(best), _fmt_signed(_diff(best, base_max)),
            _fmt(paper_base), _fmt(paper_block), _fmt_signed(_diff(paper_block, paper_base)),
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
    """Both tables, titled (the csv sections are separated by one blank line)."""
    sections = [
        (f"Runs (mean_top1 = mean of the last {n} evaluations)", RUN_HEADERS, run_rows(runs, n)),
        ("Base vs ACB/DBB (gains in top-1 points; paper = published numbers)", COMPARISON_HEADERS,
         comparison_rows(comparisons(runs), n)),
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
class UsageError(Exception):
    """A problem the user can fix; reported as one line, exit status 2."""


def _import_pyplot():
    from utils.plotting import import_pyplot

    return import_pyplot(UsageError, "--plot", 'or pip install -e ".[plot]"')


def plot_runs(runs: Sequence[Run], path: Path) -> None:
    """Validation top-1 over epochs: one panel per (arch, dataset), one line per run, papers dashed."""
    plt = _import_pyplot()
    from acnet.fileio import atomic_path

    groups: dict = {}
    for run in runs:
        if run.evaluations:
            groups.setdefault((run.arch, run.dataset), []).append(run)
    if not groups:
        raise UsageError("--plot: no run has any evaluation line to draw")
    keys = sorted(groups, key=lambda k: (k[0], k[1] or ""))
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4 * rows), squeeze=False)
    colours = {"base": "tab:blue", "acb": "tab:orange", "dbb": "tab:green", "orepa": "tab:red"}
    for ax, key in zip(axes.flat, keys):
        arch, dataset = key
        for run in sorted(groups[key], key=lambda r: (BLOCK_TYPES + (r.block_type,)).index(r.block_type)):
            colour = colours.get(run.block_type)
            ax.plot([e.epoch for e in run.evaluations], run.top1_values(), marker=".", color=colour,
                    label=f"{run.block_type} ({run.name})")
        drawn = set()
        for block in BLOCK_TYPES:
            paper = published_reference(arch, dataset, block)
            if paper is not None and (paper.source, block) not in drawn and block in paper.top1:
                drawn.add((paper.source, block))
                ax.axhline(paper.top1[block], linestyle="--", linewidth=0.8, color=colours[block],
                           label=f"{block}, {paper.source}: {paper.top1[block]:.2f}")
        ax.set_title(f"{arch} on {dataset or 'its dataset'}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
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
                        help="also draw validation top-1 over epochs (needs matplotlib)")
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
            plot_runs(runs, args.plot)
            print(f"\nplot written to {args.plot}", file=sys.stderr)
    except UsageError as exc:
        print(f"show_log.py: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
