"""Backends: three ways to read the same hook points, with the same names and tensors.

- ``torch`` (default): plain forward hooks (``uniprobe.hooks.capture``); works everywhere, also during
  multi-step image generation.
- ``nnsight``: the model wrapped in ``nnsight.NNsight`` (or an nnsight model you built); each
  point read from its envoy. ``remote=True`` runs the trace on an NDIF server (see
  ``uniprobe.hooks.backends.nnsight_backend``).
- ``transformer_lens``: a ``TransformerBridge`` booted on the adapter's causal-LM view
  (Llama, Qwen2, Emu3, and the backbones of Janus and query-based models).

``run_capture`` runs one forward pass of prepared inputs through any backend and returns a
:class:`uniprobe.hooks.capture.Captured`.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from uniprobe.hooks.adapters import Adapter, ModelInputs, adapter_for
from uniprobe.hooks.capture import Captured, capture
from uniprobe.hooks.errors import UsageError

BACKENDS = ("torch", "nnsight", "transformer_lens")


def run_capture(
    model: nn.Module,
    inputs: ModelInputs,
    points: str | Iterable[str],
    *,
    adapter: Adapter | None = None,
    backend: str = "torch",
    roles: Iterable[str] | None = None,
    positions: Iterable[int] | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    generate: bool = False,
    remote: bool | str = False,
    key_roles: Iterable[str] | None = None,
    key_positions: Iterable[int] | None = None,
    generate_kwargs: dict[str, Any] | None = None,
) -> Captured:
    """One forward pass on ``inputs`` with ``points`` captured by ``backend``.

    With ``generate=True`` the adapter's image generation runs instead (torch backend: many
    steps, rows tagged by step and guidance branch); the generated tokens ``[batch, n]`` are
    left in ``captured.generated`` (a diffusion decoder's: the sampled latents ``[batch, *latent]``);
    ``generate_kwargs`` go to the adapter's generate (``num_inference_steps``, ``guidance_scale``,
    ``seed`` for a diffusion decoder; an unknown keyword is an error naming the accepted ones).
    ``key_roles`` / ``key_positions``: the key columns of attention patterns (torch backend; see
    :mod:`uniprobe.hooks.attn_capture`).

    ``model`` may also be an nnsight model (``nnsight.LanguageModel(...)``): the nnsight backend
    traces it as it is, the others run the torch module inside it. ``remote=True`` (nnsight
    backend only) runs the trace on an NDIF server, which needs such a model naming a checkpoint
    hosted there and an NDIF API key; ``remote="local"`` is nnsight's offline simulation of that.
    """
    if remote and backend != "nnsight":
        raise ValueError(
            f"remote={remote!r} runs a trace on an NDIF server through nnsight: pass backend='nnsight'"
        )
    wrapper, model = model, _module_of(model)  # the torch module (the model itself if plain)
    adapter = adapter or adapter_for(model)
    selection = {"roles": roles, "positions": positions, "dtype": dtype, "device": device}
    if key_roles is not None or key_positions is not None:  # attention patterns' key columns (torch)
        selection.update(key_roles=key_roles, key_positions=key_positions)
    if generate:
        if backend != "torch":
            raise ValueError("capture during generation needs backend='torch' (many forward steps)")
        if adapter.generate is None:
            raise UsageError(
                f"the {adapter.name!r} adapter has no image generation to capture (mode 'generate'); "
                "capture a forward instead (mode 'understanding', or 'generation': teacher-forced image "
                "tokens), or use a model whose adapter generates (Janus, Emu3, GLM-Image, the sandbox "
                "models, a query model with a diffusion decoder)"
            )
        gen_kw = _generate_kwargs(adapter, generate_kwargs)
        if adapter.replay_generation:
            # models that re-run the whole stream per step: draw first, then capture one
            # teacher-forced forward on the drawing (identical states, every position)
            tokens, replay = adapter.generate(model, inputs, **gen_kw)
            cap = run_capture(model, replay, points, adapter=adapter, **selection)
            cap.generated = tokens
            return cap
        cfg_batch = inputs.kwargs["input_ids"].shape[0] if adapter.generation_cfg else None
        with (
            torch.no_grad(),
            capture(
                model,
                points,
                adapter=adapter,
                layout=inputs.layout,
                cfg_batch=cfg_batch,
                expect="generation",
                **selection,
            ) as cap,
        ):
            cap.generated = adapter.generate(model, inputs, **gen_kw)
        return cap
    if backend == "torch":
        with (
            torch.no_grad(),
            capture(model, points, adapter=adapter, layout=inputs.layout, **selection) as cap,
        ):
            adapter.run(model, inputs)
        return cap
    names = adapter.expand(model, points)
    result = Captured(names, inputs.layout, roles, positions, dtype, device)
    if backend == "nnsight":
        from uniprobe.hooks.backends.nnsight_backend import nnsight_dense

        dense = nnsight_dense(wrapper, adapter, inputs, names, remote=remote)
    elif backend == "transformer_lens":
        from uniprobe.hooks.backends.tl_backend import transformer_lens_dense

        dense = transformer_lens_dense(model, adapter, inputs, names)
    else:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    # one backbone call over the layout's positions, as the torch tracker records it, so points
    # that see only the last k positions (queries, heads) get their true positions and roles
    result.begin_call(0, inputs.layout.length)
    for name in names:
        result.add(name, dense[name])
    return result


def _generate_kwargs(adapter: Adapter, kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """``kwargs`` for ``adapter.generate``, checked against its signature (it takes ``model, inputs``)."""
    import inspect

    kwargs = dict(kwargs or {})
    params = list(inspect.signature(adapter.generate).parameters.values())[2:]
    if kwargs and not any(p.kind is p.VAR_KEYWORD for p in params):
        names = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            raise ValueError(
                f"the {adapter.name!r} adapter's generate takes no {', '.join(map(repr, unknown))}; "
                f"its settings: {', '.join(names) or 'none'}"
            )
    return kwargs


def _module_of(model: Any) -> nn.Module:
    """The torch module under an nnsight model; a plain module is returned as is."""
    if "nnsight" in sys.modules:  # an nnsight model exists only once nnsight is imported
        from uniprobe.hooks.backends.nnsight_backend import torch_module

        return torch_module(model)
    return model


def available(backend: str) -> bool:
    """Whether a backend's library imports."""
    mod: Any = {"torch": "torch", "nnsight": "nnsight", "transformer_lens": "transformer_lens"}.get(backend)
    if mod is None:
        return False
    try:
        __import__(mod)
    except ImportError:
        return False
    return True
