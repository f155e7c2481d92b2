"""Shared test setup: import the flat modules from the repository root, keep torch to the CI's two cores, run the
CUDA tests last, and make sure that no other test touches CUDA where a GPU is present."""
import os
import sys

# Busy-waiting OpenMP threads make tiny ops crawl when the two cores are shared with subprocesses
# (the DDP and kill/resume tests); must be set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: "cuda" in item.keywords)  # stable: the CPU tests keep their order, first


@pytest.fixture(autouse=True)
def cpu_tests_leave_cuda_alone(request):
    yield
    if "cuda" not in request.keywords:
        assert not torch.cuda.is_initialized(), f"{request.node.nodeid} touched CUDA: give it a CPU device"
