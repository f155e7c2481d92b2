"""benchmark.py's plumbing on the CPU, so that it works the day a GPU is lent: the GPU check end to end on a tiny
backbone (its CUDA tests skip, its torchrun run is killed and resumed, its table is filled), the activation-memory
count, and the table writing."""
import os
import re

import pytest

import benchmark


def test_gpu_check_plumbing_on_the_cpu(tmp_path):
    out = tmp_path / "check.md"
    benchmark.main(["--gpu-check", "--device", "cpu", "--backbone", "tiny-ViT", "--input-size", "64", "--steps", "1",
                    "--warmup", "0", "--out", str(out), "--budget", "400", "--eval-samples", "4"])
    text = out.read_text()
    parts = [text.index(f"\n{i}. ") for i in (1, 2, 3, 4)]
    assert parts == sorted(parts)  # in order: CUDA tests, torchrun run, step table, authors
    assert "skipped" in text[parts[0]:parts[1]] and "CUDA" in text[parts[0]:parts[1]]  # no CUDA here: skipped
    assert re.search(r"  ok: killed at step \d+ of 16, resumed, exit 0, steps at the end of each epoch \[8, 16\]",
                     text[parts[1]:parts[2]])
    rows = [line for line in text[parts[2]:parts[3]].splitlines() if line.startswith("| 2 |")]
    assert len(rows) == 2 and all("failed" not in r and "skipped" not in r for r in rows), rows
    img_s = [float(r.split("|")[5]) for r in rows]
    assert all(v > 0 for v in img_s)
    loop = rows[0].split("|")[8].strip()
    assert float(loop) > 0  # the eval loop is measured with the first configuration
    assert "no --authors-repo" in text[parts[3]:]


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
