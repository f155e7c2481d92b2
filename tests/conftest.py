"""Shared test setup: import the flat modules from the repository root, keep torch to the CI's two cores, run the
CUDA tests last, and make sure that no other test uses CUDA, also where a GPU is present."""
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

# Where there is a GPU, this process sees it from here on, whatever the CPU tests below hide from their subprocesses
# (CUDA reads CUDA_VISIBLE_DEVICES once, when it starts).
torch.cuda.is_available()

import distributed  # noqa: E402


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: "cuda" in item.keywords)  # stable: the CPU tests keep their order, first


class CudaTouched(RuntimeError):
    pass


def cuda_allocations():
    """How many CUDA allocations this process has made (0 while CUDA is not initialised). torch itself may initialise
    CUDA from a CPU test where a GPU exists (Adam.step asks the current CUDA stream whether it is being captured),
    so the guard counts allocations: a CPU test must not put a tensor on the GPU."""
    if not torch.cuda.is_initialized():
        return 0
    return torch.cuda.memory_stats().get("allocation.all.allocated", 0)


@pytest.fixture(autouse=True)
def cpu_tests_leave_cuda_alone(request, monkeypatch):
    """A CPU test must choose its device. Where it would let the command lines' default choose (CUDA wherever there
    is a GPU), it fails at once, on every machine and with either torch build; where it puts a tensor on the GPU,
    it fails at its end. tests/test_guard.py shows both catches. The processes such a test starts see no GPU, so
    they run as on a machine without one."""
    if "cuda" in request.keywords:
        yield
        return

    def default_device():
        raise CudaTouched(f"{request.node.nodeid} left its device to the default (CUDA wherever there is a GPU): "
                          f"give it a CPU device (--device cpu, device='cpu')")
    monkeypatch.setattr(distributed, "default_device", default_device)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    before = cuda_allocations()
    yield
    assert cuda_allocations() == before, f"{request.node.nodeid} put tensors on the GPU: give it a CPU device"


@pytest.fixture
def kernel_settings_restored():
    """Puts back the global kernel settings that distributed.seed_and_configure changes for --deterministic."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
             torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled(),
             torch.backends.cuda.cudnn_sdp_enabled(), os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[2:4]
    torch.backends.cuda.enable_flash_sdp(saved[4])
    torch.backends.cuda.enable_mem_efficient_sdp(saved[5])
    torch.backends.cuda.enable_cudnn_sdp(saved[6])
    if saved[7] is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
