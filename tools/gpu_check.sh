#!/usr/bin/env bash
# The GPU check (docs/gpus.md has its timeline): everything this project needs a GPU to measure, its figures
# appended to $OUT/gpu_check.md part by part, every part's full output in $OUT/logs/, each part's outcome in
# $STATUS (kept on the machine between commands, where $OUT may be a new folder each time; copied to $OUT).
# benchmark.py starts no part past BUDGET seconds (default 360: one run and a rerun fit in 15 minutes on a GPU
# machine, its start included).
#   bash tools/gpu_check.sh                         # on the GPU machine; OUT=folder for the figures (default: here)
#   PARTS=failed BUDGET=240 bash tools/gpu_check.sh # then: only what failed, timed out or was skipped for time
#   PARTS=tests,rn101-fp16-syncbn bash tools/gpu_check.sh   # or parts by name (the report names them)
# A machine without ftfy: carry its wheels in .whl/ (BENCHMARKS.md says how). AUTHORS=path/to/ETRIS adds the
# authors' training step side by side (their checkout, carried, never committed).
set -u
OUT=$(cd "${OUT:-.}" && pwd)
STATUS=${STATUS:-/tmp/etris_gpu_check_status.json}
if [ -n "${AUTHORS:-}" ]; then AUTHORS=$(cd "$AUTHORS" && pwd); fi
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/nvidia-smi.txt"
# a small REFER-format split of 640x480 JPEGs, so that the evaluation loop warps COCO-sized images
[ -d /tmp/fake_refer/prepared ] ||
  python3 tests/fake_refer.py --out /tmp/fake_refer --images 16 --refs-per-image 2 --prepare
PYTHONUNBUFFERED=1 python3 tools/benchmark.py --gpu-check --out "$OUT/gpu_check.md" --budget "${BUDGET:-360}" \
  --parts "${PARTS:-all}" --status "$STATUS" --steps 10 --warmup 3 --data refcoco --root /tmp/fake_refer/prepared \
  --split testA ${AUTHORS:+--authors-repo "$AUTHORS"}
cp "$STATUS" "$OUT/gpu_check_status.json"
