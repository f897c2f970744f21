"""show_log.py: parsing, run statuses, the base-vs-ACB/DBB comparison, output formats and the plot."""
from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import show_log
from utils.rundir.log import eval_line


def write_run(root: Path, name: str, top1s=(), *, epochs=None, summary=None, recipe=None, extra_lines=()) -> Path:
    """A run directory with eval lines in the engine's format (one every 5 epochs)."""
    run = root / name
    run.mkdir(parents=True)
    lines = ["2026-11-22 16:00:00 start: arch from recipe", *extra_lines]
    for index, top1 in enumerate(top1s):
        epoch = 5 * (index + 1)
        lines.append(f"2026-11-22 16:00:0{index % 10} epoch {epoch} train_acc1=50.0 train_loss=1.2")
        lines.append("2026-11-22 16:00:00 " + eval_line(epoch, 100 * epoch, {"top1": top1, "top5": 99.0, "loss": 0.5}))
    (run / "log.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    if recipe is not None or epochs is not None:
        (run / "recipe.json").write_text(json.dumps({"epochs": epochs, **(recipe or {})}), encoding="utf-8")
    if summary is not None:
        (run / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    return run


def run_by_name(runs, name):
    return next(r for r in runs if r.name == name)


# ---------------------------------------------------------------------------------------- parsing
@given(st.lists(st.tuples(st.integers(0, 10_000), st.floats(0, 100), st.floats(0, 100), st.floats(0, 50)),
                max_size=8))
def test_engine_eval_lines_parse_back(records):
    text = "\n".join("2026-11-22 16:00:00 " + eval_line(e, 7, {"top1": t1, "top5": t5, "loss": loss})
                     for e, t1, t5, loss in records)
    parsed = show_log.parse_log_text(text)
    assert parsed.malformed_lines == 0
    assert [e.epoch for e in parsed.evaluations] == [r[0] for r in records]
    for got, (_, t1, t5, loss) in zip(parsed.evaluations, records):
        assert got.top1 == pytest.approx(t1, abs=1e-4)
        assert got.top5 == pytest.approx(t5, abs=1e-4)
        assert got.loss == pytest.approx(loss, abs=1e-6)


def test_original_style_lines_and_noise():
    text = "\n".join([
        "epoch 3, train_acc=40.0, train_loss=1.9",           # training progress: not an evaluation
        "validate at epoch 5, top1=71.25, top5=98.10, loss=0.812345",  # original-style evaluation
        "2026-11-22 epoch 10 iter 9 val top1=73.5 top5=98.4 loss=0.7",
        "epoch 12 iter 9 val top1=74.0 top5=",                 # torn line of a killed run
        "note: resumed",
    ])
    parsed = show_log.parse_log_text(text)
    assert [(e.epoch, e.top1, e.top5, e.loss) for e in parsed.evaluations] == [
        (5, 71.25, 98.10, 0.812345), (10, 73.5, 98.4, 0.7)]
    assert parsed.malformed_lines == 1
    assert parsed.last_epoch_seen == 12


def test_a_log_of_the_original_code(tmp_path):
    """The original ACNet's log.txt: 0-based "val at epoch" lines and its "TRAIN speed" line."""
    run = tmp_path / "src56_acb_train"
    run.mkdir()
    (run / "log.txt").write_text("\n".join([
        "Start training with pytorch version 1.4.0",
        "val at epoch 0, top1=10.00000, top5=50.00000, loss=2.302585",
        *[f"val at epoch {e}, top1={90 + e / 100:.5f}, top5=99.80000, loss=0.250000" for e in range(390, 400)],
        "TRAIN speed: from 15600 to 31200 iterations, batch_size=128, examples=1996800, "
        "total_net_time=1000.0000, examples/sec=1996.8",
        "TRAIN LOSS collected over last 3 epochs: 0.012345",
    ]) + "\n")
    (record,) = show_log.discover_runs(tmp_path)
    assert (record.arch, record.block_type, record.dataset) == ("src56", "acb", "cifar10")
    assert len(record.evaluations) == 11 and record.epochs_done == 399
    assert record.mean_last(5) == pytest.approx(93.97)
    assert record.images_per_sec == pytest.approx(1996.8)


def test_train_loss_is_not_taken_for_the_eval_loss():
    parsed = show_log.parse_log_text("epoch 5 train_loss=9.0 val top1=50.0 top5=90.0 loss=1.5")
    assert parsed.evaluations[0].loss == 1.5


@pytest.mark.parametrize("name, expected", [
    ("cfqkbnc_acb_train", ("cfqkbnc", "acb", None, None)),
    ("cfqkbnc_acb_synthetic_train", ("cfqkbnc", "acb", "synthetic", None)),
    ("cfqkbnc_acb_synthetic_s12_train", ("cfqkbnc", "acb", "synthetic", 12)),
    ("src56_dbb_s3_train", ("src56", "dbb", None, 3)),
    ("wrnc16plain_dbb_train", ("wrnc16plain", "dbb", None, None)),
    ("my_net_base_cifar100_train", ("my_net", "base", "cifar100", None)),
    ("whatever", (None, None, None, None)),
])
def test_parse_run_name(name, expected):
    assert show_log.parse_run_name(name) == expected


# ------------------------------------------------------------------------------------------- runs
def test_run_statuses(tmp_path):
    summary = {"arch": "vc", "block_type": "acb", "dataset": "cifar10", "epochs": 30, "deploy_top1": 90.5,
               "params_train": 20_000_000, "params_deploy": 15_000_000, "train_images_per_sec": 1234.5}
    write_run(tmp_path, "vc_acb_train", [80, 82, 84, 86, 88, 90], summary=summary)
    write_run(tmp_path, "vc_base_train", [70, 71], epochs=400, recipe={"dataset": "cifar10"})
    write_run(tmp_path, "vc_dbb_train", [])
    bad = tmp_path / "src56_acb_train"
    bad.mkdir()
    (bad / "log.txt").write_bytes(b"\xff\xfe\x00top1=")
    only_recipe = tmp_path / "src56_base_train"
    only_recipe.mkdir()
    (only_recipe / "recipe.json").write_text("{}")
    (tmp_path / "not_a_run").mkdir()

    runs = show_log.discover_runs(tmp_path)
    assert sorted(r.name for r in runs) == ["src56_acb_train", "src56_base_train", "vc_acb_train",
                                            "vc_base_train", "vc_dbb_train"]
    done = run_by_name(runs, "vc_acb_train")
    assert done.status(5) == "finished" and done.finished
    assert done.mean_last(5) == pytest.approx(sum([82, 84, 86, 88, 90]) / 5)
    assert (done.max_top1(), done.last_top1(), done.deploy_top1) == (90, 90, 90.5)
    assert (done.epochs_done, done.epochs_planned) == (30, 30)
    running = run_by_name(runs, "vc_base_train")
    assert running.status(5) == "running, 2/5 evals"
    assert (running.epochs_done, running.epochs_planned, running.dataset) == (10, 400, "cifar10")
    assert run_by_name(runs, "vc_dbb_train").status(5) == "running, no evals"
    assert run_by_name(runs, "src56_acb_train").status(5) == "unreadable: log.txt is not UTF-8 text"
    assert run_by_name(runs, "src56_base_train").status(5) == "unreadable: no log.txt"


def test_corrupt_summary_is_reported_not_fatal(tmp_path):
    run = write_run(tmp_path, "vc_acb_train", [50, 60])
    (run / "summary.json").write_text('{"arch": "vc", "deploy_to')
    (record,) = show_log.discover_runs(tmp_path)
    assert not record.finished
    assert "summary.json unreadable (JSONDecodeError)" in record.status(5)
    assert record.max_top1() == 60


def test_root_may_be_one_run_and_exclusion(tmp_path):
    run = write_run(tmp_path, "vc_acb_train", [50, 60])
    assert [r.name for r in show_log.discover_runs(run)] == ["vc_acb_train"]
    write_run(tmp_path, "vc_base_train", [40])
    assert [r.name for r in show_log.discover_runs(tmp_path, ["base"])] == ["vc_acb_train"]


# ------------------------------------------------------------------------------------- comparison
def test_comparison_gains_and_published_numbers(tmp_path):
    write_run(tmp_path, "cfqkbnc_base_train", [10, 80, 81, 82, 83, 84], summary={"epochs": 30, "deploy_top1": 84})
    write_run(tmp_path, "cfqkbnc_acb_train", [20, 81, 83, 83, 85, 88], summary={"epochs": 30, "deploy_top1": 88.5})
    write_run(tmp_path, "cfqkbnc_dbb_train", [84, 84, 84, 84, 84], summary={"epochs": 30, "deploy_top1": None})
    rows = show_log.comparison_rows(show_log.comparisons(show_log.discover_runs(tmp_path)), 5)
    table = {row[2]: dict(zip(show_log.COMPARISON_HEADERS, row)) for row in rows}
    assert set(table) == {"acb", "dbb"}
    acb = table["acb"]
    assert (acb["dataset"], acb["base_mean"], acb["mean"], acb["gain_mean"]) == ("cifar10", "82.00", "84.00", "+2.00")
    assert (acb["base_runs"], acb["runs"], acb["ci95_low"], acb["p_value"], acb["gain_deploy"]) == (
        "1", "1", "-", "-", "+4.50")
    assert (acb["paper_base"], acb["paper"], acb["paper_gain"], acb["paper_source"]) == (
        "86.20", "86.87", "+0.67", "ACNet repo")
    assert acb["note"] == "no interval: 1 finished base and 1 finished acb run(s), needs 2+ on each side"
    dbb = table["dbb"]  # its summary records no deploy result: nothing of it enters the statistics
    assert (dbb["runs"], dbb["mean"], dbb["gain_mean"], dbb["gain_deploy"], dbb["paper"]) == ("0", "-", "-", "-", "-")
    assert dbb["note"] == ("no interval: 1 finished base and 0 finished dbb run(s), needs 2+ on each side; "
                           "dbb: 0 finished, 1 incomplete: left out")


def test_comparison_flags_missing_base_and_unfinished_runs(tmp_path):
    write_run(tmp_path, "vc_dbb_cifar100_train", [70, 71, 72])
    (row,) = show_log.comparison_rows(show_log.comparisons(show_log.discover_runs(tmp_path)), 5)
    fields = dict(zip(show_log.COMPARISON_HEADERS, row))
    assert (fields["dataset"], fields["paper_base"], fields["paper"]) == ("cifar100", "74.05", "75.72")
    assert (fields["base_runs"], fields["runs"], fields["gain_mean"]) == ("0", "0", "-")
    assert fields["note"] == "no base run; dbb: 0 finished, 1 running: left out"


def test_runs_on_other_datasets_are_not_paired_with_the_arch_default(tmp_path):
    write_run(tmp_path, "cfqkbnc_base_train", [80] * 5, summary={"epochs": 5, "deploy_top1": 80})
    write_run(tmp_path, "cfqkbnc_acb_synthetic_train", [50] * 5, summary={"epochs": 5, "deploy_top1": 50})
    rows = show_log.comparison_rows(show_log.comparisons(show_log.discover_runs(tmp_path)), 5)
    by_dataset = {row[1]: dict(zip(show_log.COMPARISON_HEADERS, row)) for row in rows}
    assert by_dataset["synthetic"]["base_mean"] == "-"  # no synthetic base run to compare with
    assert by_dataset["synthetic"]["paper_base"] == "-"  # and no paper numbers for synthetic data
    assert by_dataset["cifar10"]["block"] == "base"


def test_dataset_of_an_unfinished_run_with_a_custom_name_comes_from_its_recipe(tmp_path):
    # do_acnet.py --exp-name src56_acb_long_train: the name's last token is not a dataset
    write_run(tmp_path, "src56_acb_long_train", [90], recipe={"arch": "src56", "block_type": "acb",
                                                               "dataset": "cifar10"})
    write_run(tmp_path, "src56_acb_synthetic_train", [50], recipe={"arch": "src56", "block_type": "acb"})
    runs = show_log.discover_runs(tmp_path)
    assert run_by_name(runs, "src56_acb_long_train").dataset == "cifar10"
    assert run_by_name(runs, "src56_acb_synthetic_train").dataset == "synthetic"  # no recipe dataset: the name


@pytest.mark.parametrize("arch, dataset, block, expected", [
    ("src56", "cifar10", "acb", (94.55, 95.06)),
    ("sres18", "imagenet", "dbb", (69.54, 70.99)),
    ("smi1", "imagenet", "dbb", (71.89, 72.88)),
    ("vc", None, "dbb", (93.95, 94.62)),
    ("sres18", "imagenet", "orepa", (71.21, 72.13)),  # OREPA paper Table 4, its own baseline
    ("sres50", None, "orepa", (76.70, 77.31)),
])
def test_published_reference(arch, dataset, block, expected):
    ref = show_log.published_reference(arch, dataset, block)
    assert (ref.top1["base"], ref.top1[block]) == expected
    assert show_log.published_reference("cfqkbnc", "cifar10", "dbb") is None
    assert show_log.published_reference("src56", "cifar10", "orepa") is None


# ------------------------------------------------------------------------------------ command line
def test_cli_formats(tmp_path, capsys):
    write_run(tmp_path, "vc_base_train", [90, 91, 92, 93, 94], summary={"epochs": 25, "deploy_top1": 94})
    write_run(tmp_path, "vc_acb_train", [91, 92, 93, 94, 95], summary={"epochs": 25, "params_train": 123,
                                                                          "deploy_top1": 95})

    assert show_log.main([str(tmp_path), "--format", "csv"]) == 0
    runs_csv, groups_csv, comparison_csv = capsys.readouterr().out.strip().split("\n\n")
    runs = list(csv.DictReader(io.StringIO(runs_csv)))
    assert [(r["run"], r["mean_top1_last5"], r["epochs"], r["status"]) for r in runs] == [
        ("vc_acb_train", "93.00", "25/25", "finished"), ("vc_base_train", "92.00", "25/25", "finished")]
    assert runs[0]["params_train"] == "123"
    assert [(g["block"], g["runs"], g["mean"], g["std"]) for g in csv.DictReader(io.StringIO(groups_csv))] == [
        ("base", "1", "92.00", "-"), ("acb", "1", "93.00", "-")]
    (comparison,) = csv.DictReader(io.StringIO(comparison_csv))
    assert (comparison["block"], comparison["gain_mean"], comparison["paper_gain"]) == ("acb", "+1.00", "+0.55")

    assert show_log.main([str(tmp_path), "--format", "markdown", "-n", "2"]) == 0
    markdown = capsys.readouterr().out
    assert "| vc_acb_train | vc | acb | cifar10 | - | 25/25 | 5 | 94.50 |" in markdown
    assert "### Base vs ACB/DBB" in markdown

    assert show_log.main([str(tmp_path), "acb"]) == 0
    text = capsys.readouterr().out
    assert "vc_base_train" in text and "vc_acb_train" not in text


@pytest.mark.parametrize("argv, message", [
    (["{root}/missing"], "no such directory"),
    (["{root}"], "no runs under"),
    (["{root}", "-n", "0"], "-n must be at least 1"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, argv, message):
    assert show_log.main([a.format(root=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_plot_writes_png(tmp_path, capsys):
    write_run(tmp_path / "exps", "vc_base_train", [90, 91, 92])
    write_run(tmp_path / "exps", "vc_acb_train", [91, 92, 94])
    out = tmp_path / "figs" / "curves.png"
    assert show_log.main([str(tmp_path / "exps"), "--plot", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["curves.png"]  # no temporary file left


def test_plot_without_matplotlib_is_a_clear_error(tmp_path, capsys, monkeypatch):
    write_run(tmp_path, "vc_base_train", [90])
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "curves.png"
    assert show_log.main([str(tmp_path), "--plot", str(out)]) == 2
    assert "needs matplotlib" in capsys.readouterr().err
    assert not out.exists()


def test_plot_with_no_evaluations_is_a_clear_error(tmp_path, capsys):
    write_run(tmp_path, "vc_base_train", [])
    assert show_log.main([str(tmp_path), "--plot", str(tmp_path / "p.png")]) == 2
    assert "no run has any evaluation" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- a real run


def test_on_a_tiny_real_run(quickstart_run, capsys):
    summary = json.loads((quickstart_run / "summary.json").read_text())
    eval_lines = [line for line in (quickstart_run / "log.txt").read_text().splitlines() if "top1=" in line]
    assert show_log.main([str(quickstart_run.parent), "--format", "csv", "-n", "2"]) == 0
    runs_csv = capsys.readouterr().out.split("\n\n")[0]
    (row,) = csv.DictReader(io.StringIO(runs_csv))
    assert (row["run"], row["arch"], row["block"], row["dataset"], row["epochs"], row["status"]) == (
        quickstart_run.name, "cfqkbnc", "acb", "synthetic", "3/3", "finished")
    assert int(row["evals"]) == len(eval_lines)
    assert float(row["deploy_top1"]) == pytest.approx(summary["deploy_top1"], abs=0.005)
    assert float(row["last_top1"]) == pytest.approx(float(eval_lines[-1].split("top1=")[1].split()[0]))


# ------------------------------------------------------------- statistics over finished runs only (#21)
def finished_summary(seed, top1s, *, deploy=None, train=None):
    last = top1s[-1]
    return {"arch": "src56", "block_type": None, "dataset": "cifar10", "seed": seed, "epochs": 400,
            "train_top1": last if train is None else train, "deploy_top1": last if deploy is None else deploy}


FINAL_LINE = "2026-11-22 17:00:00 final training-time model: acc1 {:.4f} acc5 99.9 loss 0.2 on 10000 images"


@pytest.fixture
def sweep_in_progress(tmp_path):
    """A sweep folder mid-way: finished, running, interrupted, failed and deploy-mismatch runs."""
    def finished(name, block, seed, top1s, **kw):
        summary = {**finished_summary(seed, top1s, **kw), "block_type": block}
        return write_run(tmp_path, name, top1s, summary=summary, extra_lines=[FINAL_LINE.format(summary["train_top1"])])

    def unfinished(name, block, seed, top1s, last_line=None):
        run = write_run(tmp_path, name, top1s, recipe={"arch": "src56", "block_type": block, "dataset": "cifar10",
                                                        "seed": seed}, epochs=400)
        if last_line:
            with (run / "log.txt").open("a") as log:
                log.write(f"2026-11-22 17:00:00 {last_line}\n")
        return run

    finished("src56_base_train", "base", 0, [90, 91, 92, 93, 94])           # score 92
    finished("src56_base_s1_train", "base", 1, [91, 92, 93, 94, 95])        # score 93
    unfinished("src56_base_s2_train", "base", 2, [50, 60])                  # running: log only
    finished("src56_acb_train", "acb", 0, [92, 93, 94, 95, 96])             # score 94
    finished("src56_acb_s1_train", "acb", 1, [93, 94, 95, 96, 97], train=97.0, deploy=96.98)  # 2 images off
    finished("src56_acb_s3_train", "acb", 3, [94, 95, 96, 97, 98], deploy=97.99)  # 1 image off: no flag
    interrupted = unfinished("src56_acb_s2_train", "acb", 2, [70], "interrupted in epoch 3/400 at iteration 25")
    (interrupted / "latest.pth").write_bytes(b"state")
    unfinished("src56_acb_s4_train", "acb", 4, [80], "ERROR: the training loss became non-finite (NaN or inf)")
    failed = unfinished("src56_dbb_s5_train", "dbb", 5, [60])
    (failed / "console.txt").write_text("epoch 1 ...\ndo_acnet.py: error: dataset folder missing: pass --data-dir\n")
    return tmp_path


def test_states_of_runs_mid_sweep(sweep_in_progress):
    runs = {run.name: run for run in show_log.discover_runs(sweep_in_progress)}
    assert {name: run.state for name, run in runs.items()} == {
        "src56_base_train": "finished", "src56_base_s1_train": "finished", "src56_base_s2_train": "running",
        "src56_acb_train": "finished", "src56_acb_s1_train": "finished", "src56_acb_s3_train": "finished",
        "src56_acb_s2_train": "interrupted", "src56_acb_s4_train": "failed", "src56_dbb_s5_train": "failed"}
    mismatch = "DEPLOY MISMATCH: deploy 96.98 vs training-time 97.00 (> 1 of 10000 images)"
    rows = {row[0]: dict(zip(show_log.run_headers(5), row)) for row in show_log.run_rows(runs.values(), 5)}
    assert rows["src56_acb_s1_train"]["status"] == f"finished, {mismatch}"
    assert rows["src56_acb_s3_train"]["status"] == "finished"  # 0.01 points = one image of 10000: not flagged
    assert rows["src56_acb_s2_train"]["status"] == "interrupted, 1/5 evals, interrupted in epoch 3/400 at iteration 25"
    assert rows["src56_acb_s4_train"]["status"] == (
        "failed, 1/5 evals, ERROR: the training loss became non-finite (NaN or inf)")
    assert rows["src56_dbb_s5_train"]["status"] == "failed, 1/5 evals, dataset folder missing: pass --data-dir"
    assert rows["src56_base_s2_train"]["status"] == "running, 2/5 evals"
    assert rows["src56_base_s2_train"]["mean_top1_last5"] == "55.00"  # listed with its score, never averaged in


def test_group_statistics_use_finished_runs_only(sweep_in_progress):
    groups = show_log.group_rows(show_log.group_runs(show_log.discover_runs(sweep_in_progress)), 5)
    table = {row[2]: dict(zip(show_log.GROUP_HEADERS, row)) for row in groups}
    base, acb, dbb = table["base"], table["acb"], table["dbb"]
    # base: scores 92, 93 -> mean 92.5, sample std sqrt(0.5); deploy 94, 95
    assert (base["runs"], base["seeds"], base["mean"], base["std"], base["min"], base["max"]) == (
        "2", "0,1", "92.50", f"{0.5 ** 0.5:.2f}", "92.00", "93.00")
    assert (base["deploy_mean"], base["deploy_std"]) == ("94.50", f"{0.5 ** 0.5:.2f}")
    assert base["note"] == "2 finished, 1 running: left out"
    # acb: scores 94, 95, 96 -> mean 95, std 1; deploy 96, 96.98, 97.99
    deploys = [96.0, 96.98, 97.99]
    mean = sum(deploys) / 3
    std = (sum((d - mean) ** 2 for d in deploys) / 2) ** 0.5
    assert (acb["runs"], acb["seeds"], acb["mean"], acb["std"], acb["min"], acb["max"]) == (
        "3", "0,1,3", "95.00", "1.00", "94.00", "96.00")
    assert (acb["deploy_mean"], acb["deploy_std"]) == (f"{mean:.2f}", f"{std:.2f}")
    assert acb["note"] == ("3 finished, 1 interrupted, 1 failed: left out; src56_acb_s1_train: DEPLOY MISMATCH: "
                           "deploy 96.98 vs training-time 97.00 (> 1 of 10000 images)")
    assert (dbb["runs"], dbb["seeds"], dbb["mean"], dbb["note"]) == ("0", "-", "-", "0 finished, 1 failed: left out")


def test_comparison_uses_finished_runs_and_says_how_seeds_pair(sweep_in_progress):
    from scipy import stats as scipy_stats

    rows = show_log.comparison_rows(show_log.comparisons(show_log.discover_runs(sweep_in_progress)), 5)
    table = {row[2]: dict(zip(show_log.COMPARISON_HEADERS, row)) for row in rows}
    acb = table["acb"]
    assert (acb["base_runs"], acb["runs"], acb["base_mean"], acb["mean"], acb["gain_mean"]) == (
        "2", "3", "92.50", "95.00", "+2.50")
    # Welch by hand: variances 1 (n=3) and 0.5 (n=2)
    se2 = 1 / 3 + 0.5 / 2
    df = se2 ** 2 / ((1 / 3) ** 2 / 2 + (0.5 / 2) ** 2 / 1)
    half = scipy_stats.t.ppf(0.975, df) * se2 ** 0.5
    p_value = 2 * scipy_stats.t.sf(2.5 / se2 ** 0.5, df)
    assert (acb["ci95_low"], acb["ci95_high"]) == (f"{2.5 - half:+.2f}", f"{2.5 + half:+.2f}")
    assert acb["p_value"] == f"{p_value:.3f}"
    assert acb["gain_deploy"] == f"{(96.0 + 96.98 + 97.99) / 3 - 94.5:+.2f}"
    assert acb["note"] == ("seeds paired: 0,1; unpaired: acb 3; base: 2 finished, 1 running: left out; "
                           "acb: 3 finished, 1 interrupted, 1 failed: left out; src56_acb_s1_train: DEPLOY MISMATCH: "
                           "deploy 96.98 vs training-time 97.00 (> 1 of 10000 images)")
    dbb = table["dbb"]
    assert (dbb["base_runs"], dbb["runs"], dbb["mean"], dbb["ci95_low"], dbb["p_value"]) == ("2", "0", "-", "-", "-")
    assert dbb["note"] == ("no interval: 2 finished base and 0 finished dbb run(s), needs 2+ on each side; "
                           "base: 2 finished, 1 running: left out; dbb: 0 finished, 1 failed: left out")


def test_one_finished_run_on_a_side_gets_no_interval(sweep_in_progress):
    for name in ("src56_base_s1_train",):
        (sweep_in_progress / name / "summary.json").unlink()  # back to "running"
    rows = show_log.comparison_rows(show_log.comparisons(show_log.discover_runs(sweep_in_progress)), 5)
    acb = next(dict(zip(show_log.COMPARISON_HEADERS, row)) for row in rows if row[2] == "acb")
    assert (acb["base_runs"], acb["base_mean"], acb["gain_mean"], acb["ci95_low"], acb["p_value"]) == (
        "1", "92.00", "+3.00", "-", "-")
    assert acb["note"].startswith("no interval: 1 finished base and 3 finished acb run(s), needs 2+ on each side; "
                                  "seeds paired: 0; unpaired: acb 1,3; base: 1 finished, 2 running: left out")


def test_the_printed_report_and_plot_mid_sweep(sweep_in_progress, tmp_path, capsys):
    out = tmp_path / "bars.png"
    assert show_log.main([str(sweep_in_progress), "--plot", str(out)]) == 0
    text = capsys.readouterr().out
    assert "mean_top1_last5 = a run's score, the mean top-1 of its last 5 evaluations" in text
    assert text.count("DEPLOY MISMATCH") == 3  # runs table, over-seeds note, comparison note
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_show_log_needs_no_torch(sweep_in_progress, capsys):
    """show_log.py only reads json and log files: with ``import torch`` made to fail (``sys.modules['torch']
    = None``) it prints the same tables, published numbers included, as it does in this process."""
    repo = Path(show_log.__file__).resolve().parent
    script = ("import runpy, sys; sys.modules['torch'] = None; "
              f"sys.argv = ['show_log.py', {str(sweep_in_progress)!r}]; "
              "runpy.run_path('show_log.py', run_name='__main__')")
    env = {**os.environ, "PYTHONPATH": str(repo)}
    result = subprocess.run([sys.executable, "-c", script], cwd=repo, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert show_log.main([str(sweep_in_progress)]) == 0
    assert result.stdout == capsys.readouterr().out
    comparison = result.stdout.split("\n\n")[-1]
    acb = next(line.split() for line in comparison.splitlines() if line.startswith("src56  cifar10  acb"))
    assert acb[12:16] == ["94.55", "95.06", "+0.51", "ACNet"]  # the published numbers

