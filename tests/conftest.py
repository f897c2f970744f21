"""Shared pytest configuration."""
import os

import torch
from hypothesis import HealthCheck, settings

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
