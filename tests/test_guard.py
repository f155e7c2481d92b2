"""The guard of tests/conftest.py, which keeps the CPU tests off the GPU on every machine and with either torch build
(the CPU wheel, or the default CUDA-enabled one on a machine without a GPU): two CPU tests that break the rule are run
in a pytest of their own, with the suite's conftest, and must both fail with the guard's message."""
import os
import subprocess
import sys

CONFTEST_DIR = os.path.dirname(os.path.abspath(__file__))

OFFENDERS = '''
import torch
import predict


def test_leaves_its_device_to_the_default():
    predict.pick_device(None)  # what predict() does when no device is given


def test_puts_a_tensor_on_the_gpu():
    torch.zeros(1).to("cuda")
'''


def test_cpu_tests_that_would_use_a_gpu_fail_on_any_machine(tmp_path):
    """The first offender fails at once everywhere (the default device is refused). The second fails on a machine
    without a GPU because torch cannot reach one (the CPU build: "not compiled with CUDA"; the CUDA build: no driver
    or no device), and on a GPU machine at the test's end, when the guard finds a CUDA allocation."""
    (tmp_path / "test_offenders.py").write_text(OFFENDERS)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([CONFTEST_DIR, os.path.dirname(CONFTEST_DIR)]))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider",
                          "test_offenders.py"], cwd=tmp_path, env=env, capture_output=True, text=True)
    out = run.stdout + run.stderr
    assert run.returncode == 1, out
    assert "FAILED test_offenders.py::test_leaves_its_device_to_the_default" in out, out
    assert "CudaTouched: test_offenders.py::test_leaves_its_device_to_the_default left its device to the default" \
        in out, out
    caught_on_a_gpu = "ERROR test_offenders.py::test_puts_a_tensor_on_the_gpu" in out and \
        "test_offenders.py::test_puts_a_tensor_on_the_gpu put tensors on the GPU" in out
    no_gpu = ("Torch not compiled with CUDA enabled", "Found no NVIDIA driver", "No CUDA GPUs are available",
              "CUDA driver version is insufficient")
    failed_without_one = "FAILED test_offenders.py::test_puts_a_tensor_on_the_gpu" in out and any(
        m in out for m in no_gpu)
    assert caught_on_a_gpu or failed_without_one, out


def test_subprocesses_of_cpu_tests_see_no_gpu():
    """A process a CPU test starts runs as on a machine without a GPU, whatever the machine has."""
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""
    child = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
                           capture_output=True, text=True, check=True)
    assert child.stdout.strip() == "0"
