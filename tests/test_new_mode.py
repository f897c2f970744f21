"""A mode is declared once: one module and one ``register_mode`` line, and every tool has it.

The mode below is written as a module file at run time (no file of the project is edited) and
registered with one line: do_acnet.py parses its options, runs its checks (a refusal is one line,
status 2), builds its options object and runs it through its real entry point; ``-h`` lists it,
two modes at once are refused, and reproduce.py refuses it after ``--`` (it is not a training run).
"""
from __future__ import annotations

import json
import textwrap

import pytest

import do_acnet
import reproduce
from utils.command import Command
from utils.modes.cli import build_parser, parse_command
from utils.modes.registry import MODES, Mode, get_mode, register_mode, unregister_mode

#: The whole new mode: its option, arguments, checks, options object and runner, in one module.
MODE_MODULE = '''
"""``--count-params OUT``: the parameter counts of the model in training-time and deploy form, to OUT (json)."""
import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from utils.errors import UsageError
from utils.modes.registry import Mode


@dataclass(frozen=True)
class CountOptions:
    out: Path
    per_layer: bool


def add_arguments(groups):
    groups["tools"].add_argument("--count-params", metavar="OUT", help="write the parameter counts to OUT")
    groups["tools"].add_argument("--per-layer", action="store_true", help="with --count-params: per layer too")


def check_options(args: argparse.Namespace, selected: Mode) -> None:
    if args.per_layer and selected.name != "count":
        raise UsageError("--per-layer applies to --count-params OUT")


def check(args: argparse.Namespace) -> None:
    if not args.count_params.endswith(".json"):
        raise UsageError(f"--count-params: OUT must be a .json file, got {args.count_params!r}")


def options(args: argparse.Namespace) -> CountOptions:
    return CountOptions(Path(args.count_params), args.per_layer)


def run(cmd, ctx, run_start):
    import constructor  # torch: only when the mode runs

    counts = {}
    for form, deploy in (("train", False), ("deploy", True)):
        model = constructor.build_model(cmd.arch, cmd.block_type, deploy=deploy)
        counts[form] = sum(p.numel() for p in model.parameters())
        if cmd.options.per_layer:
            counts[form + "_layers"] = {name: p.numel() for name, p in model.named_parameters()}
    cmd.options.out.write_text(json.dumps({"arch": cmd.arch, "block_type": cmd.block_type, **counts}))
    print(f"{cmd.arch} / {cmd.block_type}: {counts['train']} training-time parameters, {counts['deploy']} deploy")


MODE = Mode("count", "--count-params", "count_params_mode:run", add_arguments, options, check, check_options,
            main_rank_only=True)
'''


@pytest.fixture
def count_mode(tmp_path, monkeypatch):
    (tmp_path / "count_params_mode.py").write_text(textwrap.dedent(MODE_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    import count_params_mode

    mode = register_mode(count_params_mode.MODE)  # the one line that adds the mode
    yield mode
    unregister_mode("count")


def test_a_registered_mode_runs_through_do_acnet(count_mode, tmp_path, capsys):
    out = tmp_path / "counts.json"
    do_acnet.main(["-a", "cfqkbnc", "-b", "acb", "--count-params", str(out)])
    counts = json.loads(out.read_text())
    assert counts["arch"] == "cfqkbnc" and counts["block_type"] == "acb"
    assert counts["train"] > counts["deploy"] > 0  # ACB's extra branches fold away
    assert f"cfqkbnc / acb: {counts['train']} training-time parameters, {counts['deploy']} deploy" \
        in capsys.readouterr().out

    mode, cmd = parse_command(["-a", "vc", "-b", "dbb", "--count-params", str(out), "--per-layer"])
    assert mode is get_mode("count") and isinstance(cmd, Command) and cmd.mode == "count"
    assert (cmd.options.out, cmd.options.per_layer) == (out, True)  # its own options, not Command fields


def test_a_registered_mode_is_listed_checked_and_refused_where_it_does_not_apply(count_mode, tmp_path, capsys):
    assert "--count-params OUT" in build_parser().format_help()
    for argv, message in [
        (["-a", "cfqkbnc", "--count-params", str(tmp_path / "c.txt")], "OUT must be a .json file"),
        (["-a", "cfqkbnc", "--per-layer"], "--per-layer applies to --count-params OUT"),
        (["-a", "cfqkbnc", "--count-params", "c.json", "--convert", "a", "b"],
         "--convert and --count-params are separate tools"),
    ]:
        with pytest.raises(SystemExit) as exc:
            do_acnet.main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 2 and message in err[1]  # the usage hint and one error line
    assert reproduce.main(["--archs", "cfqkbnc", "--blocks", "acb", "--seeds", "0", "--output-dir",
                           str(tmp_path), "--dry-run", "--", "--count-params", "c.json"]) == 2
    assert "count-params is set by the sweep, not after '--': use (training only)" in capsys.readouterr().err


def test_register_mode_refuses_a_taken_name_or_option(count_mode):
    with pytest.raises(ValueError, match="already registered"):
        register_mode(count_mode)
    with pytest.raises(ValueError, match="--eval-only is mode 'eval'"):
        register_mode(Mode("other", "--eval-only", "count_params_mode:run"))
    with pytest.raises(ValueError, match="'package.module:function'"):
        register_mode(Mode("other", "--other", "count_params_mode.run"))
    assert list(MODES)[-1] == "count"
