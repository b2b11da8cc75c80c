"""Model-family adapters and the registry that picks one for a model.

``adapter_for(model)`` looks at ``model.uniprobe_adapter`` (an :class:`Adapter` or a
registered name) and then at the model's class name, among the registered adapters: the
built-in families below, plus any that a package registered on import (the sandbox models'
adapters live in ``uniprobe.experiments.sandbox`` and register themselves there). Register your own with
:func:`register_adapter` or build a query-based one from a spec (``uniprobe.hooks.adapters.query``).
"""

from __future__ import annotations

from torch import nn
from uniprobe.hooks.adapters.base import Adapter, ModelInputs, Site, get_module
from uniprobe.hooks.adapters.causal_lm import CAUSAL_LM
from uniprobe.hooks.adapters.glm_image import GLM_IMAGE
from uniprobe.hooks.adapters.janus import JANUS
from uniprobe.hooks.adapters.query import TINY_DIFFUSION_QUERY, TINY_QUERY, load_adapter_file, query_adapter
from uniprobe.hooks.adapters.unified_vocab import CHAMELEON, EMU3
from uniprobe.hooks.errors import UniprobeError

ADAPTERS: dict[str, Adapter] = {
    a.name: a for a in (CAUSAL_LM, JANUS, EMU3, CHAMELEON, GLM_IMAGE, TINY_QUERY, TINY_DIFFUSION_QUERY)
}  # more register themselves on import (the sandbox's: uniprobe.experiments.sandbox.adapter)


class NoAdapterError(UniprobeError, TypeError):
    """The model's family has no adapter."""


def register_adapter(adapter: Adapter) -> Adapter:
    """Make ``adapter`` findable by name and by its model classes."""
    ADAPTERS[adapter.name] = adapter
    return adapter


def supported() -> dict[str, tuple[str, ...]]:
    """Adapter name → model classes it serves."""
    return {name: a.model_classes for name, a in ADAPTERS.items()}


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter serving ``model``; a clear error listing the supported families otherwise."""
    declared = getattr(model, "uniprobe_adapter", None)
    if isinstance(declared, Adapter):
        return declared
    if isinstance(declared, str):
        if declared in ADAPTERS:
            return ADAPTERS[declared]
        raise NoAdapterError(
            f"model declares adapter {declared!r}, which is not registered ({', '.join(ADAPTERS)})"
        )
    cls = type(model).__name__
    for a in ADAPTERS.values():
        if cls in a.model_classes:
            return a
    lines = "\n".join(
        f"  {name}: {', '.join(classes) or '(by declaration)'}" for name, classes in supported().items()
    )
    raise NoAdapterError(
        f"no adapter for model class {cls!r}. Supported families:\n{lines}\n"
        "To serve it, write an adapter: module paths of its blocks, final norm and heads "
        "(uniprobe.hooks.adapters.base.Adapter), or for a query-based model a spec file read by "
        "uniprobe.hooks.adapters.query.load_adapter_file; then register_adapter(...) or pass adapter=..."
    )


__all__ = [
    "ADAPTERS",
    "Adapter",
    "ModelInputs",
    "NoAdapterError",
    "Site",
    "adapter_for",
    "get_module",
    "load_adapter_file",
    "query_adapter",
    "register_adapter",
    "supported",
]
