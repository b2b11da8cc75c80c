"""Run the unpatched target once and keep what the batched engine reuses.

(Named ``cached_run``, not "trace": elsewhere in the field — nnsight, TransformerLens — a trace
means "hook the model and read it"; this is one recorded run whose pieces are reused.)

:func:`cached_run` records every block's input and output (to resume from layer ``l``), the target's
own values at the patched points (to spot no-op patches), when model-level points fire relative
to the blocks, an estimate of the activation bytes of one batch row, and — for plain causal LMs
— the run's key/value cache (to resume from position ``p``: a patch at ``p`` leaves positions
``< p`` unchanged, so their keys and values are reused and only positions ``≥ p`` are run).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from uniprobe.hooks.adapters.base import Adapter, ModelInputs, get_module
from uniprobe.hooks.calls import cache_kwarg, output_cache, transformers_version
from uniprobe.hooks.hookset import HookSet, input_tensor
from uniprobe.probes.patching.hooking import record

Forward = Callable[[nn.Module, ModelInputs], Any]
SUFFIX_KWARGS = frozenset({"input_ids", "attention_mask"})


@dataclass
class CachedRun:
    """The unpatched target run, as the engine needs it.

    Attributes:
        outputs: the model's outputs (batch ``B``).
        block_inputs: per block, its input stream ``[B, pos, d]``; ``block_outputs``: what it returned.
        values: the target's own tensor ``[B, pos, *feat]`` at every patched point.
        start_of: model-level point → the layer a patch there resumes from (``L`` after the blocks).
        resumable / reason: whether blocks may be skipped, and why not.
        kv: per block ``(keys, values) [B, heads, pos, head_dim]`` when positions may be skipped
            (plain causal LM, no padding), else None with ``suffix_reason``.
        row_bytes: estimated activation bytes of one batch row.
        batch, n_layers, length: ``B``, number of blocks, positions of the stream.
        points: the points recorded for patching.
    """

    outputs: Any
    block_inputs: list[torch.Tensor]
    block_outputs: list[Any]
    values: dict[str, torch.Tensor]
    start_of: dict[str, int | None]
    resumable: bool
    reason: str
    row_bytes: int
    batch: int
    n_layers: int
    length: int
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    suffix_reason: str = ""
    input_ids: torch.Tensor | None = field(default=None, repr=False)
    points: tuple[str, ...] = ()


def suffix_blocker(model: nn.Module, adapter: Adapter, inputs: ModelInputs, forward: Forward | None) -> str:
    """Why positions cannot be skipped for this run ("" when they can)."""
    if forward is not None or adapter.forward is not None:
        return "a custom forward"
    extra = set(inputs.kwargs) - SUFFIX_KWARGS
    if extra or "input_ids" not in inputs.kwargs:
        return f"inputs beyond input_ids/attention_mask ({', '.join(sorted(extra)) or 'no input_ids'})"
    mask = inputs.kwargs.get("attention_mask")
    if mask is not None and not bool(mask.bool().all()):
        return "padded inputs"
    if cache_kwarg(model) is None:
        return (
            f"{type(model).__name__}.forward takes no key/value cache (transformers {transformers_version()})"
        )
    return ""


def _kv_of(
    outputs: Any, n_layers: int, length: int
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]] | None, str]:
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = output_cache(outputs)  # found by type: the output field's name moved in transformers 5.24
    if not isinstance(cache, DynamicCache) or len(cache.layers) != n_layers:
        return None, "the model returned no per-layer key/value cache"
    if any(type(layer) is not DynamicLayer for layer in cache.layers):
        return None, "cache layers other than full attention (sliding window, linear attention, ...)"
    kv = [(layer.keys, layer.values) for layer in cache.layers]
    if any(k.shape[-2] != length for k, _ in kv):
        return None, "cache length differs from the stream length"
    return kv, ""


@torch.no_grad()
def cached_run(
    model: nn.Module,
    adapter: Adapter,
    inputs: ModelInputs,
    forward: Forward | None = None,
    points: Sequence[str] = (),
) -> CachedRun:
    """Run ``inputs`` once, recording what the engine reuses (see the module docstring).

    ``points``: the points to be patched (their target values are kept).
    """
    blocks = get_module(model, adapter.blocks)
    n_layers = len(blocks)
    points = list(dict.fromkeys(points))
    events: list[tuple[str, int]] = []
    ins: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
    outs: list[list[Any]] = [[] for _ in range(n_layers)]
    inner = [0]

    def pre(i: int) -> Callable[[nn.Module, tuple, dict], None]:
        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            ins[i].append(input_tensor(args, kwargs).detach())
            events.append(("pre", i))

        return hook

    def post(i: int) -> Callable[[nn.Module, tuple, Any], None]:
        def hook(mod: nn.Module, args: tuple, output: Any) -> None:
            outs[i].append(output)
            events.append(("post", i))

        return hook

    def fired(point: str) -> Callable[[nn.Module, tuple, dict], None]:
        return lambda mod, args, kwargs: events.append((point, -1))

    def size(mod: nn.Module, args: tuple, output: Any) -> None:
        inner[0] = max(inner[0], _numel(output))

    suffix_reason = suffix_blocker(model, adapter, inputs, forward)
    with HookSet() as hooks:
        for i in range(n_layers):
            hooks.pre(blocks[i], pre(i))
            hooks.post(blocks[i], post(i))
        for p in points:
            if not p.startswith("blocks."):
                hooks.pre(get_module(model, adapter.site(model, p).module), fired(p))
        if n_layers:
            for mod in blocks[0].modules():
                hooks.post(mod, size)
        with record(model, adapter, points) as rec:
            if suffix_reason:
                outputs = (forward or adapter.run)(model, inputs)
            else:
                outputs = model(**inputs.kwargs, use_cache=True)

    counts = [len(x) for x in ins]
    resumable, reason = True, ""
    if any(c != 1 for c in counts):
        resumable, reason = False, f"blocks ran {counts} times in one forward (resuming needs exactly once)"
    elif any(not _tensor_output(o[0]) for o in outs):
        resumable, reason = False, "a block returns neither a tensor nor a tuple holding one"
    last = max((k for k, (_, i) in enumerate(events) if i >= 0), default=None)
    start_of: dict[str, int | None] = {}
    for p in points:
        if p.startswith("blocks."):
            continue
        fired = [k for k, (name, _) in enumerate(events) if name == p]
        start_of[p] = None if not fired else (n_layers if last is not None and fired[0] > last else 0)
    stream = ins[0][0] if n_layers and ins[0] else None
    batch = int(stream.shape[0]) if stream is not None else first_dim(inputs)
    length = int(stream.shape[1]) if stream is not None and stream.dim() > 1 else 0
    kv = None
    if not suffix_reason:
        kv, suffix_reason = _kv_of(outputs, n_layers, length) if resumable else (None, reason)
    item = stream.element_size() if stream is not None else 4
    per_batch = 4 * (stream.numel() if stream is not None else 0) + 3 * inner[0] + _numel(outputs)
    return CachedRun(
        outputs=outputs,
        block_inputs=[x[0] for x in ins] if resumable else [],
        block_outputs=[o[0] for o in outs] if resumable else [],
        values={p: v[0] for p, v in rec.values.items() if len(v) == 1},
        start_of=start_of,
        resumable=resumable,
        reason=reason,
        row_bytes=max(1, item * per_batch // max(batch, 1)),
        batch=batch,
        n_layers=n_layers,
        length=length,
        kv=kv,
        suffix_reason=suffix_reason,
        input_ids=inputs.kwargs.get("input_ids"),
        points=tuple(points),
    )


def _tensor_output(o: Any) -> bool:
    return isinstance(o, torch.Tensor) or (
        isinstance(o, tuple) and bool(o) and isinstance(o[0], torch.Tensor)
    )


def _numel(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel()
    if isinstance(x, dict):
        return sum(_numel(v) for v in x.values())
    if isinstance(x, (tuple, list)):
        return sum(_numel(v) for v in x)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return sum(_numel(getattr(x, f.name)) for f in dataclasses.fields(x))
    if hasattr(x, "layers"):  # a key/value cache
        return sum(_numel(getattr(layer, "keys", None)) * 2 for layer in x.layers)
    return 0


def first_dim(inputs: ModelInputs) -> int:
    """Batch size of prepared inputs (first tensor's first dim, else the layout's)."""
    for v in inputs.kwargs.values():
        if isinstance(v, torch.Tensor) and v.dim():
            return int(v.shape[0])
    return inputs.layout.batch
