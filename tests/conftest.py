"""Shared test setup: import the flat modules from the repository root, keep torch to the CI's two cores, run the
CUDA tests last, and make sure that no other test touches CUDA, also where a GPU is present."""
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
HAS_CUDA = torch.cuda.is_available()  # read before the fake below


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: "cuda" in item.keywords)  # stable: the CPU tests keep their order, first


class CudaTouched(RuntimeError):
    pass


@pytest.fixture(scope="session", autouse=True)
def cuda_faked_where_there_is_none():
    """On a machine without a GPU, torch says there is one, and using it raises CudaTouched: a CPU test that lets
    torch.cuda.is_available() pick its device fails here as it would on a GPU machine, where it would move the
    test's tensors to the GPU."""
    if HAS_CUDA:
        yield
        return

    def touched(*args, **kwargs):
        raise CudaTouched("a CPU test touched CUDA: give it a CPU device (--device cpu, device='cpu')")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: True)
        patch.setattr(torch.cuda, "device_count", lambda: 1)
        patch.setattr(torch.cuda, "_lazy_init", touched)
        yield


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


@pytest.fixture(autouse=True)
def cpu_tests_leave_cuda_alone(request):
    yield
    if "cuda" not in request.keywords:
        assert not torch.cuda.is_initialized(), f"{request.node.nodeid} touched CUDA: give it a CPU device"
