"""Report tables over runs: per run, per (arch, dataset, block type) over seeds, and each block type
against its baseline (95 % Welch interval, p-value, seed pairing), beside the published numbers the
arch registry declares. ``render_table`` writes text, markdown or csv.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

from constructor.registry import get_arch_spec
from utils.rundir.identity import block_types
from utils.analysis.collect import (FINISHED, Run, STATES)
from utils.analysis.stats import Summary, summarize, welch


def published_results(arch: str) -> tuple:
    """The published results the arch registry declares for ``arch`` (``()`` for an unknown arch)."""
    try:
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
    variant: str = ""  # the recipe fields that set this group apart from the arch's other recipes run here

    @property
    def dataset_label(self) -> str:
        """The dataset cell: the dataset, and the recipe variant when runs of several recipes were found."""
        return (self.dataset or "-") + (f" [{self.variant}]" if self.variant else "")

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


def block_order(block_type: str) -> tuple:
    names = block_types()
    return (names.index(block_type) if block_type in names else len(names), block_type)


def group_runs(runs: Iterable[Run]) -> list:
    """Training runs grouped by (arch, dataset, recipe, block type), sorted; runs of different recipes (their
    records' identity: epochs, lr, synthetic sizes, ...) are never pooled, each group of a recipe that is not
    the only one is labelled with the fields it differs in (a run that records fewer fields, e.g. one of
    other code, joins the recipe it does not contradict). Derived runs (fine-tune, QAT) belong to no group;
    nor does an unreadable run whose arch or block type is unknown (one whose directory name tells both is
    counted in its group as left out)."""
    groups: dict = {}
    chosen = [run for run in runs if not (run.derived or (run.unreadable and "?" in (run.arch, run.block_type)))]
    recipes: dict = {}  # (arch, dataset) -> the distinct recipes, most complete first
    for run in sorted(chosen, key=lambda r: -len(r.recipe_key)):
        known = recipes.setdefault((run.arch, run.dataset), [])
        if not any(_compatible(run.recipe_key, key) for key in known):
            known.append(run.recipe_key)
    for run in chosen:
        recipe_key = next(key for key in recipes[(run.arch, run.dataset)] if _compatible(run.recipe_key, key))
        key = (run.arch, run.dataset, recipe_key, run.block_type)
        groups.setdefault(key, Group(run.arch, run.dataset, run.block_type)).runs.append(run)
    for (arch, dataset, recipe_key, _), group in groups.items():
        group.variant = _variant_label(recipe_key, set(recipes[(arch, dataset)]))
    return [groups[k] for k in sorted(groups, key=lambda k: (k[0], k[1] or "", groups[k].variant, block_order(k[3])))]


def _compatible(a: tuple, b: tuple) -> bool:
    """No field known to both differs."""
    theirs = dict(b)
    return all(theirs[name] == value for name, value in a if name in theirs)


def _variant_label(recipe_key: tuple, all_keys: set) -> str:
    """``"epochs=3, lr=0.05"``: the fields in which ``recipe_key`` differs from any other key of ``all_keys``."""
    if len(all_keys) < 2:
        return ""
    mine = dict(recipe_key)
    fields_differing = []
    for other in all_keys:
        theirs = dict(other)
        for name in sorted(set(mine) | set(theirs)):
            if mine.get(name) != theirs.get(name) and name not in fields_differing:
                fields_differing.append(name)
    if not mine:
        return "recipe unknown"
    return ", ".join(f"{name}={mine.get(name, '?')}" for name in fields_differing) or "recipe unknown"


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
        rows.append((group.arch, group.dataset_label, group.block_type, str(len(group.finished_runs())), _seeds(group),
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
        by_key.setdefault((group.arch, group.dataset, group.variant), []).append(group)
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
            ref.arch, ref.dataset_label, block, str(len(base_scores)) if item.base else "0",
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
    """The three tables, titled (the csv sections are separated by one blank line); derived runs (fine-tune,
    QAT) in a fourth table of their own, in no statistic."""
    trained = [run for run in runs if not run.derived]
    derived = [run for run in runs if run.derived]
    sections = [
        (f"Runs ({score_header(n)} = a run's score, the mean top-1 of its last {n} evaluations; state: "
         "finished = summary.json with a tested deploy model)", run_headers(n), run_rows(trained, n)),
        (f"Over seeds, finished runs only (score = a run's {score_header(n)}; mean, std, min, max of the scores; "
         "deploy = deploy_top1)", GROUP_HEADERS, group_rows(group_runs(runs), n)),
        ("Base vs ACB/DBB, finished runs only (gain of the mean score in top-1 points, 95 % Welch interval and "
         "p-value; paper = published numbers)", COMPARISON_HEADERS, comparison_rows(comparisons(runs), n)),
    ]
    if derived:
        sections.append(("Derived runs (fine-tune from --init-weights, QAT: listed apart, in no statistic)",
                         ("kind", *run_headers(n)), [(run.kind, *row) for run, row in zip(derived, run_rows(derived, n))]))
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
