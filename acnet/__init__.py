"""acnet: structural re-parameterization blocks (ACB, DBB) and their exact fusion into one conv.

Depends on torch only.
"""
from __future__ import annotations

__version__ = "0.1.0"
