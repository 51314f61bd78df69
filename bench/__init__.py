"""Benchmarks (not tests): `python -m bench.memory`, `python -m bench.gpu_step`, and pytest-benchmark files."""
