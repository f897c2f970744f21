"""The original RepVGG and MobileOne code, run as it is, and the block cases built from it.

The original repositories (DingXiaoH/RepVGG, apple/ml-mobileone) are not dependencies: this module finds
their code where a developer has it -- ``$ACNET_ORIGINALS_DIR/<repo>/<file>`` (a checkout, e.g.
``$ACNET_ORIGINALS_DIR/RepVGG/repvgg.py``), or a bare git mirror at
``$ACNET_ORIGINALS_DIR/<owner>+<repo>/repo`` or ``/work/.mirror/<owner>+<repo>/repo`` (read with
``git show HEAD:<file>``) -- copies the files into a temporary directory outside the repository and
imports them from there. :func:`original_module` returns None where the code is not present (the live
tests skip then); the committed files under ``tests/data/originals/`` were written by :func:`write_data`
from the same cases and make the load tests run on a plain clone:

    ACNET_ORIGINALS_DIR=/path/to/checkouts python tests/reparam_originals.py   # rewrites tests/data/originals/
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

DATA = Path(__file__).resolve().parent / "data" / "originals"

#: family -> (owner, repository, the files to copy, the module holding the block, the block class)
ORIGINALS = {
    "repvgg": ("DingXiaoH", "RepVGG", ("repvgg.py", "se_block.py"), "repvgg", "RepVGGBlock"),
    "mobileone": ("apple", "ml-mobileone", ("mobileone.py",), "mobileone", "MobileOneBlock"),
}

#: family -> case name -> the original block's constructor arguments (small: tiny committed files).
CASES: Dict[str, Dict[str, Dict[str, Any]]] = {
    "repvgg": {
        "3x3_8to8_s1": dict(in_channels=8, out_channels=8, kernel_size=3, stride=1, padding=1),
        "3x3_8to16_s2": dict(in_channels=8, out_channels=16, kernel_size=3, stride=2, padding=1),
        "3x3_dw8_s1": dict(in_channels=8, out_channels=8, kernel_size=3, stride=1, padding=1, groups=8),
        "3x3_8to8_g2_s1": dict(in_channels=8, out_channels=8, kernel_size=3, stride=1, padding=1, groups=2),
    },
    "mobileone": {
        "3x3_8to8_s1_k1": dict(in_channels=8, out_channels=8, kernel_size=3, stride=1, padding=1),
        "3x3_8to16_s2_k1": dict(in_channels=8, out_channels=16, kernel_size=3, stride=2, padding=1),
        "3x3_dw8_s1_k4": dict(in_channels=8, out_channels=8, kernel_size=3, stride=1, padding=1, groups=8,
                              num_conv_branches=4),
        "3x3_dw8_s2_k4": dict(in_channels=8, out_channels=8, kernel_size=3, stride=2, padding=1, groups=8,
                              num_conv_branches=4),
        "1x1_8to8_k4": dict(in_channels=8, out_channels=8, kernel_size=1, stride=1, padding=0,
                            num_conv_branches=4),
        "1x1_8to16_k1": dict(in_channels=8, out_channels=16, kernel_size=1, stride=1, padding=0),
    },
}
INPUT_SHAPE = (1, 8, 6, 5)


def _source_dirs(owner: str, repo: str) -> List[Tuple[str, Path]]:
    """Where the code may be: ``("checkout", dir)`` or ``("git", git_dir)``, in order."""
    places: List[Tuple[str, Path]] = []
    root = os.environ.get("ACNET_ORIGINALS_DIR")
    if root:
        places += [("checkout", Path(root) / repo), ("git", Path(root) / f"{owner}+{repo}" / "repo")]
    places.append(("git", Path("/work/.mirror") / f"{owner}+{repo}" / "repo"))
    return places


def _copy_original(owner: str, repo: str, files: Tuple[str, ...], target: Path) -> Optional[str]:
    """Copy ``files`` of the repository into ``target``; its commit (``"unknown"`` for a checkout
    without git), or None when the code is nowhere."""
    for kind, place in _source_dirs(owner, repo):
        if kind == "checkout" and all((place / f).is_file() for f in files):
            for f in files:
                shutil.copy(place / f, target / f)
            head = subprocess.run(["git", "-C", str(place), "rev-parse", "HEAD"], capture_output=True, text=True)
            return head.stdout.strip() if head.returncode == 0 else "unknown"
        if kind == "git" and place.is_dir() and shutil.which("git"):
            texts = []
            for f in files:
                shown = subprocess.run(["git", f"--git-dir={place}", "show", f"HEAD:{f}"], capture_output=True)
                if shown.returncode != 0:
                    break
                texts.append(shown.stdout)
            else:
                for f, text in zip(files, texts):
                    (target / f).write_bytes(text)
                head = subprocess.run(["git", f"--git-dir={place}", "rev-parse", "HEAD"], capture_output=True,
                                      text=True)
                return head.stdout.strip()
    return None


_LOADED: Dict[str, Optional[Tuple[ModuleType, str]]] = {}


def original_module(family: str) -> Optional[Tuple[ModuleType, str]]:
    """``(module, commit)`` of the family's original code, imported from a temporary copy; None when absent."""
    if family not in _LOADED:
        owner, repo, files, module_name, _ = ORIGINALS[family]
        target = Path(tempfile.mkdtemp(prefix=f"acnet-original-{family}-"))
        commit = _copy_original(owner, repo, files, target)
        if commit is None:
            _LOADED[family] = None
        else:
            name = f"_original_{family}_{module_name}"
            sys.path.insert(0, str(target))  # the original imports its sibling files (repvgg: se_block)
            try:
                spec = importlib.util.spec_from_file_location(name, target / f"{module_name}.py")
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
            finally:
                sys.path.remove(str(target))
            _LOADED[family] = (module, commit)
    return _LOADED[family]


@torch.no_grad()
def randomize_original_(block: nn.Module, seed: int) -> nn.Module:
    """Random conv weights, BN affine parameters and running statistics (float64), as after training."""
    gen = torch.Generator().manual_seed(seed)
    for name, tensor in block.state_dict(keep_vars=True).items():
        if not tensor.is_floating_point():
            continue
        noise = torch.rand(tensor.shape, generator=gen, dtype=torch.float64)
        if name.endswith("running_var"):
            tensor.copy_(0.5 + 1.5 * noise)
        elif name.endswith("running_mean") or name.endswith("bias"):
            tensor.copy_(noise - 0.5)
        elif tensor.dim() == 1:
            tensor.copy_(0.5 + noise)
        else:
            tensor.copy_((2 * noise - 1) * (3.0 / tensor[0].numel()) ** 0.5)
    return block


def original_block(family: str, case: str, seed: int = 0) -> nn.Module:
    """The original code's block of ``case`` (float64, random state), built quietly (RepVGG prints)."""
    loaded = original_module(family)
    if loaded is None:
        raise FileNotFoundError(f"the original {family} code is not present")
    cls = getattr(loaded[0], ORIGINALS[family][4])
    with contextlib.redirect_stdout(io.StringIO()):
        block = cls(**CASES[family][case])
    return randomize_original_(block.double(), seed)


def case_input(seed: int = 1) -> torch.Tensor:
    return torch.randn(INPUT_SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@torch.no_grad()
def record(family: str, case: str) -> Dict[str, Any]:
    """What the original block of ``case`` computes: its state dicts (training-time and deploy), the
    input, its outputs in training mode (batch statistics), eval mode and after its own fusion."""
    block = original_block(family, case, seed=sum(map(ord, case)))
    x = case_input()
    train_state = {k: v.clone() for k, v in block.state_dict().items()}
    import copy

    trained = copy.deepcopy(block).train()
    out_train = trained(x)
    block.eval()
    out_eval = block(x)
    with contextlib.redirect_stdout(io.StringIO()):
        (block.switch_to_deploy if family == "repvgg" else block.reparameterize)()
    out_deploy = block(x)
    return {"arguments": dict(CASES[family][case]), "state_dict": train_state,
            "deploy_state_dict": {k: v.clone() for k, v in block.state_dict().items()},
            "input": x, "output_train": out_train, "output_eval": out_eval, "output_deploy": out_deploy}


def write_data() -> None:
    """Rewrite ``tests/data/originals/<family>_blocks.pt`` and ``<family>_keys.json`` from the original code."""
    DATA.mkdir(parents=True, exist_ok=True)
    for family in ORIGINALS:
        loaded = original_module(family)
        if loaded is None:
            raise SystemExit(f"the original {family} code is not present (set ACNET_ORIGINALS_DIR)")
        records = {case: record(family, case) for case in CASES[family]}
        owner, repo = ORIGINALS[family][:2]
        torch.save({"repository": f"{owner}/{repo}", "commit": loaded[1], "cases": records},
                   DATA / f"{family}_blocks.pt")
        keys = {case: {"train": list(r["state_dict"]), "deploy": list(r["deploy_state_dict"])}
                for case, r in records.items()}
        (DATA / f"{family}_keys.json").write_text(json.dumps({"repository": f"{owner}/{repo}",
                                                              "commit": loaded[1], "cases": keys}, indent=1) + "\n")
        print(f"{family}: {len(records)} cases from {owner}/{repo}@{loaded[1]}")


if __name__ == "__main__":
    write_data()
