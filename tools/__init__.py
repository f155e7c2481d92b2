"""Tools beside the recipe: benchmark.py (speed and memory, the GPU check's driver), gpu_check.sh (the checks that
need a GPU, in one run) and parity.py (the weight fill that compares this implementation with the authors')."""
