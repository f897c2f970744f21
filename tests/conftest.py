"""Shared pytest configuration."""
import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

from quickstart import quickstart_run_dir

# Two cores on CI: keep torch from oversubscribing them. Under pytest-xdist (README's `-n auto`) the cores
# are shared by the workers, so each worker, and every process its tests spawn, gets its share of them.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_THREADS = max(1, min(2, (os.cpu_count() or 1) // _WORKERS))
torch.set_num_threads(_THREADS)
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))

settings.register_profile(
    "default",
    deadline=None,
    max_examples=25,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
settings.register_profile("thorough", deadline=None, max_examples=300)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


#: Test modules that train models, run sweeps or spawn processes as a whole: marked ``slow``, so that
#: ``python -m pytest -m "not slow"`` is a quick tier (``python -m pytest`` still runs everything).
#: Single slow tests elsewhere carry ``@pytest.mark.slow`` themselves.
SLOW_MODULES = frozenset({"test_benchmarks", "test_block_sweep", "test_cli", "test_export", "test_multinode",
                          "test_plugin_defaults", "test_quant", "test_readme", "test_reproduce", "test_save_errors",
                          "test_zoo", "test_run_lock", "test_fault_injection", "test_docs",
                          "test_plugin_families"})


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if item.module.__name__.rpartition(".")[2] in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def single_torch_thread():
    """One intra-op thread for the test (``pytestmark = pytest.mark.usefixtures("single_torch_thread")``):
    tiny models or batch 2 run as fast on one idle core and avoid the many-fold slowdown of two spinning
    threads on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory) -> Path:
    """The README quickstart's run directory, produced once per test session (tests/quickstart.py)."""
    return quickstart_run_dir(tmp_path_factory)
