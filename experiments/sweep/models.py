"""Loading a sweep's models: ``uniprobe --model`` specs, or a user's loader for other checkpoints.

A ``loader`` (``package.module:function`` or ``file.py:function``) is called with the model's
``path`` and returns the model, or ``(model, tokenizer)``; its adapter comes from the ``adapter``
file (a query-based spec, see :mod:`hooks.adapters.query`) or the adapter registry.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from experiments.models import LoadedModel


def load_run_model(spec: dict) -> LoadedModel:
    """The model of a run's ``model`` config: ``path``, ``adapter``, ``loader``, ``device_map``, ``dtype``."""
    from experiments import models

    extra: dict[str, Any] = {}
    if spec["loader"]:
        loaded = _from_loader(spec)
    else:
        accepted = inspect.signature(models.load_model).parameters
        extra = {k: spec[k] for k in ("device_map", "dtype") if spec[k] is not None and k in accepted}
        if spec["device_map"] is not None and "device_map" not in accepted:
            raise ValueError(
                f"model {spec['name']!r}: device_map is set but this uniprobe's load_model cannot place "
                "models on devices yet; remove models[].device_map"
            )
        loaded = models.load_model(spec["path"], spec["adapter"], **extra)
    if spec["dtype"] is not None and "dtype" not in extra:
        loaded.model.to(getattr(torch, spec["dtype"]))
    return loaded


def _from_loader(spec: dict) -> LoadedModel:
    from hooks.adapters import adapter_for, load_adapter_file

    made = import_loader(spec["loader"])(spec["path"])
    model, tokenizer = made if isinstance(made, tuple) else (made, None)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"loader {spec['loader']!r} returned {type(model).__name__}, not a torch module")
    model.eval()
    adapter = load_adapter_file(spec["adapter"]) if spec["adapter"] else adapter_for(model)
    return LoadedModel(model, adapter, tokenizer, {}, spec["path"])


def import_loader(target: str) -> Callable[[str], Any]:
    """The function named by ``package.module:function`` or ``/path/file.py:function``."""
    where, _, name = target.rpartition(":")
    if where.endswith(".py"):
        if not Path(where).exists():
            raise FileNotFoundError(f"loader file {where} does not exist")
        module_spec = importlib.util.spec_from_file_location(Path(where).stem, where)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    if not callable(getattr(module, name, None)):
        raise AttributeError(f"loader {target!r}: {where} has no function {name!r}")
    return getattr(module, name)


@contextlib.contextmanager
def reuse_loaded(loaded: LoadedModel) -> Iterator[None]:
    """Within: ``experiments.models.load_model(loaded.spec, ...)`` returns ``loaded`` itself.

    The sweep calls the CLI's own command handlers (``uniprobe patch``), which load their model by
    spec; this lets them use the model the sweep already holds instead of loading it again.
    """
    from experiments import models

    original = models.load_model

    def load_model(spec: str, *args: Any, **kwargs: Any) -> LoadedModel:
        return loaded if spec == loaded.spec else original(spec, *args, **kwargs)

    models.load_model = load_model
    try:
        yield
    finally:
        models.load_model = original
