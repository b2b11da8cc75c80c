"""nnsight backend: read each point from the model's ``NNsight`` envoy tree.

The model is a plain ``nn.Module`` (wrapped here in ``nnsight.NNsight``, once per model) or an
nnsight model the user built (``LanguageModel`` / ``TransformersModel``), used as it is; hook
points are resolved on the torch module underneath either way.

Remote execution: ``remote=True`` sends the trace to an NDIF server (https://ndif.us) and runs it
there, against weights the server already holds. So the model must be an nnsight model that names
a checkpoint hosted there (``nnsight.LanguageModel("meta-llama/Llama-3.1-8B")``; only a
config-sized skeleton is built here), and nnsight needs the user's NDIF API key
(``nnsight.login()``, ``NDIF_API_KEY``, or ``nnsight.CONFIG.set_default_api_key``). A local module
wrapped in ``NNsight`` has no such identity: asking it for ``remote=True`` is an error here, not a
forward call that fails on an unknown keyword. ``remote="local"`` runs nnsight's serverless dry
run of the remote path (serialize, hide local modules, deserialize, run) on a local
``TransformersModel`` — how the tests check this path offline.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn
from uniprobe.hooks.adapters import Adapter, ModelInputs
from uniprobe.hooks.hookset import pick

_WRAPPED: dict[int, tuple[nn.Module, Any]] = {}


def is_nnsight_model(obj: Any) -> bool:
    """Whether ``obj`` is already an nnsight envoy (``NNsight``, ``LanguageModel``, ...)."""
    nnsight = sys.modules.get("nnsight")
    return nnsight is not None and isinstance(obj, nnsight.Envoy)


def torch_module(model: Any) -> nn.Module:
    """The torch module under an nnsight model (the model itself when it is a plain module)."""
    return model._module if is_nnsight_model(model) else model


def wrap(model: nn.Module) -> Any:
    """``nnsight.NNsight(model)``, cached per model object; an nnsight model is returned as is."""
    if is_nnsight_model(model):
        return model
    from nnsight import NNsight

    key = id(model)
    # keep the model beside its wrapper: an id may be reused once a model is freed
    if key not in _WRAPPED or _WRAPPED[key][0] is not model:
        _WRAPPED[key] = (model, NNsight(model))
    return _WRAPPED[key][1]


def check_remote(nn_model: Any, remote: bool | str) -> None:
    """Refuse ``remote`` on a wrapper that cannot run remotely, naming what to pass instead."""
    if not remote:
        return
    from nnsight.modeling.mixins.remotable import Remotable

    if not isinstance(nn_model, Remotable):
        raise ValueError(
            f"remote={remote!r} runs the trace on an NDIF server, against a checkpoint hosted there: pass "
            "an nnsight model that names it, e.g. nnsight.LanguageModel('meta-llama/Llama-3.1-8B'), "
            "with your NDIF API key set (nnsight.login() or NDIF_API_KEY). This model is a local "
            f"{type(torch_module(nn_model)).__name__} wrapped in {type(nn_model).__name__}, which cannot "
            "run remotely; use remote=False"
        )


def _envoy(root: Any, path: str) -> Any:
    node = root
    for part in path.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


@torch.no_grad()
def nnsight_dense(
    model: Any, adapter: Adapter, inputs: ModelInputs, points: list[str], *, remote: bool | str = False
) -> dict[str, Any]:
    """Run one traced forward; ``{point: tensor [b, pos, *feature]}``.

    Points are requested in execution order (nnsight refuses out-of-order access); each
    module's whole input/output is saved and unwrapped afterwards with the same rule the torch
    hooks use, so both backends return identical tensors. ``remote`` is passed to nnsight's
    ``trace`` (``True``: an NDIF server; ``"local"``: nnsight's offline simulation of it); the
    default local trace is called without it.
    """
    nn_model = wrap(model)
    check_remote(nn_model, remote)
    module = torch_module(nn_model)
    sites = {p: adapter.site(module, p) for p in points}
    # resolved before the trace: a remote trace ships only what its body uses (envoys, the dict)
    envoys = [(p, _envoy(nn_model, sites[p].module), sites[p].io == "input") for p in points]
    saved: dict[str, Any] = {}
    with nn_model.trace(**inputs.kwargs, **({"remote": remote} if remote else {})):
        for p, envoy, is_input in envoys:
            saved[p] = (envoy.input if is_input else envoy.output).save()
    return {p: (saved[p] if sites[p].io == "input" else pick(saved[p], sites[p].index)) for p in points}
