#!/usr/bin/env bash
# The GPU check (BENCHMARKS.md): everything this project needs a GPU to measure, in one run of under 7 minutes on
# one H200 (benchmark.py starts no part past --budget 380 s; the rest takes seconds), its figures appended to
# $OUT/gpu_check.md part by part.
#   bash tools/gpu_check.sh                # on the GPU machine; OUT=folder for the figures (default: here)
# A machine without ftfy: carry its wheels in .whl/ (BENCHMARKS.md says how). AUTHORS=path/to/ETRIS adds the
# authors' training step side by side (their checkout, carried, never committed).
set -u
OUT=$(cd "${OUT:-.}" && pwd)
if [ -n "${AUTHORS:-}" ]; then AUTHORS=$(cd "$AUTHORS" && pwd); fi
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/nvidia-smi.txt"
# a small REFER-format split of 640x480 JPEGs, so that the evaluation loop warps COCO-sized images
python3 tests/fake_refer.py --out /tmp/fake_refer --images 16 --refs-per-image 2 --prepare
PYTHONUNBUFFERED=1 python3 tools/benchmark.py --gpu-check --out "$OUT/gpu_check.md" --budget 380 --steps 10 \
  --warmup 3 --data refcoco --root /tmp/fake_refer/prepared --split testA ${AUTHORS:+--authors-repo "$AUTHORS"}
