"""matplotlib, an optional extra, imported in one place for every tool that draws; show_log.py's plot."""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

from acnet.fileio import atomic_path
from utils.analysis.tables import block_order, group_runs, published_reference
from utils.errors import UsageError
from utils.rundir.identity import block_types
from utils.analysis.stats import summarize

if TYPE_CHECKING:
    from utils.analysis.collect import Run

#: What to do instead of ``--plot`` when matplotlib is missing.
PLOT_ALTERNATIVE = 'or pip install -e ".[plot]"'


def import_pyplot(what: str, alternative: str) -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend.

    Raises :class:`utils.errors.UsageError` with one actionable line (``"<what> needs matplotlib ... (<alternative>)"``)
    when matplotlib is not installed, so a tool can fail before it prints or writes anything.
    """
    try:
        import matplotlib
    except ImportError:
        raise UsageError(f"{what} needs matplotlib, which is not installed: pip install matplotlib "
                    f"({alternative})") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


_COLOURS = {"base": "tab:blue", "acb": "tab:orange", "dbb": "tab:green"}


def _colour(block_type: str, plt) -> str:
    """A fixed colour per block type (others take the next of matplotlib's cycle, stably)."""
    if block_type not in _COLOURS:
        cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        _COLOURS[block_type] = cycle[(len(_COLOURS) + 2) % len(cycle)]
    return _COLOURS[block_type]


def _plot_curves(ax, arch: str, dataset: Optional[str], runs: list, plt) -> None:
    for run in sorted(runs, key=lambda r: (block_order(r.block_type), r.seed or 0, r.name)):
        seed = "" if run.seed is None else f" s{run.seed}"
        ax.plot([e.epoch for e in run.evaluations], run.top1_values(), marker=".", linewidth=1,
                color=_colour(run.block_type, plt), label=f"{run.block_type}{seed} ({run.name})")
    drawn = set()
    for block in sorted({r.block_type for r in runs} | set(block_types()), key=block_order):
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
    blocks = sorted({g.block_type for g in groups}, key=block_order)
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
    plt = import_pyplot("--plot", PLOT_ALTERNATIVE)

    curves: dict = {}
    for run in runs:
        if run.evaluations and not run.derived:  # derived runs (fine-tune, QAT) are no training curves
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
