"""Benchmarks (not tests): `python -m bench` (the runner, see bench/README.md), the single scripts
`python -m bench.memory` / `.gpu_step` / `.conv_shapes` / `.data_throughput`, and pytest-benchmark files."""
