"""Shared pytest configuration."""
import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

from quickstart import quickstart_run_dir

# Two cores on CI: keep torch from oversubscribing them (pytest runs in one process).
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

settings.register_profile(
    "default",
    deadline=None,
    max_examples=25,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
settings.register_profile("thorough", deadline=None, max_examples=300)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory) -> Path:
    """The README quickstart's run directory, produced once per test session (tests/quickstart.py)."""
    return quickstart_run_dir(tmp_path_factory)
