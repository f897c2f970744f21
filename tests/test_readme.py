"""The README as a contract: its install/test commands (what CI runs), and its offline quickstart command
run exactly as written (in a scratch directory holding a symlink to do_acnet.py, so outputs stay out of
the repository). Every other code block of the README and of docs/ is run by tests/test_docs.py.

The quickstart's run directory (fixture ``quickstart_run``, tests/quickstart.py) is produced once per test
session and reused by the other tool and docs tests.
"""
from __future__ import annotations

import json
import re

import h5py

from quickstart import QUICKSTART_RUN, README, REPO, SUMMARY_KEYS, code_blocks, quickstart_command, readme_text, section


# ------------------------------------------------------------------------------------------ tests
def test_install_and_test_commands_are_kept_and_are_what_ci_runs():
    (block,) = code_blocks(section("Install and test"), "bash")
    commands = block.strip().splitlines()
    assert commands == ['pip install -e ".[test,deploy]"', "python -m pytest -q -n auto"]
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    ci_commands = [line for line in ci if line and not line.startswith(("#", "set ", "cd "))]
    assert ci_commands == commands


def test_quickstart_is_the_offline_smoke_run():
    assert quickstart_command() == "python do_acnet.py -a cfqkbnc -b acb --dataset synthetic --epochs 3"
    assert str(QUICKSTART_RUN) in section("Quickstart")


def test_quickstart_runs_as_written(quickstart_run):
    """train -> init/finish hdf5 -> convert -> finish_deploy.hdf5 -> test deploy -> summary, as promised."""
    for name in ("log.txt", "recipe.json", "init.hdf5", "finish.hdf5", "finish_deploy.hdf5", "summary.json"):
        assert (quickstart_run / name).is_file(), name
    summary = json.loads((quickstart_run / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert (summary["arch"], summary["block_type"], summary["dataset"], summary["epochs"]) == (
        "cfqkbnc", "acb", "synthetic", 3)
    assert summary["max_abs_logit_diff"] < 1e-3
    assert summary["params_deploy"] < summary["params_train"]
    recipe = json.loads((quickstart_run / "recipe.json").read_text())
    assert (recipe["dataset"], recipe["epochs"]) == ("synthetic", 3)  # the dataset used, not the arch's default
    with h5py.File(quickstart_run / "finish.hdf5", "r") as f:
        assert any("square_conv" in key for key in f)
    with h5py.File(quickstart_run / "finish_deploy.hdf5", "r") as f:
        assert not any("square_conv" in key or "running_var" in key for key in f)
    evals = [line for line in (quickstart_run / "log.txt").read_text().splitlines() if "top1=" in line]
    assert evals and "epoch 3 " in evals[-1]


def test_ci_runs_the_readme_commands_exactly():
    """CI must run README's install command, then README's test command, exactly as written."""
    (block,) = code_blocks(section("Install and test"), "bash")
    install, test = block.strip().splitlines()
    ci_lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert install in ci_lines and test in ci_lines
    assert ci_lines.index(install) < ci_lines.index(test)


def test_the_quickstart_duration_is_one_figure_everywhere():
    """README's quickstart section and do_acnet.py -h state the same duration (no "minute" elsewhere)."""
    assert len(readme_text().splitlines()) <= 350, "the README is a path: details go to docs/"
    quickstart = section("Quickstart")
    figures = set(re.findall(r"about (\d+ s)\b", quickstart))
    assert len(figures) == 1 and "minute" not in quickstart, figures
    (figure,) = figures
    assert f"~{figure} on CPU" in (REPO / "do_acnet.py").read_text()
