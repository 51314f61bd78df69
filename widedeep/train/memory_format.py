"""Whether a training run may use channels_last: never where a CPU convolution backward would crash.

oneDNN (torch 2.13, CPU) crashes with SIGSEGV or "double free" in the weight-gradient of a strided
convolution whose input is channels_last with fewer than 16 channels, on AMD EPYC CPUs with AVX-512
(plain NCHW is fine, as is the same layer with 16 channels or more). Narrow models (``--width``) have such
layers: the width-1/16 demo's stride-2 projection shortcuts have 8 input channels.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

log = logging.getLogger("widedeep.train")

# Below this many input channels a strided conv's backward on channels_last is unsafe on a CPU.
CPU_CHANNELS_LAST_MIN_CHANNELS = 16


def unsafe_cpu_convs(model: nn.Module) -> list[str]:
    """Names of the convolutions whose CPU backward on channels_last input is known to crash."""
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and max(m.stride) > 1 and m.in_channels < CPU_CHANNELS_LAST_MIN_CHANNELS
    ]


def use_channels_last(model: nn.Module, device: torch.device, requested: bool, training: bool) -> bool:
    """``requested``, unless training on a CPU with a layer that the oneDNN bug above would crash (logged)."""
    if not requested or device.type != "cpu" or not training:
        return requested
    bad = unsafe_cpu_convs(model)
    if bad:
        log.warning(
            "--channels-last ignored: on a CPU, the backward of strided convolutions with fewer than %d "
            "input channels on channels_last input crashes oneDNN on some CPUs (%s); training in NCHW",
            CPU_CHANNELS_LAST_MIN_CHANNELS,
            ", ".join(bad[:3]) + (" ..." if len(bad) > 3 else ""),
        )
        return False
    return True
