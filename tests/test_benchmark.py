"""tools/benchmark.py's plumbing on the CPU, so that it works on a GPU machine: the GPU check end to end on a tiny
backbone (its CUDA tests skip, its torchrun run is killed and resumed, its table is filled), its worker processes'
environment, the activation-memory and BatchNorm counts, and the table writing."""
import os
import re

import pytest

from tools import benchmark


def test_gpu_check_plumbing_on_the_cpu(tmp_path):
    out = tmp_path / "check.md"
    benchmark.main(["--gpu-check", "--device", "cpu", "--backbone", "tiny-ViT", "--input-size", "64", "--steps", "1",
                    "--warmup", "0", "--out", str(out), "--budget", "400", "--eval-samples", "4"])
    text = out.read_text()
    parts = [text.index(f"\n{i}. ") for i in (1, 2, 3, 4)]
    assert parts == sorted(parts)  # in order: CUDA tests, torchrun run, step table, authors
    # a check on the CPU hides the GPUs from the CUDA tests, also on a machine that has one
    assert re.search(r"\d+ skipped", text[parts[0]:parts[1]]) and "no CUDA device here" in text[parts[0]:parts[1]]
    assert " passed" not in text[parts[0]:parts[1]] and " failed" not in text[parts[0]:parts[1]]
    assert re.search(r"  ok: killed at step \d+ of 16, resumed, exit 0, steps at the end of each epoch \[8, 16\]",
                     text[parts[1]:parts[2]])
    rows = [line.split("|")[1:-1] for line in text[parts[2]:parts[3]].splitlines() if line.startswith("| tiny-ViT |")]
    assert [r[:6] for r in rows] == [[" tiny-ViT ", " 2 ", " off ", " on ", " False ", " - "],
                                     [" tiny-ViT ", " 2 ", " bf16 ", " on ", " False ", " - "]], rows
    assert all(float(r[6]) > 0 and float(r[7]) > 0 and r[8].strip() == "-" and float(r[9]) > 0 for r in rows), rows
    assert float(rows[0][10]) > 0  # the eval loop is measured with the first configuration
    assert "no --authors-repo" in text[parts[3]:]


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
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--authors-repo", str(tmp_path)])
    assert not os.path.isdir(tmp_path / "model")
