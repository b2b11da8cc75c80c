"""Loading a sweep's models: ``uniprobe --model`` specs, or a user's loader for other checkpoints.

A ``loader`` (``file.py:function``, or ``package.module:function`` where the caller allows module
imports) is called with the model's ``path`` and returns the model, or ``(model, tokenizer)``; its
adapter comes from the ``adapter`` file (a query-based spec, see :mod:`uniprobe.hooks.adapters.query`) or
the adapter registry. Loading a loader runs its file's or module's code.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from uniprobe.experiments.models import LoadedModel


def load_run_model(spec: dict, *, allow_module_loaders: bool = False) -> LoadedModel:
    """The model of a run's ``model`` config (``allow_module_loaders``: see :func:`import_loader`).

    ``device_map``, ``dtype`` and ``load_options`` (further ``from_pretrained`` keywords such as
    ``max_memory``) go to :func:`uniprobe.experiments.models.load_model` for a transformers folder (built-in
    models refuse them); a loader's model is cast to ``dtype`` after loading.
    """
    from uniprobe.experiments import models

    if spec["loader"]:
        loaded = _from_loader(spec, allow_module_loaders)
        if spec["dtype"] is not None:
            loaded.model.to(getattr(torch, spec["dtype"]))
        return loaded
    options = {k: spec[k] for k in ("device_map", "dtype") if spec[k] is not None}
    return models.load_model(spec["path"], spec["adapter"], **options, **(spec["load_options"] or {}))


def _from_loader(spec: dict, allow_modules: bool) -> LoadedModel:
    from uniprobe.hooks.adapters import adapter_for, load_adapter_file

    made = import_loader(spec["loader"], allow_modules=allow_modules)(spec["path"])
    model, tokenizer = made if isinstance(made, tuple) else (made, None)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"loader {spec['loader']!r} returned {type(model).__name__}, not a torch module")
    model.eval()
    adapter = load_adapter_file(spec["adapter"]) if spec["adapter"] else adapter_for(model)
    return LoadedModel(model, adapter, tokenizer, {}, spec["path"])


def import_loader(target: str, *, allow_modules: bool = False) -> Callable[[str], Any]:
    """The function named by ``/path/file.py:function`` or, with ``allow_modules``,
    ``package.module:function``. Either way the file's or module's code runs."""
    where, _, name = target.rpartition(":")
    if where.endswith(".py"):
        if not Path(where).is_file():
            raise FileNotFoundError(f"loader file {where} does not exist; give an existing FILE.py:function")
        module_spec = importlib.util.spec_from_file_location(Path(where).stem, where)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    elif allow_modules:
        module = importlib.import_module(where)
    else:
        raise ValueError(
            f"loader {target!r} would import the module {where!r}, running its code; give FILE.py:function, "
            "or allow module loaders (uniprobe sweep --allow-module-loaders, allow_modules=True)"
        )
    if not callable(getattr(module, name, None)):
        raise AttributeError(f"loader {target!r}: {where} has no function {name!r}")
    return getattr(module, name)
