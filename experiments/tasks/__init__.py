"""Synthetic tasks of the sandbox: the tile-grid image world, its exact judge, test items and training data.

Pure Python / numpy, deterministic by seed. Main entry points: ``Suite`` (test items and the training
stream), ``world`` (grids, ``encode``/``decode``, ``render``, ``describe``/``satisfies``) and
``WordTokenizer``.
"""

from uniprobe.experiments.tasks import world
from uniprobe.experiments.tasks.prompts import CATEGORIES, Item, Prompt, as_prompt
from uniprobe.experiments.tasks.suite import Suite, SuiteSizes, TrainExample
from uniprobe.experiments.tasks.vocab import WordTokenizer

__all__ = [
    "CATEGORIES",
    "Item",
    "Prompt",
    "Suite",
    "SuiteSizes",
    "TrainExample",
    "WordTokenizer",
    "as_prompt",
    "world",
]
