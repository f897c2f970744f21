"""The README as a contract: its install/test commands, its offline quickstart command run exactly as
written (in a scratch directory holding a symlink to do_acnet.py, so outputs stay out of the
repository), its Python examples, and the tool commands it shows.

The quickstart's run directory (fixture ``quickstart_run``, tests/quickstart.py) is produced once per test
session and reused by the other tool tests.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import json
import re
import shlex
from pathlib import Path

import h5py
import pytest

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


def test_python_examples_run(quickstart_run, monkeypatch):
    """Every ```python block of the README runs, in order, from the quickstart's working directory."""
    blocks = code_blocks(readme_text(), "python")
    assert blocks
    monkeypatch.chdir(quickstart_run.parents[1])
    namespace: dict = {"__name__": "readme_example"}
    # the blocks whose printed output the README shows verbatim (the ```text block right after them)
    printed = {code: shown for code, shown in re.findall(r"^```python\n(.*?)^```\n\n```text\n(.*?)^```", "".join(
        section(title) for title in SHOWN_OUTPUT_SECTIONS), flags=re.M | re.S)}
    assert len(printed) >= 3
    for index, block in enumerate(blocks):
        output = io.StringIO()
        try:
            with contextlib.redirect_stdout(output):
                exec(compile(block, f"README.md python block {index + 1}", "exec"), namespace)
        except Exception as exc:  # name the block that broke
            pytest.fail(f"README python block {index + 1} failed: {type(exc).__name__}: {exc}\n{block}")
        if block in printed:
            assert output.getvalue() == printed[block], f"README python block {index + 1} printed other lines"


#: Sections whose python examples print exactly what the README shows after them.
SHOWN_OUTPUT_SECTIONS = ("On torchvision and timm models", "Detection, restoration, video and audio models")

TOOL_PATTERN = re.compile(r"^python (?:show_log|display_hdf5|kernel_skeleton|robustness)\.py\b.*$", re.M)


def test_tool_commands_of_the_quickstart_run(quickstart_run, monkeypatch, capsys):
    """The tool commands the README shows for the quickstart's run succeed on it as written (each
    script's ``main`` is called in-process with the command's arguments, from the run's working dir)."""
    commands = [m.group(0) for block in code_blocks(readme_text(), "bash") for m in TOOL_PATTERN.finditer(block)]
    # those about the quickstart's run alone (others also need a base run)
    commands = [c for c in commands
                if all(path.startswith(str(QUICKSTART_RUN)) for path in re.findall(r"acnet_exps/\S+", c))]
    assert len(commands) >= 4, commands
    monkeypatch.chdir(quickstart_run.parents[1])
    for command in commands:
        argv = shlex.split(command.split("#")[0])
        script = importlib.import_module(Path(argv[1]).stem)
        capsys.readouterr()
        assert script.main(argv[2:]) == 0, f"{command}\n{capsys.readouterr().err}"
        assert capsys.readouterr().out.strip(), command


def test_ci_runs_the_readme_commands_exactly():
    """CI must run README's install command, then README's test command, exactly as written."""
    (block,) = code_blocks(section("Install and test"), "bash")
    install, test = block.strip().splitlines()
    ci_lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert install in ci_lines and test in ci_lines
    assert ci_lines.index(install) < ci_lines.index(test)


def test_the_quickstart_duration_is_one_figure_everywhere():
    """README's quickstart section and do_acnet.py -h state the same duration (no "minute" elsewhere)."""
    quickstart = section("Quickstart")
    figures = set(re.findall(r"about (\d+ s)\b", quickstart))
    assert len(figures) == 1 and "minute" not in quickstart, figures
    (figure,) = figures
    assert f"~{figure} on CPU" in (REPO / "do_acnet.py").read_text()


def test_the_readme_examples_match_what_the_quickstart_writes(quickstart_run):
    """The example summary.json has the run's keys; the example log's deploy line has the run's format."""
    (example,) = code_blocks(section("Quickstart"), "json")
    assert set(json.loads(example)) == SUMMARY_KEYS == set(json.loads((quickstart_run / "summary.json").read_text()))

    def deploy_line_shape(text: str) -> str:
        (line,) = [line for line in text.splitlines() if "final deploy model" in line]
        return re.sub(r"\d[\d.e+-]*", "N", line.split(" ", 2)[2])
    example_log = code_blocks(section("Quickstart"), "text")[0]
    assert deploy_line_shape(example_log) == deploy_line_shape((quickstart_run / "log.txt").read_text())


def test_no_readme_command_writes_into_the_repositorys_docs():
    """Tracked files (docs/*.png) must not be overwritten by running the README's commands."""
    commands = [line for block in code_blocks(readme_text(), "bash") for line in block.splitlines()]
    writers = [c for c in commands if re.search(r"(?:-o|--output|--plot)\s+docs/", c)]
    assert not writers, writers
