"""utils/analysis/stats.py (Student t, Welch) against closed forms, hand-computed values and scipy; show_log's
over-seeds and Welch tables against hand-computed values."""
from __future__ import annotations

import csv
import io
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import show_log
from test_show_log import write_run
from utils.analysis.stats import betainc, summarize, t_cdf, t_quantile, welch

scipy_stats = pytest.importorskip("scipy.stats")


# ------------------------------------------------------------------------------ closed forms (no scipy)
def cdf_closed_form(t: float, df: int) -> float:
    """Student t CDF for 1, 2 and 4 degrees of freedom (textbook closed forms)."""
    if df == 1:
        return 0.5 + math.atan(t) / math.pi
    if df == 2:
        return 0.5 + t / (2 * math.sqrt(2 + t * t))
    x = t / math.sqrt(4 + t * t)
    return 0.5 + 0.75 * x * (1 - x * x / 3)


@pytest.mark.parametrize("df", [1, 2, 4])
@pytest.mark.parametrize("t", [-30.0, -2.5, -0.4, 0.0, 0.7, 3.6742, 50.0])
def test_t_cdf_closed_forms(t, df):
    assert t_cdf(t, df) == pytest.approx(cdf_closed_form(t, df), abs=1e-13)


@pytest.mark.parametrize("p", [0.6, 0.9, 0.975, 0.995])
def test_t_quantile_closed_forms(p):
    assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-11)
    assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-11)
    assert t_quantile(1 - p, 2) == pytest.approx(-(2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-11)


def test_t_quantile_table_values():
    # two-sided 95 % critical values of printed t tables
    for df, value in [(1, 12.706), (4, 2.776), (10, 2.228), (30, 2.042), (1000, 1.962)]:
        assert round(t_quantile(0.975, df), 3) == value


def test_betainc_special_cases():
    assert betainc(1, 1, 0.3) == pytest.approx(0.3, abs=1e-15)  # uniform
    assert betainc(2, 3, 0.4) == pytest.approx(1 - 0.6 ** 4 - 4 * 0.4 * 0.6 ** 3, abs=1e-14)  # binomial tail
    assert (betainc(3, 0.5, 0.0), betainc(3, 0.5, 1.0)) == (0.0, 1.0)
    with pytest.raises(ValueError):
        betainc(0, 1, 0.5)


def test_welch_hand_computed():
    # a = 1 2 3, b = 4 5 6: gain -3, variances 1, se = sqrt(2/3), df = (2/3)^2 / (2 (1/3)^2 / 2) = 4
    result = welch([1, 2, 3], [4, 5, 6])
    se = math.sqrt(2 / 3)
    assert (result.gain, result.df) == (pytest.approx(-3), pytest.approx(4))
    assert result.t == pytest.approx(-3 / se)
    assert result.p_value == pytest.approx(2 * (1 - cdf_closed_form(3 / se, 4)), rel=1e-12)
    assert result.p_value == pytest.approx(0.021312, abs=1e-6)
    assert (result.low, result.high) == (pytest.approx(-3 - 2.7764451 * se), pytest.approx(-3 + 2.7764451 * se))


def test_welch_degenerate_inputs():
    assert welch([1.0], [2.0, 3.0]) is None  # one run: no variance, no interval
    assert welch([], [2.0, 3.0]) is None
    flat = welch([2.0, 2.0], [1.0, 1.0])
    assert (flat.low, flat.high, flat.p_value) == (1.0, 1.0, 0.0)
    assert welch([1.0, 1.0], [1.0, 1.0]).p_value == 1.0


def test_summarize():
    summary = summarize([81.0, 83.0, 82.0, 86.0])
    assert (summary.count, summary.mean, summary.min, summary.max) == (4, 83.0, 81.0, 86.0)
    assert summary.std == pytest.approx(math.sqrt((4 + 0 + 1 + 9) / 3))
    assert summarize([5.0]).std is None and summarize([]) is None


# ------------------------------------------------------------------------------------------- scipy
@settings(max_examples=150, deadline=None)
@given(st.floats(-60, 60), st.floats(0.3, 5000))
def test_t_cdf_matches_scipy(t, df):
    assert t_cdf(t, df) == pytest.approx(float(scipy_stats.t.cdf(t, df)), abs=1e-10)


@settings(max_examples=100, deadline=None)
@given(st.floats(0.0005, 0.9995), st.floats(0.5, 5000))
def test_t_quantile_matches_scipy(p, df):
    assert t_quantile(p, df) == pytest.approx(float(scipy_stats.t.ppf(p, df)), rel=1e-8, abs=1e-10)


samples = st.lists(st.floats(50, 100, allow_nan=False), min_size=2, max_size=8).filter(
    lambda xs: max(xs) - min(xs) > 1e-3)


@settings(max_examples=150, deadline=None)
@given(samples, samples)
def test_welch_matches_scipy(a, b):
    ours = welch(a, b)
    theirs = scipy_stats.ttest_ind(a, b, equal_var=False)
    interval = theirs.confidence_interval(0.95)
    assert ours.t == pytest.approx(float(theirs.statistic), rel=1e-9)
    assert ours.p_value == pytest.approx(float(theirs.pvalue), rel=1e-8, abs=1e-12)
    assert (ours.low, ours.high) == (pytest.approx(float(interval.low), rel=1e-9, abs=1e-9),
                                     pytest.approx(float(interval.high), rel=1e-9, abs=1e-9))


# ---------------------------------------------------------------------------------- show_log tables
def write_seeds(root, arch, block, scores_by_seed, dataset="cifar10", deploy_offset=0.0):
    """One finished run per seed whose last 2 evaluations average to the given score."""
    for seed, score in scores_by_seed.items():
        suffix = "" if seed == 0 else f"_s{seed}"
        write_run(root, f"{arch}_{block}{suffix}_train", [10.0, score - 0.5, score + 0.5],
                  summary={"arch": arch, "block_type": block, "dataset": dataset, "seed": seed, "epochs": 15,
                           "deploy_top1": score + deploy_offset})


def tables(root, n=2):
    assert show_log.main([str(root), "--format", "csv", "-n", str(n)]) == 0


def read_sections(capsys):
    return [list(csv.DictReader(io.StringIO(part))) for part in capsys.readouterr().out.strip().split("\n\n")]


def test_over_seeds_and_welch_tables_hand_computed(tmp_path, capsys):
    write_seeds(tmp_path, "vc", "base", {0: 80.0, 1: 81.0, 2: 79.0})
    write_seeds(tmp_path, "vc", "acb", {0: 82.0, 1: 83.0, 2: 81.0}, deploy_offset=0.25)
    write_seeds(tmp_path, "vc", "dbb", {0: 83.0, 3: 83.5})
    tables(tmp_path)
    runs, groups, comparison = read_sections(capsys)
    assert {r["run"]: r["seed"] for r in runs}["vc_dbb_s3_train"] == "3"
    by_block = {g["block"]: g for g in groups}
    # base scores 80, 81, 79: mean 80, std sqrt((0 + 1 + 1) / 2) = 1
    assert [by_block["base"][k] for k in ("runs", "seeds", "mean", "std", "min", "max")] == [
        "3", "0,1,2", "80.00", "1.00", "79.00", "81.00"]
    assert (by_block["acb"]["deploy_mean"], by_block["acb"]["deploy_std"]) == ("82.25", "1.00")
    assert [by_block["dbb"][k] for k in ("seeds", "mean", "std")] == ["0,3", "83.25", "0.35"]
    rows = {row["block"]: row for row in comparison}
    # acb - base: gain 2, se = sqrt(1/3 + 1/3), df = 4, half width t(0.975, 4) se = 2.7764451 * 0.8164966
    acb = rows["acb"]
    assert (acb["gain_mean"], acb["ci95_low"], acb["ci95_high"]) == ("+2.00", "-0.27", "+4.27")
    assert acb["p_value"] == f"{2 * (1 - cdf_closed_form(2 / math.sqrt(2 / 3), 4)):.3f}" == "0.070"
    assert (acb["gain_deploy"], acb["paper_gain"], acb["note"]) == ("+2.25", "+0.55", "")
    # dbb - base: se^2 = 0.125/2 + 1/3, Welch df = se^4 / ((0.0625)^2 / 1 + (1/3)^2 / 2)
    se2 = 0.125 / 2 + 1 / 3
    df = se2 ** 2 / (0.0625 ** 2 + (1 / 3) ** 2 / 2)
    half = float(scipy_stats.t.ppf(0.975, df)) * math.sqrt(se2)
    dbb = rows["dbb"]
    assert (dbb["ci95_low"], dbb["ci95_high"]) == (f"{3.25 - half:+.2f}", f"{3.25 + half:+.2f}")


def test_single_seed_groups_still_compare(tmp_path, capsys):
    write_seeds(tmp_path, "cfqkbnc", "base", {0: 85.0})
    write_seeds(tmp_path, "cfqkbnc", "acb", {0: 86.5, 1: 86.0})
    tables(tmp_path)
    _, groups, comparison = read_sections(capsys)
    assert [(g["block"], g["runs"], g["std"]) for g in groups] == [("base", "1", "-"), ("acb", "2", "0.35")]
    (row,) = comparison
    assert (row["gain_mean"], row["ci95_low"], row["p_value"]) == ("+1.25", "-", "-")
    assert row["note"].startswith("no interval: 1 finished base and 2 finished acb run(s), needs 2+ on each side")


def test_a_repeated_seed_is_flagged(tmp_path, capsys):
    write_seeds(tmp_path, "vc", "base", {0: 80.0, 1: 81.0})
    write_run(tmp_path, "vc_base_again_train", [80.0, 80.0], summary={"arch": "vc", "block_type": "base",
                                                                      "dataset": "cifar10", "seed": 1,
                                                                      "deploy_top1": 80.0})  # finished
    tables(tmp_path)
    _, (group,), _ = read_sections(capsys)
    assert (group["runs"], group["seeds"], group["note"]) == ("3", "0,1,1", "seed 1 counted more than once")


def test_seed_comes_from_the_run_files_before_the_name(tmp_path):
    write_run(tmp_path, "vc_acb_s4_train", [1.0], recipe={"seed": 7})
    write_run(tmp_path, "vc_dbb_s4_train", [1.0])
    write_run(tmp_path, "vc_base_train", [1.0])  # no files, no _s: unknown (e.g. a log of other code)
    seeds = {run.name: run.seed for run in show_log.discover_runs(tmp_path)}
    assert seeds == {"vc_acb_s4_train": 7, "vc_dbb_s4_train": 4, "vc_base_train": None}


def test_the_seed_suffix_is_not_taken_for_a_dataset():
    # robustness.py and show_log.py find a run's dataset through run_dataset
    assert show_log.run_dataset("cfqkbnc_acb_s3_train", {}, {}) is None  # the arch's own
    assert show_log.run_dataset("cfqkbnc_acb_synthetic_s3_train", {}, {}) == "synthetic"
    assert show_log.run_seed("cfqkbnc_acb_synthetic_s3_train", {}, {}) == 3


def test_plot_draws_the_seeds_table_with_any_block_type(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    write_seeds(tmp_path / "exps", "vc", "base", {0: 80.0, 1: 81.0})
    write_seeds(tmp_path / "exps", "vc", "acb", {0: 82.0})
    write_seeds(tmp_path / "exps", "vc", "orepa", {0: 82.5, 2: 83.0})  # a block type show_log has no colour for
    out = tmp_path / "plot.png"
    assert show_log.main([str(tmp_path / "exps"), "-n", "2", "--plot", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    _, groups, comparison = read_sections_text(capsys)
    assert [g.split()[2] for g in groups] == ["base", "acb", "orepa"]
    assert [row.split()[2] for row in comparison] == ["acb", "orepa"]


def read_sections_text(capsys):
    """The data rows of the three text tables."""
    return [part.splitlines()[3:] for part in capsys.readouterr().out.strip().split("\n\n")]
