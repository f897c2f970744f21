"""House rules of the source tree (issue 26), checked on the files as they are: no ``acnet/base.py``; no
private name imported across modules; no top-level helper defined in two modules of ``acnet/``; no
function-local first-party import in ``utils/`` without a comment saying why; the command-line entry
points parse without torch."""
from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Iterator, List

import pytest

REPO = Path(__file__).resolve().parents[1]
FIRST_PARTY = ("acnet", "constructor", "data", "utils", "train_configs")
SCRIPTS = ("do_acnet.py", "reproduce.py", "show_log.py", "display_hdf5.py", "kernel_skeleton.py", "robustness.py")


def source_files() -> Iterator[Path]:
    for package in FIRST_PARTY:
        yield from sorted((REPO / package).rglob("*.py"))
    yield from (REPO / s for s in SCRIPTS)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_module(path: Path, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module_name(path).split(".")
    if path.name != "__init__.py":
        base = base[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def is_first_party(module: str) -> bool:
    return module.split(".")[0] in FIRST_PARTY


def test_acnet_base_is_gone():
    assert not (REPO / "acnet" / "base.py").exists()


def test_no_private_name_is_imported_across_modules():
    found: List[str] = []
    for path in source_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                target = imported_module(path, node)
                if is_first_party(target) and target != module_name(path):
                    found += [f"{path.relative_to(REPO)}:{node.lineno} {target}.{a.name}" for a in node.names
                              if a.name.startswith("_") and not a.name.startswith("__")]
    assert not found


def test_no_helper_is_defined_in_two_acnet_modules():
    homes = defaultdict(list)
    for path in sorted((REPO / "acnet").glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name != "__getattr__":
                homes[node.name].append(path.name)
    assert not {name: where for name, where in homes.items() if len(where) > 1}


def test_function_local_first_party_imports_in_utils_say_why():
    found: List[str] = []
    for path in sorted((REPO / "utils").rglob("*.py")):
        lines = path.read_text().splitlines()
        for function in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if isinstance(node, ast.ImportFrom):
                    modules = [imported_module(path, node)]
                elif isinstance(node, ast.Import):
                    modules = [alias.name for alias in node.names]
                else:
                    continue
                here, above = lines[node.lineno - 1], lines[node.lineno - 2] if node.lineno > 1 else ""
                if any(map(is_first_party, modules)) and "#" not in here and not above.strip().startswith("#"):
                    found.append(f"{path.relative_to(REPO)}:{node.lineno} {here.strip()}")
    assert not found


@pytest.mark.parametrize("argv", [["do_acnet.py", "-h"], ["reproduce.py", "-h"],
                                  ["reproduce.py", "--archs", "cfqkbnc", "--blocks", "base", "acb", "--seeds", "0",
                                   "--dataset", "synthetic", "--output-dir", "OUT", "--dry-run"]])
def test_the_command_lines_parse_without_torch(argv, tmp_path):
    argv = [str(tmp_path) if a == "OUT" else a for a in argv]
    code = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = " + repr(argv) + "\n"
            "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
            "except SystemExit as exc:\n    sys.exit(exc.code)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() and not result.stderr
