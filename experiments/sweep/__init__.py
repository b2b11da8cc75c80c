"""Sweeps: models × tasks × analyses from one YAML file, resumable, shardable across ranks.

    cfg = load_config("experiments/configs/unisandbox.yaml", overrides=["tasks[0].limit=8"])
    entries = run_sweep(cfg)          # one directory per run under cfg.out, plus index.json / .csv

Modules: :mod:`~uniprobe.experiments.sweep.config` (schema, validation, runs), :mod:`~.tasks` (a run's
examples), :mod:`~.models` (loading), :mod:`~.analyses` (probe, lens, patch, gapeval, r3),
:mod:`~.runner` (the loop, resume, ranks), :mod:`~.merge` (rank stores → one store),
:mod:`~.index` (markers and the index), :mod:`~.dist` (torchrun ranks), :mod:`~.commands` (CLI).
"""

from uniprobe.experiments.sweep.config import ConfigError, SweepConfig, load_config
from uniprobe.experiments.sweep.runner import FailFastError, run_sweep

__all__ = ["ConfigError", "SweepConfig", "FailFastError", "load_config", "run_sweep"]
