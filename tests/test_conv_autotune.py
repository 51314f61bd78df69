"""The GPU's autotune path of the conv launchers, run on CPU under the interpreter (kernels.conv.autotune_in_interpreter).

The launch goes through the same ``triton.autotune`` objects a GPU uses (``kernels.conv._tuned``: the arch's config
space, ``reset_to_zero``, the per-shape choice); only the timer differs (wall clock instead of CUDA events). Every
config is run (and timed) twice before the chosen one runs, so a buffer the kernel accumulates into (dgrad's BN sums,
wgrad's dW) is only right if the autotuner zeroes it: dropping ``reset_to_zero`` fails these tests.

Also: the sm_90 space (HOPPER_CONFIGS beside GPU_CONFIGS) and each Hopper tile forced, vs float64 torch with the
tolerances of tests/test_conv_kernels.py (bf16 y 1e-2, fp32 gradients and BN sums 1e-4).
"""

import pytest
import torch

from kernels import conv as kc
from tests.test_conv_kernels import _bn_vectors, _check_launchers


@pytest.fixture
def fresh_tuners(monkeypatch):
    monkeypatch.setattr(kc, "_TUNERS", {})
    return kc._TUNERS


@pytest.mark.parametrize("arch", [80, 90])
def test_autotuned_launch_matches_torch_and_resets_accumulators(fresh_tuners, arch):
    C, K = 24, 20
    x = torch.randn(1, C, 5, 6)
    w = torch.randn(K, C, 3, 3) / (C * 9) ** 0.5
    with kc.autotune_in_interpreter(arch):
        _check_launchers("cpu", x, w, _bn_vectors(C, "cpu"), 2, 1, 1, torch.bfloat16)
    assert {k[0] for k in fresh_tuners} == {"fprop", "dgrad", "wgrad"}
    for (kind, cls, a), tuner in fresh_tuners.items():
        assert cls == "16bit" and a == arch
        space = kc.autotune_configs(cls, arch, kind)
        assert [c.kwargs["BLOCK_M"] for c in tuner.configs] == [c.block_m for c in space]
        assert len(tuner.configs_timings) == len(space), f"{kind}: not every config was benchmarked"
        assert tuner.best_config in tuner.configs
    assert tuple(fresh_tuners[("dgrad", "16bit", arch)].reset_to_zero) == ("sums_ptr",)
    assert tuple(fresh_tuners[("wgrad", "16bit", arch)].reset_to_zero) == ("dw_ptr",)


def test_hopper_space_only_on_sm90():
    for kind in ("fprop", "dgrad", "wgrad"):
        sm80, sm90 = kc.autotune_configs("16bit", 80, kind), kc.autotune_configs("16bit", 90, kind)
        assert sm80 == kc.GPU_CONFIGS["16bit"]
        assert sm90[:len(sm80)] == sm80 and set(sm90[len(sm80):]) == set(kc.HOPPER_CONFIGS[kind])
        assert all(c.num_warps == 8 and c.block_m >= 128 for c in kc.HOPPER_CONFIGS[kind])
        assert kc.autotune_configs("ieee", 90, kind) == kc.GPU_CONFIGS["ieee"]  # fp32 keeps its small tiles


@pytest.mark.parametrize("cfg", sorted({c for cs in kc.HOPPER_CONFIGS.values() for c in cs}, key=str),
                         ids=lambda c: c.label().replace(" ", "-"))
def test_hopper_tiles_forced_vs_torch(cfg):
    """Each Hopper tile on all three kernels (3x3 stride 2: phases; C=150, K=136 not multiples of the tile)."""
    C, K = 150, 136
    x = torch.randn(1, C, 5, 4).bfloat16()
    w = torch.randn(K, C, 3, 3) / (C * 9) ** 0.5
    _check_launchers("cpu", x, w, _bn_vectors(C, "cpu"), 2, 1, 1, torch.bfloat16, config=cfg)
