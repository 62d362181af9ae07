"""relay's benchmarks: ``python -m bench [--quick] [NAME ...]`` (see bench/common.py)."""
