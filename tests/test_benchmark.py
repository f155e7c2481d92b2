"""tools/benchmark.py's plumbing on the CPU, so that it works on a GPU machine: the GPU check end to end on a tiny
backbone (its CUDA tests skip, its torchrun run is killed and resumed, its table is filled, full logs kept), a rerun
of what failed, failed tests named with their first error line, its worker processes' environment, the
activation-memory, BatchNorm and host-wait counts, and the table writing."""
import json
import os
import re
import sys

import pytest

from errors import UserError
from tools import benchmark


def gpu_check(folder, *extra):
    return benchmark.main(["--gpu-check", "--device", "cpu", "--backbone", "tiny-ViT", "--input-size", "64", "--steps",
                           "1", "--warmup", "0", "--out", str(folder / "check.md"), "--budget", "400",
                           "--eval-samples", "4", *extra])


def test_gpu_check_plumbing_on_the_cpu(tmp_path):
    gpu_check(tmp_path)
    text = (tmp_path / "check.md").read_text()
    parts = [text.index(s) for s in ("\n- `pytest tests/test_cuda.py`", "\n- `torchrun --nproc_per_node 1 train.py",
                                     "| step-fp32 |", "| step-bf16 |", "\n- authors: skipped")]
    assert parts == sorted(parts)  # in order: CUDA tests, torchrun run, step table, authors
    tests = text[parts[0]:parts[1]]
    # a check on the CPU hides the GPUs from the CUDA tests, also on a machine that has one
    assert re.search(r": ok, \d+ skipped in \d+ s; full log tests.log\n  - skipped: no CUDA device here$", tests), tests
    assert re.search(r"  ok: killed at step \d+ of 16, resumed, exit 0, steps at the end of each epoch \[8, 16\]",
                     text[parts[1]:parts[2]])
    rows = [line.split("|")[2:-1] for line in text[parts[2]:parts[4]].splitlines() if line.startswith("| step-")]
    assert [r[:6] for r in rows] == [[" tiny-ViT ", " 2 ", " off ", " on ", " False ", " - "],
                                     [" tiny-ViT ", " 2 ", " bf16 ", " on ", " False ", " - "]], rows
    assert all(float(r[6]) > 0 and float(r[7]) > 0 and r[8].strip() == "-" and float(r[9]) > 0 for r in rows), rows
    assert float(rows[0][10]) > 0 and rows[1][10] == " - "  # the eval loop is measured with the first configuration
    assert "parts not ok: none)" in text
    status = json.loads((tmp_path / "gpu_check_status.json").read_text())
    assert {k: v["status"] for k, v in status.items()} == {"tests": "ok", "resume": "ok", "step-fp32": "ok",
                                                           "step-bf16": "ok", "authors": "not asked"}
    for name in ("tests", "resume", "step-fp32", "step-bf16"):  # the full logs
        assert (tmp_path / "logs" / f"{name}.log").stat().st_size > 0
    assert "no CUDA device here" in (tmp_path / "logs" / "tests.log").read_text()
    assert '{"train_img_s"' in (tmp_path / "logs" / "step-fp32.log").read_text()


def test_a_rerun_of_the_gpu_check_runs_what_failed(tmp_path):
    """Two rows fail (tiny-ViT's patches are 8 px: 60 px is refused) and name their error; `--parts failed` then
    runs those two rows again, and nothing else."""
    gpu_check(tmp_path, "--parts", "step-fp32,step-bf16", "--input-size", "60")
    text = (tmp_path / "check.md").read_text()
    assert text.count("| failed: ") == 2 and "multiple" in text and "parts not ok: step-fp32, step-bf16)" in text
    gpu_check(tmp_path, "--parts", "failed")
    rerun = (tmp_path / "check.md").read_text()[len(text):]
    assert "; parts: step-fp32, step-bf16\n" in rerun and "parts not ok: none)" in rerun
    status = json.loads((tmp_path / "gpu_check_status.json").read_text())
    assert {k: v["status"] for k, v in status.items()} == {"step-fp32": "ok", "step-bf16": "ok"}


FAILING_TESTS = """
import pytest

@pytest.fixture
def broken():
    raise OSError("no such device")

def test_ok():
    assert 1 + 1 == 2

@pytest.mark.parametrize("case", ["nan loss", "overflow"])
def test_close(case):
    assert case == "overflow", f"{case}: off by 0.5\\nsecond line"

def test_setup(broken):
    pass

@pytest.mark.skip(reason="no CUDA device here")
def test_skipped():
    pass
"""


def test_failed_tests_are_named_with_their_first_error_line(tmp_path):
    """From pytest's junit XML, and from its -v lines when pytest was killed before writing it."""
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_x.py").write_text(FAILING_TESTS)
    log, xml_file = tmp_path / "tests.log", tmp_path / "tests.xml"
    code = benchmark.logged_run([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider",
                                 f"--junitxml={xml_file}", "tests/test_x.py"], str(log), 120, cwd=tmp_path)
    assert code == 1
    outcomes = benchmark.test_outcomes(str(xml_file), str(log))
    assert outcomes == {"tests/test_x.py::test_ok": ("passed", ""),
                        "tests/test_x.py::test_close[nan loss]": ("failed", "AssertionError: nan loss: off by 0.5"),
                        "tests/test_x.py::test_close[overflow]": ("passed", ""),
                        "tests/test_x.py::test_setup": ("error", 'failed on setup with "OSError: no such device"'),
                        "tests/test_x.py::test_skipped": ("skipped", "no CUDA device here")}
    xml_file.unlink()
    assert {t: o for t, (o, _) in benchmark.test_outcomes(str(xml_file), str(log)).items()} == {
        t: o for t, (o, _) in outcomes.items()}


def test_parts_chosen_for_a_rerun():
    names = ["tests", "resume", "vit8-fp16", "authors", "compile"]
    status = {"tests": {"status": "failed"}, "resume": {"status": "ok"}, "vit8-fp16": {"status": "timed out"},
              "authors": {"status": "not asked"}, "compile": {"status": "skipped"}}
    assert benchmark.chosen_parts("failed", names, status) == ["tests", "vit8-fp16", "compile"]
    status["resume"]["status"] = "started"  # the run was killed while it ran
    assert benchmark.chosen_parts("failed", names, status) == ["tests", "resume", "vit8-fp16", "compile"]
    assert benchmark.chosen_parts("all", names, status) == names
    assert benchmark.chosen_parts("resume,compile", names, status) == ["resume", "compile"]
    with pytest.raises(UserError, match="unknown part.*vit9.*the parts are all, failed, or some of tests, resume"):
        benchmark.chosen_parts("vit9", names, status)


def test_the_side_by_side_worker_keeps_the_callers_pythonpath(tmp_path, monkeypatch):
    """gpu_check.sh puts the wheels it carries on PYTHONPATH; the worker processes must still find them."""
    (tmp_path / "sitecustomize.py").write_text("import os\nopen(os.environ['ETRIS_TEST_MARK'], 'w').write('seen')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setenv("ETRIS_TEST_MARK", str(tmp_path / "mark"))
    worker = benchmark.Remote("ours", ["--backbone", "tiny-ViT", "--input-size", "64", "--device", "cpu"])
    worker.close()
    assert (tmp_path / "mark").read_text() == "seen"


def test_batchnorm_forwards_count_what_syncbn_would_synchronise():
    """tiny-RN: 20 BNs in the backbone (stem 3, four blocks of 3, four downsample branches, attnpool.connect) and 8
    on the decoder side (HA 6, Projector 2), all in train mode. --grad-checkpointing recomputes layer3 and layer4
    in backward (4 BNs each), not layer2, whose input needs no gradient: backward never enters it."""
    assert benchmark.batchnorm_forwards("tiny-RN", False) == 28
    assert benchmark.batchnorm_forwards("tiny-RN", True) == 36
    assert benchmark.batchnorm_forwards("tiny-ViT", False) == 14  # the Bridger's 6 zoom BNs, the decoder side's 8


def test_syncbn_makes_the_host_wait_three_times_per_batchnorm_forward():
    """torch's SyncBatchNorm forward (torch/nn/modules/_functions.py, the same in torch 2.11 and 2.13) removes the
    statistics of empty ranks with three boolean-mask indexings, each a nonzero whose count the host must read;
    its backward has none. Without SyncBN the step has no host wait at all."""
    assert benchmark.host_waits_counted_on_the_cpu("tiny-RN", False, syncbn=True) == 3 * 28
    assert benchmark.host_waits_counted_on_the_cpu("tiny-RN", True, syncbn=True) == 3 * 36
    assert benchmark.host_waits_counted_on_the_cpu("tiny-RN", False, syncbn=False) == 0


def test_activation_memory_grows_linearly_with_the_batch_and_halves_in_half_precision():
    b1, b2, b3 = (benchmark.activation_bytes("tiny-ViT", 64, "off", b) for b in (1, 2, 3))
    per_sample = b2 - b1
    assert per_sample > 0 and abs((b3 - b2) - per_sample) <= 0.02 * per_sample
    half = benchmark.activation_bytes("tiny-ViT", 64, "fp16", 2) - benchmark.activation_bytes("tiny-ViT", 64, "fp16", 1)
    assert 0.3 * per_sample < half < 0.9 * per_sample  # most saved activations are matmul/conv inputs, in 2 bytes


def test_write_row_keeps_other_sections(tmp_path):
    path = tmp_path / "B.md"
    path.write_text("# Benchmarks\n\n## data loader\n\n| a |\n|---|\n| 1 |\n")
    header = "| x | y |\n|---|---|"
    benchmark.write_row(str(path), header, "| 1 | 2 |")
    benchmark.write_row(str(path), header, "| 3 | 4 |")
    text = path.read_text()
    assert "## data loader\n\n| a |\n|---|\n| 1 |" in text
    assert text.count("## benchmark") == 1 and text.count("| x | y |") == 1
    assert text.index("| 1 | 2 |") < text.index("| 3 | 4 |")
    assert text.rstrip().endswith("| 3 | 4 |")


def test_side_by_side_needs_a_checkout(tmp_path):
    with pytest.raises(UserError, match="has no model/ folder: give the root of a checkout"):
        benchmark.parse_args(["--authors-repo", str(tmp_path)])
    assert not os.path.isdir(tmp_path / "model")
