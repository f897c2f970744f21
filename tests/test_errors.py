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
