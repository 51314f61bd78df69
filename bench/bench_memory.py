"""Memory target of the BN-ReLU issue as a benchmark: fused saved-activation bytes <= 0.55x unfused."""

import pytest

from bench.memory import LABELS, measure


@pytest.mark.parametrize("label", LABELS)
def test_saved_activation_ratio(benchmark, label):
    result = benchmark.pedantic(measure, args=(label, 1, 64), rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    assert result["ratio"] <= 0.55
