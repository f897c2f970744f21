"""The files of an experiment directory and how each is written (always atomically) and read.

Layout of ``<output-dir>/<exp-name>/``::

    log.txt             human-readable log; evaluation lines carry ``top1=`` (parsed by show_log.py)
    recipe.json         the recipe in force + arch, block type, dataset, world size, torch version, command line
    init.hdf5           weights before training        (original hdf5 format, no ``module.`` prefix)
    finish.hdf5         weights after training
    finish_deploy.hdf5  deploy weights (every conv-BN unit folded into one conv with bias)
    latest.pth          resumable state, rewritten after every epoch
    summary.json        post-training results
    tensorboard/        TensorBoard event files
"""
from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from acnet.errors import ACNetError
from acnet.fileio import atomic_open, save_torch
from train_configs import Recipe
from utils.rundir.identity import ExperimentPaths

__all__ = ["CheckpointError", "ExperimentPaths", "save_json", "save_state", "load_state",
           "capture_rng_state", "restore_rng_state", "seed_everything", "finished_run_record", "read_finished_run"]

logger = logging.getLogger("do_acnet")


class CheckpointError(ACNetError, RuntimeError):
    """A resumable state that is missing, unreadable or from a different run."""


def save_json(obj: Any, path: str | os.PathLike) -> None:
    with atomic_open(path, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=False)
        fh.write("\n")


def save_state(state: Mapping[str, Any], path: str | os.PathLike) -> None:
    """``torch.save`` through a temporary file: a kill or a full disk at any moment leaves the previous
    state intact (a failed write: :class:`acnet.fileio.UnwritablePathError`, one line, no file left)."""
    save_torch(dict(state), path)


def load_state(path: str | os.PathLike) -> dict[str, Any]:
    """Load a resumable state (``weights_only``: a tampered file cannot run code)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no resumable state to continue from: {path} does not exist "
                              "(start the run with -c fs)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a truncated/corrupt zip or pickle
        size = path.stat().st_size
        detail = next((line.strip() for line in str(exc).splitlines() if line.strip()), "").split(". ")[0][:160]
        what = "an empty file" if size == 0 else f"{size} bytes; {type(exc).__name__}" + (f": {detail}" if detail else "")
        raise CheckpointError(f"the resumable state {path} is unreadable or corrupt ({what}; a copy cut short or a "
                              "disk error leaves such a file): it cannot be resumed; start the run over with a new "
                              "--exp-name, or delete it and run with -c fs") from None
    required = {"model", "optimizer", "schedule", "epoch", "iteration", "rng", "recipe", "world_size"}
    if not isinstance(state, dict) or not required <= set(state):
        found = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path} is not a resumable state written by do_acnet.py (found {found}); "
                              "delete it to restart the run with -c fs")
    return state


def capture_rng_state(device: torch.device) -> dict[str, Any]:
    """Every RNG the run draws from: torch (CPU and ``device`` when CUDA), numpy, Python."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": str(np_state[0]), "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": random.getstate(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: Mapping[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state((np_state["key"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def finished_run_record(paths: ExperimentPaths) -> dict[str, Any]:
    """What a finished run was trained with: its recipe.json, else its latest.pth's recipe, else ``{}``."""
    try:
        saved = json.loads(paths.recipe.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # no (readable) recipe.json
        try:
            saved = load_state(paths.state)["recipe"] if paths.state.is_file() else {}
        except CheckpointError:
            saved = {}
    return saved if isinstance(saved, dict) else {}


def read_finished_run(paths: ExperimentPaths) -> dict[str, Any]:
    """The last resumable state of a finished run (its recipe and timing), ``{}`` if unavailable."""
    if not paths.state.is_file():
        return {}
    try:
        state = load_state(paths.state)
        Recipe(**state["recipe"])
        return state
    except (CheckpointError, TypeError):
        logger.warning("could not read %s: the summary keeps this command's recipe and no timing", paths.state)
        return {}
