"""The errors of :mod:`widedeep.weights` that several of its modules raise (a leaf: imports nothing).

``ParamsFormatError`` (a :class:`WeightsFormatError` for ``.params`` files) lives in :mod:`.mxnet_params` and
``ChecksumError`` in :mod:`.released`, the only modules that raise them.
"""

from __future__ import annotations


class WeightsFormatError(ValueError):
    """A weights file cannot be read as its format; the message names the file, the problem and what was expected."""


class WeightsMismatchError(ValueError):
    """A weights file does not fit the model: the message lists missing, unexpected and mis-shaped entries.

    Attributes (for callers that phrase their own hints, e.g. the trainer's CLI): ``path``; ``missing`` and
    ``unexpected`` (state_dict keys); ``mis_shaped`` (``(key, file_shape, model_shape)``); ``file_classes`` and
    ``model_classes`` (classifier outputs, 0 = headless, None = unknown); ``file_width`` / ``model_width`` and
    ``width_ratio`` (file / model) when the shapes are those of the same net at another ``width``, else None.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        missing=(),
        unexpected=(),
        mis_shaped=(),
        file_classes: int | None = None,
        model_classes: int | None = None,
        file_width: float | None = None,
        model_width: float | None = None,
    ):
        super().__init__(message)
        self.path = path
        self.missing, self.unexpected, self.mis_shaped = list(missing), list(unexpected), list(mis_shaped)
        self.file_classes, self.model_classes = file_classes, model_classes
        self.file_width, self.model_width = file_width, model_width
        self.width_ratio = file_width / model_width if file_width and model_width else None


def trim_names(names: list[str], k: int = 12) -> str:
    """The first ``k`` names, comma-separated, with `` ...`` when there are more (for messages and logs)."""
    return ", ".join(names[:k]) + (" ..." if len(names) > k else "")
