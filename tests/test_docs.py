"""Every code block of README.md and docs/*.md is run or checked, as a user would meet it.

The classes of blocks (an HTML comment right before a block sets its class):

- ```python: saved as a file and run from a scratch folder holding a copy of the quickstart's run (with
  the repository on PYTHONPATH, as the docs tell); what it prints must be the ```text block after it.
- ```bash, no comment (or ``<!-- run: exit status N -->``): each command is run from such a folder and
  must end with status 0 (or N); the quickstart command is the session's quickstart run itself.
- ```bash after ``<!-- parse only: REASON -->`` (downloads, GPUs, several nodes, hours of training):
  ``bash -n`` accepts the block, every script it names exists and its argparse parser (and torchrun's)
  accepts the options; pip commands name extras that pyproject.toml declares.
- ```text right after a block: that block's output. Equal line for line, or, with ``...`` lines, its
  lines in order with others between; after ``<!-- numbers vary: WHY -->`` the numbers are masked (what
  depends on the machine: times, speeds, the last digits of trained weights).
- ```text after ``<!-- layout: ... -->``: every file or folder named at the start of a line exists.

Also: the tables generated from code (docs/tables.py) match it, the links between pages resolve, the
README's block table lists every registered block type, and no command writes into docs/.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import logging
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import pytest

from quickstart import DOCS, QUICKSTART_OUTPUT, QUICKSTART_RUN, README, REPO, pages, quickstart_command

FENCE = re.compile(r"^```(\S*)\n(.*?)^```\n", re.M | re.S)


@dataclass
class Block:
    page: Path
    line: int
    language: str
    body: str
    marker: str  # the HTML comment right before it ("" if none)
    output: Optional["Block"] = None  # the ```text block right after it
    is_output: bool = False

    def __str__(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line} ({self.language})"


def blocks_of(page: Path) -> List[Block]:
    text = page.read_text(encoding="utf-8")
    blocks: List[Block] = []
    end = 0
    for match in FENCE.finditer(text):
        between = text[end:match.start()]
        comments = re.findall(r"<!--\s*(.*?)\s*-->", between, re.S)
        marker = comments[-1] if comments and between.rstrip().endswith("-->") else ""
        block = Block(page, text.count("\n", 0, match.start()) + 1, match.group(1), match.group(2), marker)
        if (blocks and block.language == "text" and not blocks[-1].is_output and blocks[-1].language != "text"
                and re.fullmatch(r"\s*(<!--.*?-->\s*)?", between, re.S)):
            blocks[-1].output = block
            block.is_output = True
        blocks.append(block)
        end = match.end()
    return blocks


ALL_BLOCKS = [block for page in pages() for block in blocks_of(page)]


def kind(block: Block) -> str:
    if block.language == "python":
        return "python"
    if block.language == "bash":
        return "parse" if block.marker.startswith("parse only:") else "run"
    if block.language == "text" and block.is_output:
        return "output"
    if block.language == "text" and block.marker.startswith("layout:"):
        return "layout"
    return "unknown"


def of_kind(name: str) -> List[Block]:
    return [block for block in ALL_BLOCKS if kind(block) == name]


# ------------------------------------------------------------------------------------- comparing output
NUMBER = re.compile(r"^[+-]?(\d[\d,]*\.?\d*|\.\d+)(e[+-]?\d+)?[%xM]?$")
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ", re.M)


#: Numbers named by these keys (``top1=47.6562``, ``acc1 100.0000``) are compared even where numbers vary:
#: a seeded run's accuracies, learning rate, step and parameter counts do not depend on the machine.
EXACT_KEYS = {"top1", "top5", "acc1", "acc5", "train_acc1", "train_acc5", "lr", "epoch", "iter", "params", "->"}


def _tokens(line: str, mask_numbers: bool) -> List[str]:
    line = TIMESTAMP.sub("TIME ", line)
    tokens = [t for t in re.split(r"(\s+|[=(),;:|]+)", line.strip()) if t and not t.isspace()]
    words = [t for t in tokens if not re.fullmatch(r"[=(),;:|]+", t)]
    keys = dict(zip(range(len(words)), [""] + words[:-1]))
    masked, index = [], 0
    for token in tokens:
        if not re.fullmatch(r"[=(),;:|]+", token):
            if mask_numbers and NUMBER.match(token) and keys[index] not in EXACT_KEYS:
                token = "N"
            index += 1
        masked.append(token)
    return masked


def shows(shown: str, printed: str, mask_numbers: bool) -> Optional[str]:
    """None if ``printed`` is what ``shown`` says, else why not. ``...`` lines in ``shown`` skip lines."""
    want = [_tokens(line, mask_numbers) for line in shown.strip("\n").splitlines()]
    got = [_tokens(line, mask_numbers) for line in printed.strip("\n").splitlines()]
    if ["..."] not in want:
        if want == got:
            return None
        for index, (w, g) in enumerate(zip(want, got)):
            if w != g:
                return f"line {index + 1} differs:\n  shown:   {' '.join(w)}\n  printed: {' '.join(g)}"
        return f"{len(want)} lines shown, {len(got)} printed"
    position = 0
    for line in want:
        if line == ["..."]:
            continue
        while position < len(got) and got[position] != line:
            position += 1
        if position == len(got):
            return f"not printed (in this order): {' '.join(line)}"
        position += 1
    return None


def check_output(block: Block, printed: str) -> None:
    if block.output is None:
        return
    why = shows(block.output.body, printed, mask_numbers=block.output.marker.startswith("numbers vary:"))
    assert why is None, f"{block.output} is not what {block} prints: {why}\n--- printed:\n{printed}"


# ------------------------------------------------------------------------------------- the folders
def page_workdir(tmp_path: Path, quickstart_run: Path, page: Path) -> Path:
    """A folder like the one a user ran the quickstart in: ``acnet_exps/`` with a copy of its run."""
    workdir = tmp_path / page.stem
    if not workdir.exists():
        shutil.copytree(quickstart_run, workdir / QUICKSTART_RUN)
        shutil.copy(quickstart_run.parents[1] / QUICKSTART_OUTPUT, workdir / QUICKSTART_OUTPUT)
    return workdir


def commands(body: str) -> List[str]:
    """The command lines of a bash block: continuation lines joined, comment lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", body)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def argv_of(command: str) -> List[str]:
    return shlex.split(command, comments=True)


class Parsed(BaseException):
    """Raised by the patched argparse once a script's command line is parsed: nothing runs."""


@contextlib.contextmanager
def parse_only():
    """The first top-level ``parse_args`` / ``parse_known_args`` of any parser parses, then stops the script."""
    original_parse_args, original_known = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args
    depth = [0]

    def parse_args(self, *args, **kwargs):
        depth[0] += 1
        try:
            namespace = original_parse_args(self, *args, **kwargs)
        finally:
            depth[0] -= 1
        raise Parsed(namespace)

    def parse_known_args(self, *args, **kwargs):
        if depth[0]:
            return original_known(self, *args, **kwargs)
        depth[0] += 1
        try:
            namespace, _ = original_known(self, *args, **kwargs)
        finally:
            depth[0] -= 1
        raise Parsed(namespace)

    argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args = parse_args, parse_known_args
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args = original_parse_args, original_known


def run_script(path: Path, args: List[str], cwd: Path, parse: bool = False):
    """Run a repository script in this process as ``python path args`` from ``cwd``: (status, stdout+stderr).
    With ``parse``: only its command line is parsed (status 0 when argparse accepts it)."""
    out = io.StringIO()
    saved_argv, saved_cwd = sys.argv, os.getcwd()
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    root.handlers = []  # the script's logging.basicConfig writes to its stdout, as in a terminal
    status = 0
    try:
        os.chdir(cwd)
        sys.argv = [str(path), *args]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out), \
                (parse_only() if parse else contextlib.nullcontext()):
            runpy.run_path(str(path), run_name="__main__")
    except Parsed:
        pass
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers, root.level = saved_handlers, saved_level
        sys.argv = saved_argv
        os.chdir(saved_cwd)
    return status, out.getvalue()


# ------------------------------------------------------------------------------------- tests
def test_every_block_has_a_class():
    unknown = [str(block) for block in ALL_BLOCKS if kind(block) == "unknown"]
    assert not unknown, f"blocks that are neither run, parsed, an output nor a layout: {unknown}"
    assert of_kind("python") and of_kind("run") and of_kind("parse") and of_kind("output")
    for block in of_kind("python"):  # printed decimals come from a seeded run
        if block.output and re.search(r"\d\.\d", block.output.body):
            assert "manual_seed(" in block.body, f"{block} prints numbers but sets no seed"
    for block in of_kind("parse"):  # a reason, and one a user accepts for not running it here
        assert re.search(r"download|GPU|node|hours|minutes|runs|needs|installs", block.marker), str(block)


def test_python_blocks_run_as_files_and_print_what_is_shown(quickstart_run, tmp_path):
    """One interpreter runs every python block as a file saved in a scratch folder (runpy, cwd = that
    folder, the repository on PYTHONPATH as the docs say), one block after the other."""
    jobs = []
    for index, block in enumerate(of_kind("python")):
        workdir = page_workdir(tmp_path, quickstart_run, block.page)
        path = workdir / f"example_{index}.py"
        path.write_text(block.body, encoding="utf-8")
        jobs.append((str(workdir), str(path)))
    driver = (
        "import contextlib, io, json, os, runpy, sys, traceback\n"
        "results = []\n"
        "for workdir, path in json.loads(sys.argv[1]):\n"
        "    os.chdir(workdir)\n"
        "    out = io.StringIO()\n"
        "    try:\n"
        "        with contextlib.redirect_stdout(out):\n"
        "            runpy.run_path(path, run_name='__main__')\n"
        "        results.append([out.getvalue(), None])\n"
        "    except BaseException:\n"
        "        results.append([out.getvalue(), traceback.format_exc()])\n"
        "print(json.dumps(results))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", driver, json.dumps(jobs)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads(result.stdout.strip().splitlines()[-1])
    for block, (printed, error) in zip(of_kind("python"), results):
        assert error is None, f"{block} failed:\n{error}\n{block.body}"
        check_output(block, printed)


def test_bash_blocks_run(quickstart_run, tmp_path):
    """Each command of a run block, from the page's scratch folder, in this process (``python X.py`` runs
    X.py as __main__ with its arguments); the quickstart command is the session's quickstart run."""
    ran = 0
    for block in of_kind("run"):
        workdir = page_workdir(tmp_path, quickstart_run, block.page)
        expected = int(re.search(r"exit status (\d+)", block.marker).group(1)) if "exit status" in block.marker else 0
        printed = ""
        for command in commands(block.body):
            if command == quickstart_command():
                printed += (workdir / QUICKSTART_OUTPUT).read_text(encoding="utf-8")
                continue
            argv = argv_of(command)
            assert argv[0] == "python" and (REPO / argv[1]).is_file(), f"{block}: not a script of the repository: {command}"
            status, output = run_script(REPO / argv[1], argv[2:], workdir)
            assert status == expected, f"{block}: {command}\nexit status {status}, expected {expected}\n{output[-3000:]}"
            assert output.strip(), f"{block}: {command} printed nothing"
            printed += output
            ran += 1
        check_output(block, printed)
    assert ran >= 8


#: Example values of the shell variables that parse-only blocks use.
EXAMPLE_ENV = {"NODE_RANK": "0", "SLURM_JOB_NODELIST": "node[0-1]", "SLURM_NNODES": "2", "SLURM_NODEID": "0",
               "SLURM_JOB_ID": "4711", "head": "node0"}


def parse_command(command: str, block: Block) -> None:
    comment = command.partition(" #")[2]
    argv = argv_of(_expand(command))
    if argv[0] == "srun":
        argv = argv[1:]
    if argv[:2] == ["pip", "install"]:
        extras = declared_extras()
        for arg in argv[2:]:
            named = re.fullmatch(r"\.(?:\[(.*)\])?", arg)
            if named and named.group(1):
                assert set(named.group(1).split(",")) <= extras, f"{block}: unknown extra in {command}"
        return
    if argv[0] == "ln":
        assert argv[1] == "-s" and len(argv) == 4, f"{block}: {command}"
        return
    if argv[0] == "torchrun" or argv[:3] == ["python", "-m", "torch.distributed.launch"]:
        from torch.distributed.run import get_args_parser

        launcher = get_args_parser().parse_args(argv[1:] if argv[0] == "torchrun" else argv[3:])
        argv = ["python", launcher.training_script, *launcher.training_script_args]
    assert argv[0] == "python", f"{block}: cannot parse {command}"
    if argv[1] == "-m":  # python -m MODULE: the module exists (pytest -n: with pytest-xdist)
        assert importlib.util.find_spec(argv[2]), f"{block}: no module {argv[2]}"
        assert "-n" not in argv or importlib.util.find_spec("xdist"), f"{block}: -n needs pytest-xdist"
        return
    if "repository" in comment and not (REPO / argv[1]).exists():  # another project's script, said so
        return
    assert (REPO / argv[1]).is_file(), f"{block}: no script {argv[1]}"
    status, output = run_script(REPO / argv[1], argv[2:], REPO, parse=True)
    assert status == 0, f"{block}: {command}\n{output[-2000:]}"


def declared_extras() -> set:
    """The optional-dependency groups of pyproject.toml."""
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    try:
        import tomllib
    except ImportError:  # Python < 3.11: the section's "name = [" lines
        section = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
        return set(re.findall(r"^(\w[\w-]*)\s*=", section, flags=re.M))
    return set(tomllib.loads(text)["project"]["optional-dependencies"])


def _expand(command: str) -> str:
    return re.sub(r"\$(\w+)", lambda m: EXAMPLE_ENV.get(m.group(1), m.group(0)), command)


def test_parse_only_blocks_parse():
    for block in of_kind("parse"):
        syntax = subprocess.run(["bash", "-n"], input=block.body, capture_output=True, text=True)
        assert syntax.returncode == 0, f"{block}: {syntax.stderr}"
        lines = commands(block.body)
        assert lines, str(block)
        for command in lines:
            if re.match(r"\w+=\$\(", command):  # a shell assignment (bash -n checked it)
                continue
            parse_command(command, block)


def test_parse_only_refuses_a_wrong_option():
    """The parse check can fail: an option do_acnet.py does not have, a script that does not exist."""
    block = of_kind("parse")[0]
    with pytest.raises(AssertionError, match="unrecognized arguments: --no-such-option"):
        parse_command("python do_acnet.py -a src56 -b acb --no-such-option 3", block)
    with pytest.raises(AssertionError, match="no script"):
        parse_command("python no_such_script.py -a src56", block)


def test_output_comparison_can_fail():
    assert shows("a 1\n...\nc 3", "a 1\nb 2\nc 3", mask_numbers=False) is None
    assert shows("a 1\nc 3", "a 1\nc 4", mask_numbers=False) is not None
    assert shows("a 1\nc 3", "a 1\nc 4", mask_numbers=True) is None
    assert shows("a 1\nc 3", "a 1\nd 4", mask_numbers=True) is not None


def test_layout_blocks_name_existing_paths():
    for block in of_kind("layout"):
        names = [name for line in block.body.splitlines() if line and not line[0].isspace()
                 for name in re.findall(r"^(\S+(?:  \S+\.py)*)", line)[0].split()]
        missing = [name for name in names if not (REPO / name.rstrip("/")).exists()]
        assert not missing, f"{block}: {missing}"


def test_generated_tables_match_the_code():
    sys.path.insert(0, str(DOCS))
    try:
        tables = __import__("tables")
    finally:
        sys.path.remove(str(DOCS))
    found = tables.copies()
    assert {name for _, name, _ in found} == set(tables.TABLES)
    for page, name, copy in found:
        assert copy == tables.TABLES[name]() + "\n", f"{page.name}: table {name} differs from the code; run python docs/tables.py --write"


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_between_pages_resolve():
    for page in pages():
        text = page.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"https?://", target):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            assert linked.exists(), f"{page.name}: broken link {target}"
            if anchor:
                headings = re.findall(r"^#+ (.*)$", linked.read_text(encoding="utf-8"), flags=re.M)
                assert anchor in {_anchor(h) for h in headings}, f"{page.name}: no heading for {target}"
    linked_pages = set(re.findall(r"\(docs/([\w-]+\.md)\)", README.read_text(encoding="utf-8")))
    assert linked_pages == {p.name for p in DOCS.glob("*.md")}, "the README links every docs page"


def test_readme_block_table_lists_every_block_type():
    from acnet.registry import block_type_names

    table = re.search(r"^## Block types\n(.*?)^## ", README.read_text(encoding="utf-8"), re.M | re.S).group(1)
    rows = re.findall(r"^\| `(\w+)` \|", table, flags=re.M)
    assert sorted(rows) == sorted(block_type_names())


def test_no_command_writes_into_docs():
    """Tracked files (docs/*.png) must not be overwritten by running the docs' commands."""
    lines = [line for block in ALL_BLOCKS if block.language == "bash" for line in commands(block.body)]
    writers = [c for c in lines if re.search(r"(?:-o|--output|--plot)\s+docs/", c)]
    assert not writers, writers
