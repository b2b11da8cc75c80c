"""nnsight backend: read each point from the model's ``NNsight`` envoy tree."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hooks.adapters import Adapter, ModelInputs
from hooks.capture import pick

_WRAPPED: dict[int, tuple[nn.Module, Any]] = {}


def wrap(model: nn.Module) -> Any:
    """``nnsight.NNsight(model)``, cached per model object."""
    from nnsight import NNsight

    key = id(model)
    # keep the model beside its wrapper: an id may be reused once a model is freed
    if key not in _WRAPPED or _WRAPPED[key][0] is not model:
        _WRAPPED[key] = (model, NNsight(model))
    return _WRAPPED[key][1]


def _envoy(root: Any, path: str) -> Any:
    node = root
    for part in path.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


@torch.no_grad()
def nnsight_dense(
    model: nn.Module, adapter: Adapter, inputs: ModelInputs, points: list[str]
) -> dict[str, Any]:
    """Run one traced forward; ``{point: tensor [b, pos, *feature]}``.

    Points are requested in execution order (nnsight refuses out-of-order access); each
    module's whole input/output is saved and unwrapped afterwards with the same rule the torch
    hooks use, so both backends return identical tensors.
    """
    nn_model = wrap(model)
    sites = {p: adapter.site(model, p) for p in points}
    saved: dict[str, Any] = {}
    with nn_model.trace(**inputs.kwargs):
        for p in points:
            envoy = _envoy(nn_model, sites[p].module)
            saved[p] = (envoy.input if sites[p].io == "input" else envoy.output).save()
    return {p: (saved[p] if sites[p].io == "input" else pick(saved[p], sites[p].index)) for p in points}
