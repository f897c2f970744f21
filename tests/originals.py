"""The original repositories' block classes, built from their own source when it is on this machine.

Where the code is looked for: ``$ACNET_ORIGINALS_DIR`` (default ``/work/.mirror``), holding either git
mirrors ``<owner>+<name>/repo`` (read at ``HEAD``) or checkouts ``<name>/``. Only the block classes are
taken from each file (the lines between two markers of the file), with the imports they need: none of
timm, huggingface_hub, mmcv. :func:`original_module` returns None when the code is not there (the live
tests skip), so a plain clone runs only the tests on the committed files under ``tests/data/originals``.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import types
from pathlib import Path
from typing import Dict, Optional, Tuple

#: family -> (owner/name, file, first line marker, end marker or None, commit the committed data came from)
SOURCES: Dict[str, Tuple[str, str, str, Optional[str], str]] = {
    "ecbsr": ("xindongzhang/ECBSR", "models/ecb.py", "class SeqConv3x3", "if __name__ == '__main__':",
              "c60b1d2712af4ed4a615c2b7afa3980222c44a31"),
    "replknet": ("DingXiaoH/RepLKNet-pytorch", "replknet.py", "def get_conv2d", "class ConvFFN",
                 "b76808ac2c763eaed6af9d286c6163c9345b4d5f"),
    "unireplknet": ("AILab-CVC/UniRepLKNet", "unireplknet.py", "def get_conv2d", "class UniRepLKNetBlock",
                    "b5677d8fb0e7b8af61eac39c1bf02727f5afc1d5"),
}
_HEADER = """import os, sys
import torch
import torch.nn as nn
import torch.nn.functional as F


def to_2tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x, x)


"""


def originals_dir() -> Path:
    return Path(os.environ.get("ACNET_ORIGINALS_DIR", "/work/.mirror"))


def original_source(family: str) -> Optional[str]:
    """The text of the family's file (git mirror or checkout), or None when it is not on this machine."""
    repo, path, _, _, _ = SOURCES[family]
    owner, name = repo.split("/")
    root = originals_dir()
    git_dir = root / f"{owner}+{name}" / "repo"
    if git_dir.is_dir():
        try:
            return subprocess.run(["git", f"--git-dir={git_dir}", "show", f"HEAD:{path}"], check=True,
                                  capture_output=True, text=True, timeout=60).stdout
        except (OSError, subprocess.SubprocessError):
            return None
    for candidate in (root / name / path, root / f"{owner}+{name}" / path):
        if candidate.is_file():
            return candidate.read_text()
    return None


def original_commit(family: str) -> Optional[str]:
    repo, _, _, _, _ = SOURCES[family]
    owner, name = repo.split("/")
    git_dir = originals_dir() / f"{owner}+{name}" / "repo"
    try:
        return subprocess.run(["git", f"--git-dir={git_dir}", "rev-parse", "HEAD"], check=True, capture_output=True,
                              text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def original_module(family: str) -> Optional[types.ModuleType]:
    """The family's block classes as a module (written to a temporary folder outside the repository and
    imported from there), or None when the original code is not on this machine."""
    text = original_source(family)
    if text is None:
        return None
    _, _, start, end, _ = SOURCES[family]
    first = text.index(start)
    last = text.index(end, first) if end is not None else len(text)
    folder = Path(tempfile.mkdtemp(prefix=f"acnet_original_{family}_"))
    module_path = folder / f"original_{family}.py"
    module_path.write_text(_HEADER + text[first:last])
    name = f"original_{family}"
    sys.path.insert(0, str(folder))
    try:
        sys.modules.pop(name, None)
        return __import__(name)
    finally:
        sys.path.remove(str(folder))


#: family -> the original's block class name.
CLASSES = {"ecbsr": "ECB", "unireplknet": "DilatedReparamBlock", "replknet": "ReparamLargeKernelConv"}


def randomise(block, seed: int) -> None:
    """Random values for every parameter and BN statistic (the originals start with identity BNs)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in block.state_dict(keep_vars=True).items():
            if name.endswith("mask") or name.endswith("num_batches_tracked"):
                continue
            values = torch.randn(tensor.shape, generator=gen) * 0.5
            if name.endswith("running_var"):
                values = values.abs() + 0.5
            tensor.copy_(values)


def original_record(family: str, options: dict, shape, seed: int) -> Optional[dict]:
    """An original block with random values, built by its own code: its training-time ``train_state``, a fixed
    ``input``, its training-mode output (``train_output``: batch statistics; ``train_state`` holds the
    statistics from before that step), eval-mode output (``eval_output``), and after the original's own
    fusion its ``deploy_state`` and ``deploy_output`` (ECBSR: ``rep_params()`` in PlainSR's ``Conv3X3``
    names, ``conv3x3`` + ``act``). None when the original code is not on this machine."""
    import copy

    import torch

    module = original_module(family)
    if module is None:
        return None
    torch.manual_seed(seed)
    block = getattr(module, CLASSES[family])(**options)
    randomise(block, seed)
    x = torch.randn(tuple(shape), generator=torch.Generator().manual_seed(100 + seed))
    record = {"family": family, "options": dict(options), "commit": original_commit(family), "input": x,
              "train_state": copy.deepcopy(block.state_dict())}
    with torch.no_grad():
        record["train_output"] = block.train()(x)
        block.load_state_dict(record["train_state"])  # the training step's statistics update undone
        record["eval_output"] = block.eval()(x)
        if family == "ecbsr":
            kernel, bias = block.rep_params()
            deploy = {"conv3x3.weight": kernel.clone(), "conv3x3.bias": bias.clone()}
            deploy.update({k: v.clone() for k, v in block.state_dict().items() if k.startswith("act.")})
            out = torch.nn.functional.conv2d(x, kernel, bias, padding=1)
            record["deploy_state"] = deploy
            record["deploy_output"] = block.act(out) if options.get("act_type", "prelu") != "linear" else out
        else:
            block.merge_dilated_branches() if family == "unireplknet" else block.merge_kernel()
            record["deploy_state"] = copy.deepcopy(block.state_dict())
            record["deploy_output"] = block(x)
    return record
