"""Write the original repositories' block state dicts and outputs used by ``tests/test_originals.py``.

Run from the repository root with the originals' code on this machine (see ``tests/originals.py``):
``PYTHONPATH=$PWD:$PWD/tests python tests/data/originals/make_originals.py``. Each ``<case>.pt`` is
:func:`originals.original_record` (state dicts, input, outputs in training / eval mode and after the
original's own fusion, the commit); ``<case>_keys.json`` lists the entry names of both state dicts.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from originals import original_record

HERE = Path(__file__).resolve().parent

#: case -> (family, the original class's constructor keywords, input shape)
CASES = {
    "ecb_4to4_prelu_idt": ("ecbsr", dict(inp_planes=4, out_planes=4, depth_multiplier=2.0, act_type="prelu",
                                         with_idt=True), (2, 4, 7, 6)),
    "ecb_3to8_linear": ("ecbsr", dict(inp_planes=3, out_planes=8, depth_multiplier=2.0, act_type="linear"),
                        (2, 3, 6, 7)),
    "dilated_k7_c4": ("unireplknet", dict(channels=4, kernel_size=7, deploy=False, attempt_use_lk_impl=False),
                      (2, 4, 9, 8)),
    "dilated_k9_c3": ("unireplknet", dict(channels=3, kernel_size=9, deploy=False, attempt_use_lk_impl=False),
                      (2, 3, 10, 11)),
    "replk_k7_s3_c4": ("replknet", dict(in_channels=4, out_channels=4, kernel_size=7, stride=1, groups=4,
                                        small_kernel=3), (2, 4, 9, 9)),
}


def main() -> None:
    for seed, (case, (family, options, shape)) in enumerate(CASES.items()):
        record = original_record(family, options, shape, seed)
        if record is None:
            raise SystemExit(f"the original {family} code is not on this machine (see tests/originals.py)")
        torch.save(record, HERE / f"{case}.pt")
        keys = {"train": list(record["train_state"]), "deploy": list(record["deploy_state"])}
        (HERE / f"{case}_keys.json").write_text(json.dumps(keys, indent=1) + "\n")
        print(case, "written", file=sys.stderr)


if __name__ == "__main__":
    main()
