"""Every user-facing error of the library derives from the one base class, so scripts catch it once."""
from __future__ import annotations

import pytest

import acnet
from acnet.errors import ACNetError
from acnet.fileio import UnwritablePathError


@pytest.mark.parametrize("cls", [acnet.WeightsError, acnet.ExportError, acnet.MissingExtraError, UnwritablePathError])
def test_library_errors_derive_from_the_base(cls):
    assert issubclass(cls, ACNetError)


def test_a_weights_error_is_caught_as_the_base(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not weights")
    with pytest.raises(ACNetError, match="notes.txt"):
        acnet.load_state_dict_file(path)


def test_framework_errors_derive_from_the_base():
    import display_hdf5
    import kernel_skeleton
    import reproduce
    import robustness
    from utils.rundir.checkpoint import CheckpointError
    from utils.engine.trainer import NonFiniteLossError, TrainingSetupError
    from utils.errors import USER_ERRORS, UsageError
    from utils.engine.posttrain import DeployMismatchError

    for cls in (UsageError, CheckpointError, NonFiniteLossError, TrainingSetupError, DeployMismatchError,
                display_hdf5.Hdf5InspectError, kernel_skeleton.SkeletonError, reproduce.SweepError,
                robustness.RobustnessError):
        assert issubclass(cls, ACNetError) and issubclass(cls, USER_ERRORS), cls
    assert issubclass(TrainingSetupError, UsageError)  # do_acnet reports it with the usage, status 2


def test_report_error_prints_one_argparse_style_line(capsys):
    from utils.errors import UsageError, exit_with_error, report_error

    assert report_error("tool.py", UsageError("--x must be >= 1, got 0")) == 2
    assert capsys.readouterr().err == "tool.py: error: --x must be >= 1, got 0\n"
    with pytest.raises(SystemExit) as info:
        exit_with_error("tool.py", "no such file", status=1)
    assert info.value.code == 1 and capsys.readouterr().err == "tool.py: error: no such file\n"
