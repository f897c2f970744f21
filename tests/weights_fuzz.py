"""Fuzz ``acnet.load_state_dict_file`` (run by test_weights.py in a subprocess with a timeout, since
a reader bug on arbitrary bytes could crash or hang the interpreter): random bytes, truncations and
byte flips of real torch (zip and legacy) and hdf5 files. Every file must either load as a state
dict of tensors or raise ``WeightsError`` naming the file; any other exception fails.

Usage: ``python tests/weights_fuzz.py WORKDIR [MAX_EXAMPLES]``; prints ``ok N`` at the end.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from acnet import WeightsError, load_state_dict_file, save_hdf5

WORK = Path(sys.argv[1])
MAX_EXAMPLES = int(sys.argv[2]) if len(sys.argv) > 2 else 150


def _real_files() -> dict[str, bytes]:
    state = {"conv.weight": torch.randn(4, 3, 3, 3), "bn.running_mean": torch.zeros(4),
             "bn.num_batches_tracked": torch.tensor(3)}
    torch.save(state, WORK / "zip.pth")
    torch.save({"state_dict": state, "epoch": 1}, WORK / "legacy.pth", _use_new_zipfile_serialization=False)
    save_hdf5(state, WORK / "real.hdf5")
    return {name: (WORK / name).read_bytes() for name in ("zip.pth", "legacy.pth", "real.hdf5")}


REAL = _real_files()
counter = {"n": 0}


def check(content: bytes, suffix: str) -> None:
    counter["n"] += 1
    path = WORK / f"case{suffix}"
    path.write_bytes(content)
    try:
        state = load_state_dict_file(path)
    except WeightsError as exc:
        message = str(exc)
        assert str(path) in message and "\n" not in message, message
        return
    assert state and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())


@settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(st.binary(max_size=2048), st.sampled_from([".pth", ".hdf5", ".bin"]))
def fuzz_random_bytes(content: bytes, suffix: str) -> None:
    check(content, suffix)


@settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(sorted(REAL)), st.floats(0, 1), st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)),
                                                                  max_size=4))
def fuzz_damaged_real_files(name: str, keep: float, flips: list) -> None:
    content = bytearray(REAL[name][: int(len(REAL[name]) * keep)])
    for where, value in flips:
        if content:
            content[min(int(where * len(content)), len(content) - 1)] = value
    check(bytes(content), Path(name).suffix)


if __name__ == "__main__":
    fuzz_random_bytes()
    fuzz_damaged_real_files()
    print(f"ok {counter['n']}")
