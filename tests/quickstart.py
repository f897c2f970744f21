"""The README's quickstart, run as written: helpers to read the README and the docs/ pages and to produce
the quickstart's run directory once per test session (the "tiny real run" the tool and docs tests use,
fixture ``quickstart_run`` in conftest.py).
"""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"
QUICKSTART_RUN = Path("acnet_exps") / "cfqkbnc_acb_synthetic_train"
SCRIPTS = ("do_acnet.py", "show_log.py", "display_hdf5.py", "kernel_skeleton.py", "robustness.py")
#: The keys of a run's summary.json.
SUMMARY_KEYS = {"arch", "block_type", "dataset", "seed", "epochs", "world_size", "train_top1", "train_top5",
                "deploy_top1", "deploy_top5", "max_abs_logit_diff", "max_rel_logit_diff", "train_images_per_sec",
                "params_train", "params_deploy", "wall_seconds"}


def readme_text() -> str:
    return README.read_text(encoding="utf-8")


def pages() -> list:
    """README.md and every docs/*.md page."""
    return [README, *sorted(DOCS.glob("*.md"))]


def section(title_start: str, page: Path = README) -> str:
    """The text of ``page`` (README.md by default) from the heading starting with ``title_start`` to the
    next heading of its level."""
    text = page.read_text(encoding="utf-8")
    match = re.search(rf"^(#+) {re.escape(title_start)}.*$", text, flags=re.M)
    assert match, f"{page.name} has no section {title_start!r}"
    level = len(match.group(1))
    rest = text[match.end():]
    end = re.search(rf"^#{{1,{level}}} ", rest, flags=re.M)
    return rest[: end.start()] if end else rest


def code_blocks(text: str, language: str) -> list:
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.M | re.S)


def quickstart_command() -> str:
    """The first command of the Quickstart section's first bash block."""
    blocks = code_blocks(section("Quickstart"), "bash")
    assert blocks, "the Quickstart section has no ```bash block"
    return blocks[0].strip().splitlines()[0]


def run_command(command: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a README command line (``python`` = this interpreter) in ``cwd``."""
    argv = shlex.split(command)
    assert argv[0] == "python", command
    return subprocess.run([sys.executable, *argv[1:]], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def scratch_workdir(path: Path) -> Path:
    """A working directory with symlinks to the repository's scripts (outputs land in it)."""
    path.mkdir(parents=True, exist_ok=True)
    for script in SCRIPTS:
        link = path / script
        if not link.exists():
            link.symlink_to(REPO / script)
    return path


def quickstart_run_dir(tmp_path_factory) -> Path:
    """Run the README quickstart once per session (cached on disk in the session's base temp dir)."""
    workdir = scratch_workdir(tmp_path_factory.getbasetemp() / "readme_quickstart")
    run_dir = workdir / QUICKSTART_RUN
    if not (run_dir / "summary.json").is_file():
        result = run_command(quickstart_command(), workdir)
        assert result.returncode == 0, f"quickstart failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
        (workdir / QUICKSTART_OUTPUT).write_text(result.stdout + result.stderr, encoding="utf-8")
    return run_dir


#: What the quickstart command printed (stdout, then stderr), beside ``acnet_exps/`` in its working dir.
QUICKSTART_OUTPUT = "quickstart_stdout.txt"
