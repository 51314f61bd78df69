"""The ResNet-38 table that the model and the weight mappings share (a torch-free leaf: imports nothing).

:mod:`widedeep.models.resnet38` builds the net from it; :mod:`widedeep.weights` reads checkpoint keys against it
(Mapillary's ``mod<L>.block<k>`` units, the width a file was saved at) without importing the model, so the
imports run one way: ``widedeep.models`` -> ``widedeep.weights`` -> ``widedeep.arch``.
"""

# level -> (number of units, branch-2 output widths). Two widths: two 3x3 convs ("b33");
# three widths: 1x1-3x3-1x1 bottleneck ("b131").
LEVELS: dict[int, tuple[int, tuple[int, ...]]] = {
    2: (3, (128, 128)),
    3: (3, (256, 256)),
    4: (6, (512, 512)),
    5: (3, (512, 1024)),
    6: (1, (512, 1024, 2048)),
    7: (1, (1024, 2048, 4096)),
}
NUM_FEATURES = 4096  # bn7's channels at width 1 (the trunk's output)


def unit_module_name(level: int, index: int) -> str:
    """Our module name of unit ``index`` (0-based) of ``level``: ``b4`` then ``b4_1``, ``b4_2`` ... (psa's keys)."""
    return f"b{level}" if index == 0 else f"b{level}_{index}"
