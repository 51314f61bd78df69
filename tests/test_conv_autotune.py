"""The GPU's autotune path of the conv launchers, run on CPU under the interpreter
(kernels.conv.autotune_in_interpreter).

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
    for (kind, cls, a, tma), tuner in fresh_tuners.items():
        assert cls == "16bit" and a == arch and not tma  # K=20 bf16: 40-byte weight rows, no TMA descriptor
        space = kc.autotune_configs(cls, arch, kind, tma)
        assert [c.kwargs["BLOCK_M"] for c in tuner.configs] == [c.block_m for c in space]
        assert len(tuner.configs_timings) == len(space), f"{kind}: not every config was benchmarked"
        assert tuner.best_config in tuner.configs
    assert tuple(fresh_tuners[("dgrad", "16bit", arch, False)].reset_to_zero) == ("sums_ptr",)
    assert tuple(fresh_tuners[("wgrad", "16bit", arch, False)].reset_to_zero) == ("dw_ptr",)


def test_hopper_space_only_on_sm90():
    for kind in ("fprop", "dgrad", "wgrad"):
        sm80, sm90 = kc.autotune_configs("16bit", 80, kind), kc.autotune_configs("16bit", 90, kind)
        assert sm80 == kc.gpu_configs("16bit", kind)
        assert sm80 == (kc.GPU_CONFIGS["16bit"] if kind == "fprop" else kc.BACKWARD_16BIT)
        assert sm90[: len(sm80)] == sm80 and set(sm90[len(sm80) :]) == set(kc.HOPPER_CONFIGS[kind])
        assert all(c.num_warps == 8 and c.block_m >= 128 for c in kc.HOPPER_CONFIGS[kind])
        assert kc.autotune_configs("ieee", 90, kind) == kc.GPU_CONFIGS["ieee"]  # fp32 keeps its small tiles


@pytest.mark.parametrize(
    "cfg",
    sorted({c for cs in kc.HOPPER_CONFIGS.values() for c in cs}, key=str),
    ids=lambda c: c.label().replace(" ", "-"),
)
def test_hopper_tiles_forced_vs_torch(cfg):
    """Each Hopper tile on all three kernels (3x3 stride 2: phases; C=150, K=136 not multiples of the tile)."""
    C, K = 150, 136
    x = torch.randn(1, C, 5, 4).bfloat16()
    w = torch.randn(K, C, 3, 3) / (C * 9) ** 0.5
    _check_launchers("cpu", x, w, _bn_vectors(C, "cpu"), 2, 1, 1, torch.bfloat16, config=cfg)


def test_tma_configs_only_in_the_sm90_fprop_space():
    tma = [c for c in kc.autotune_configs("16bit", 90, "fprop") if c.w_desc]
    assert len(tma) == 2 and {c.block_n for c in tma} == {128, 256}
    assert not any(c.w_desc for c in kc.autotune_configs("16bit", 90, "fprop", tma=False))
    assert not any(c.w_desc for k in ("dgrad", "wgrad") for c in kc.autotune_configs("16bit", 90, k))
    assert not any(
        c.w_desc
        for k in ("fprop", "dgrad", "wgrad")
        for cls in ("16bit", "tf32", "ieee")
        for c in kc.autotune_configs(cls, 80, k)
    )
    assert kc.tma_ok(torch.empty(3, 3, 8, 136, dtype=torch.bfloat16))
    assert not kc.tma_ok(torch.empty(3, 3, 8, 20, dtype=torch.bfloat16))  # 40-byte rows
    assert not kc.tma_ok(torch.empty(3, 3, 8, 137, dtype=torch.float32)[..., 1:])  # not contiguous


@pytest.mark.parametrize("dt", ["fp32", "bf16"])
@pytest.mark.parametrize(
    "k, stride, dil, pad, C, K, xdt",
    [
        (3, 2, 1, 1, 20, 24, "fp32"),
        (3, 1, 2, 2, 20, 24, "fp32"),
        (1, 1, 1, 0, 20, 24, "fp32"),
        (1, 1, 1, 0, 24, 40, "bf16"),
        (1, 2, 1, 0, 24, 24, "bf16"),
        (3, 1, 1, 1, 20, 20, "fp32"),
    ],
    ids=str,
)
def test_tma_weight_descriptor_vs_torch(monkeypatch, dt, k, stride, dil, pad, C, K, xdt):
    """fprop with the weight read through a tensor descriptor (``w_desc``; the TMA copy on sm_90) under the
    interpreter, with dgrad/wgrad (+ BN sums) after it, vs float64 torch: y fp32 1e-4 / bf16 1e-2, gradients and
    sums 1e-4 (tests/test_conv_kernels.py's tolerances). C=20 is not a multiple of BLOCK_K=16 (the descriptor's
    zero fill past C, per tap); K=24/40 span two/three column tiles; M = 2*5*6 = 60 rows is not a multiple of 16.
    1x1 stride 1 unpadded with 16-byte x rows (fp32 x C=20, bf16 x C=24): x through a descriptor too (X_DENSE), not
    for stride 2. K=20 in bf16 (40-byte rows) cannot take a descriptor: the launcher falls back to the same tile
    with plain loads. The flags the kernel received are checked."""
    odt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dt]
    seen = []
    real = kc._launch
    monkeypatch.setattr(
        kc,
        "_launch",
        lambda tuned, raw, grid, cfg, *a, **f: seen.append((raw, cfg, f)) or real(tuned, raw, grid, cfg, *a, **f),
    )
    x = torch.randn(2, C, 5, 6).to({"fp32": torch.float32, "bf16": torch.bfloat16}[xdt])
    w = torch.randn(K, C, k, k) / (C * k * k) ** 0.5
    cfg = kc.ConvConfig(16, 16, 16, 1, 1, 1, w_desc=True)
    _check_launchers("cpu", x, w, _bn_vectors(C, "cpu"), stride, pad, dil, odt, config=cfg)
    used = [(c.w_desc, f["X_DENSE"]) for raw, c, f in seen if raw is kc._fprop_kernel]
    w_desc = (K * w.to(odt).element_size()) % 16 == 0
    dense = w_desc and (k, stride, pad) == (1, 1, 0) and (C * x.element_size()) % 16 == 0
    assert used == [(w_desc, dense)]
