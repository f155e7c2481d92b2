"""Shared test setup: import the flat modules from the repository root and keep torch to the CI's two cores."""
import os
import sys

# Busy-waiting OpenMP threads make tiny ops crawl when the two cores are shared with subprocesses
# (the DDP and kill/resume tests); must be set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

torch.set_num_threads(min(2, os.cpu_count() or 1))
