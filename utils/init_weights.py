"""Starting a run from existing weights (``do_acnet.py --init-weights FILE``).

Minimal version (the project's own formats: hdf5 or torch checkpoints of the training-time model of
the same arch and block type, read by ``acnet.load_state_dict_file``); loading is strict.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Optional

from torch import nn

__all__ = ["load_init_weights"]


def load_init_weights(model: nn.Module, path: str | os.PathLike, *, block_type: str, skip_classifier: bool = False,
                      logger: Optional[logging.Logger] = None) -> dict[str, Any]:
    """Load the training-time weights in ``path`` into ``model`` (strictly; ``acnet.WeightsError`` otherwise).

    ``skip_classifier``: leave the last ``nn.Linear`` as initialised (another class count).
    Returns ``{"path", "loaded", "skipped"}`` (tensor counts / names).
    """
    from acnet import WeightsError, load_state_dict_file
    from utils.evaluation import load_weights_strict

    state = dict(load_state_dict_file(path))
    skipped: list[str] = []
    if skip_classifier:
        linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
        if linears:
            prefix = f"{linears[-1]}." if linears[-1] else ""
            skipped = sorted(k for k in state if k.startswith(prefix) and k[len(prefix):] in ("weight", "bias"))
            for key in skipped:
                state[key] = model.state_dict()[key]
    try:
        load_weights_strict(model, state, f"The tensors of --init-weights {os.fspath(path)!r}")
    except WeightsError as exc:
        raise WeightsError(f"{exc} (--init-weights takes training-time weights of the same arch and block type "
                           f"{block_type!r}, e.g. a run's finish.hdf5)") from None
    if logger is not None:
        logger.info("initial weights: %d tensors from %s%s", len(state) - len(skipped), os.fspath(path),
                    f" (classifier {', '.join(skipped)} skipped)" if skipped else "")
    return {"path": os.fspath(path), "loaded": len(state) - len(skipped), "skipped": skipped}
