"""Training and evaluation (``python -m widedeep.train``): the seed's recipes and test protocols."""

from .cli import TrainConfig, config, parse, parser
from .engine import TrainingError, evaluate, train

__all__ = ["TrainConfig", "TrainingError", "config", "evaluate", "main", "parse", "parser", "train"]


def main(argv: list[str] | None = None) -> dict:
    from .run import main as _main

    return _main(argv)
