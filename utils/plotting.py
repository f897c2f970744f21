"""matplotlib, an optional extra, imported in one place for every tool that draws."""
from __future__ import annotations

from typing import Any

from utils.errors import UsageError


def import_pyplot(what: str, alternative: str) -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend.

    Raises :class:`utils.errors.UsageError` with one actionable line (``"<what> needs matplotlib ... (<alternative>)"``)
    when matplotlib is not installed, so a tool can fail before it prints or writes anything.
    """
    try:
        import matplotlib
    except ImportError:
        raise UsageError(f"{what} needs matplotlib, which is not installed: pip install matplotlib "
                    f"({alternative})") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt
