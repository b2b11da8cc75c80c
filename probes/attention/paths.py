"""Path patching: the effect of sender heads on the output *only through* chosen receivers.

    senders = every_head(model)                       # one sender set per layer × head
    recv = Receivers(heads=((3, 0), (3, 1)), inputs=("q",))              # later heads' queries ...
    recv = Receivers(layer=2, positions=tuple(drawing_positions))        # ... or stream positions
    res = path_patch(model, clean, corrupted, senders, recv, LogitDiff(t, f))
    res.normalised                                    # [n_sets], 0 = no effect through the receivers

The protocol of Wang et al. (2022, "Interpretability in the wild"), two passes per sender set:

1. **Sender pass.** Run the *target* (``direction="noise"``: the clean run) with every attention head's
   ``z`` (the ``o_proj`` input) frozen to its target value, except the sender heads, which get the
   *source* run's ``z`` (the corrupted run). MLPs recompute (or are frozen too: ``freeze_mlps=True``,
   the direct path only). Record the receivers' inputs: the receiver heads' ``q``/``k``/``v``
   projections (``q_proj``/``k_proj``/``v_proj`` outputs, that head's slice — with GQA a ``k``/``v``
   receiver is the key/value head the query head reads, shared by its group), or the stream
   ``blocks.{layer}.resid_pre`` at ``positions``.
2. **Receiver pass.** Run the target again with only the receivers' inputs overwritten by the recorded
   values, and read the metric.

:func:`path_patch` runs many sender sets at once: each is a group of batch rows in both passes (a few
forwards per chunk of sets, not two per set). :func:`path_patch_reference` is the definition, two plain
hooked forwards per set; they are tested equal. Everything here is hand-written: no library implements
path patching for transformers models (TransformerLens users write this loop themselves).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from uniprobe.hooks.adapters import adapter_for
from uniprobe.hooks.adapters.base import Adapter, ModelInputs, Site, get_module
from uniprobe.hooks.attention import attention_geometry, attention_path, z_site
from uniprobe.hooks.calls import transformers_version
from uniprobe.hooks.errors import UniprobeError
from uniprobe.hooks.hookset import HookSet
from uniprobe.probes.patching.engine import (
    DEFAULT_BUDGET,
    Forward,
    Metric,
    collect_states,
    evaluate,
    forward_of,
    repeat_inputs,
)
from uniprobe.probes.patching.exact import DIRECTIONS, prepare_metric
from uniprobe.probes.patching.metrics import metric_name
from uniprobe.probes.patching.results import normalise

Head = tuple[int, int]  # (layer, head)
PROJ = {"q": "q_proj", "k": "k_proj", "v": "v_proj"}


@dataclass(frozen=True)
class Receivers:
    """Where a sender's effect is allowed to arrive.

    Either ``heads`` (``(layer, head)`` pairs) with ``inputs`` among ``"q"``, ``"k"``, ``"v"``, or ``layer``:
    the stream entering block ``layer`` (``blocks.{layer}.resid_pre``). ``positions``: the positions whose
    inputs are patched (``None``: all), e.g. the drawing positions.
    """

    heads: tuple[Head, ...] = ()
    inputs: tuple[str, ...] = ("q", "k", "v")
    layer: int | None = None
    positions: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if bool(self.heads) == (self.layer is not None):
            raise UniprobeError(
                "Receivers: give heads=((layer, head), ...) or layer=N (the stream), exactly one"
            )
        bad = [i for i in self.inputs if i not in PROJ]
        if bad or not self.inputs:
            raise UniprobeError(f"Receivers: inputs must be among 'q', 'k', 'v', got {list(self.inputs)}")

    def sites(self, model: nn.Module, adapter: Adapter) -> list[tuple[Site, int | None, int]]:
        """``(module site, head slice index or None, n slices)`` of every receiver input."""
        if self.layer is not None:
            return [(adapter.site(model, f"blocks.{self.layer}.resid_pre"), None, 1)]
        out = []
        for layer, head in self.heads:
            geo = attention_geometry(model, adapter, layer)
            if not 0 <= head < geo.n_heads:
                raise UniprobeError(f"receiver head ({layer}, {head}): layer {layer} has {geo.n_heads} heads")
            for name in self.inputs:
                path = f"{attention_path(adapter, layer)}.{PROJ[name]}"
                if not isinstance(_module(model, path), nn.Linear):
                    raise UniprobeError(
                        f"{path} is not an nn.Linear (transformers {transformers_version()}): path patching "
                        "needs q_proj/k_proj/v_proj projections"
                    )
                n, idx = (geo.n_heads, head) if name == "q" else (geo.n_kv_heads, head // geo.groups)
                out.append((Site(path, "output"), idx, n))
        return list(dict.fromkeys(out))  # GQA: two query heads of one group share a k/v receiver


def _module(model: nn.Module, path: str) -> nn.Module:
    try:
        return get_module(model, path)
    except AttributeError as err:
        raise UniprobeError(f"no module {path!r} for a path-patching receiver: {err}") from err


def every_head(
    model: nn.Module, adapter: Adapter | None = None, layers: Sequence[int] | None = None
) -> list[list[Head]]:
    """One sender set per ``layer × head`` (each a single head)."""
    adapter = adapter or adapter_for(model)
    layers = range(adapter.n_layers(model)) if layers is None else layers
    return [
        [(layer, h)] for layer in layers for h in range(attention_geometry(model, adapter, layer).n_heads)
    ]


@dataclass
class PathResult:
    """``values [n_sets]``: the metric with each sender set patched through the receivers only."""

    values: torch.Tensor
    senders: list[list[Head]]
    receivers: Receivers
    clean: float
    corrupted: float
    direction: str
    metric: str
    seconds: float
    info: dict = field(default_factory=dict)

    @property
    def normalised(self) -> torch.Tensor:
        """``(value − corrupted) / (clean − corrupted)``."""
        return normalise(self.values, self.clean, self.corrupted)

    def to_dict(self) -> dict[str, Any]:
        r = self.receivers
        return {
            "values": self.values.tolist(), "normalised": self.normalised.tolist(),
            "senders": [[list(h) for h in s] for s in self.senders],
            "receivers": {"heads": [list(h) for h in r.heads], "inputs": list(r.inputs), "layer": r.layer,
                          "positions": None if r.positions is None else list(r.positions)},
            "baselines": {"clean": self.clean, "corrupted": self.corrupted}, "direction": self.direction,
            "metric": self.metric, "seconds": self.seconds, "info": self.info,
        }  # fmt: skip


# -- the hooks of the two passes ------------------------------------------------------------------------


class _sender_pass(HookSet):  # noqa: N801
    """Write every layer's ``z`` (and ``mlp_out`` when frozen) for ``n`` sender sets × ``B`` rows; record
    the receivers' inputs."""

    def __init__(self, model, adapter, sets, z_src, z_tgt, mlp_tgt, receivers) -> None:  # noqa: ANN001
        super().__init__()
        self.model, self.adapter, self.sets = model, adapter, sets
        self.z_src, self.z_tgt, self.mlp_tgt, self.receivers = z_src, z_tgt, mlp_tgt, receivers
        self.recorded: dict[Site, torch.Tensor] = {}

    def install(self) -> None:
        n = len(self.sets)
        for layer, tgt in enumerate(self.z_tgt):
            b, pos, width = tgt.shape
            z = tgt.repeat(n, 1, 1)
            n_h = attention_geometry(self.model, self.adapter, layer).n_heads
            heads = z.view(n * b, pos, n_h, width // n_h)
            src = self.z_src[layer].view(-1, pos, n_h, width // n_h)
            for i, senders in enumerate(self.sets):
                for sl, h in senders:
                    if sl == layer:
                        heads[i * b : (i + 1) * b, :, h] = src[:, :, h]
            self.write(self.model, z_site(self.adapter, layer), _constant(z))
        for layer, mlp in enumerate(self.mlp_tgt):
            site = self.adapter.site(self.model, f"blocks.{layer}.mlp_out")
            self.write(self.model, site, _constant(mlp.repeat(n, 1, 1)))
        for site, _, _ in self.receivers:
            self.read(
                self.model, site, lambda t, site=site: self.recorded.__setitem__(site, t.detach().clone())
            )


def _constant(value: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    def write(t: torch.Tensor) -> torch.Tensor:
        if t.shape != value.shape:
            raise UniprobeError(
                f"path patching: a frozen tensor of shape {tuple(value.shape)} met {tuple(t.shape)}"
            )
        return value.to(t.dtype)

    return write


class _receiver_pass(HookSet):  # noqa: N801
    """Overwrite the receivers' inputs (their head slice, at ``positions``) with recorded values."""

    def __init__(self, model, receivers, recorded, positions) -> None:  # noqa: ANN001
        super().__init__()
        self.model, self.receivers, self.recorded, self.positions = model, receivers, recorded, positions

    def install(self) -> None:
        for site, idx, n in self.receivers:
            self.write(self.model, site, self._writer(self.recorded[site], idx, n))

    def _writer(self, value: torch.Tensor, idx: int | None, n: int) -> Callable[[torch.Tensor], torch.Tensor]:
        cols = self.positions

        def write(t: torch.Tensor) -> torch.Tensor:
            out = t.clone()
            o, v = out.view(*out.shape[:2], n, -1), value.to(t.dtype).view(*value.shape[:2], n, -1)
            sel = slice(None) if idx is None else idx
            if cols is None:
                o[:, :, sel] = v[:, :, sel]
            else:
                o[:, cols, sel] = v[:, cols, sel]
            return out

        return write


# -- the sweep and its reference ------------------------------------------------------------------------


def _prepare(model, adapter, clean, corrupted, direction, metric, forward, freeze_mlps):  # noqa: ANN001, ANN202
    if direction not in DIRECTIONS:
        raise UniprobeError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    n_layers = adapter.n_layers(model)
    z_points = [f"blocks.{i}.attn.z" for i in range(n_layers)]
    mlp_points = [f"blocks.{i}.mlp_out" for i in range(n_layers)] if freeze_mlps else []
    source_in, target_in = (clean, corrupted) if direction == "denoise" else (corrupted, clean)
    src_out, src = collect_states(model, adapter, source_in, z_points, forward)
    tgt_out, tgt = collect_states(model, adapter, target_in, z_points + mlp_points, forward)
    if src[z_points[0]].shape != tgt[z_points[0]].shape:
        raise UniprobeError(
            "path patching needs clean and corrupted runs of one shape, got "
            f"{tuple(src[z_points[0]].shape)} and {tuple(tgt[z_points[0]].shape)} at {z_points[0]}"
        )
    clean_out, corrupted_out = (src_out, tgt_out) if direction == "denoise" else (tgt_out, src_out)
    prepare_metric(metric, clean_out)
    b = tgt[z_points[0]].shape[0]
    base = (float(evaluate(metric, clean_out, b).mean()), float(evaluate(metric, corrupted_out, b).mean()))
    z_src, z_tgt = [src[p] for p in z_points], [tgt[p] for p in z_points]
    return target_in, z_src, z_tgt, [tgt[p] for p in mlp_points], base


def _check_senders(senders: Sequence[Sequence[Head]], model: nn.Module, adapter: Adapter) -> list[list[Head]]:
    sets = [[(int(layer), int(h)) for layer, h in s] for s in senders]
    for s in sets:
        if not s:
            raise UniprobeError("path patching: an empty sender set")
        for layer, h in s:
            n_h = attention_geometry(model, adapter, layer).n_heads
            if not 0 <= h < n_h:
                raise UniprobeError(f"sender head ({layer}, {h}): layer {layer} has {n_h} heads")
    return sets


@torch.no_grad()
def path_patch(
    model: nn.Module,
    clean: ModelInputs,
    corrupted: ModelInputs,
    senders: Sequence[Sequence[Head]],
    receivers: Receivers,
    metric: Metric,
    *,
    direction: str = "noise",
    freeze_mlps: bool = False,
    adapter: Adapter | None = None,
    forward: Forward | None = None,
    budget_bytes: int = DEFAULT_BUDGET,
) -> PathResult:
    """Each sender set's effect through ``receivers`` only, batched (see the module docstring).

    Args:
        senders: sender sets, each a list of ``(layer, head)`` (e.g. :func:`every_head`).
        direction: ``"noise"`` (source = corrupted, target = clean; the default of path patching) or
            ``"denoise"``.
    Returns:
        :class:`PathResult` with ``values [n_sets]`` (batch mean) and both baselines.
    """
    t0 = time.perf_counter()
    adapter = adapter or adapter_for(model)
    fwd = forward_of(adapter, forward)
    sets = _check_senders(senders, model, adapter)
    recv = receivers.sites(model, adapter)
    target, z_src, z_tgt, mlp_tgt, (clean_v, corrupted_v) = _prepare(
        model, adapter, clean, corrupted, direction, metric, forward, freeze_mlps
    )
    b = z_tgt[0].shape[0]
    row_bytes = sum(z.numel() for z in z_tgt + mlp_tgt) * 4 * 4 // b  # frozen tensors + activations
    per_chunk = max(1, budget_bytes // max(1, row_bytes * b))
    cols = None if receivers.positions is None else list(receivers.positions)
    values, forwards = torch.empty(len(sets)), 0
    for k in range(0, len(sets), per_chunk):
        chunk = sets[k : k + per_chunk]
        rows = repeat_inputs(target, len(chunk))
        with _sender_pass(model, adapter, chunk, z_src, z_tgt, mlp_tgt, recv) as first:
            fwd(model, rows)
        with _receiver_pass(model, recv, first.recorded, cols):
            out = fwd(model, rows)
        values[k : k + len(chunk)] = evaluate(metric, out, len(chunk) * b).view(len(chunk), b).mean(1)
        forwards += 2
    return PathResult(
        values, sets, receivers, clean_v, corrupted_v, direction, metric_name(metric),
        time.perf_counter() - t0, {"forwards": forwards, "freeze_mlps": freeze_mlps, "rows": len(sets) * b},
    )  # fmt: skip


@torch.no_grad()
def path_patch_reference(
    model: nn.Module,
    clean: ModelInputs,
    corrupted: ModelInputs,
    senders: Sequence[Sequence[Head]],
    receivers: Receivers,
    metric: Metric,
    *,
    direction: str = "noise",
    freeze_mlps: bool = False,
    adapter: Adapter | None = None,
    forward: Forward | None = None,
) -> torch.Tensor:
    """The definition: per sender set, a hooked sender pass then a hooked receiver pass → ``[n_sets]``."""
    adapter = adapter or adapter_for(model)
    fwd = forward_of(adapter, forward)
    sets = _check_senders(senders, model, adapter)
    recv = receivers.sites(model, adapter)
    target, z_src, z_tgt, mlp_tgt, _ = _prepare(
        model, adapter, clean, corrupted, direction, metric, forward, freeze_mlps
    )
    cols = None if receivers.positions is None else list(receivers.positions)
    out = torch.empty(len(sets))
    for i, s in enumerate(sets):
        with HookSet() as hooks:
            recorded: dict[Site, torch.Tensor] = {}
            for layer in range(len(z_tgt)):
                n_h = attention_geometry(model, adapter, layer).n_heads
                z = z_tgt[layer].clone()
                for sl, h in s:
                    if sl == layer:
                        d = z.shape[-1] // n_h
                        z[..., h * d : (h + 1) * d] = z_src[layer][..., h * d : (h + 1) * d]
                hooks.write(model, z_site(adapter, layer), lambda t, z=z: z)
            for layer, mlp in enumerate(mlp_tgt):
                hooks.write(model, adapter.site(model, f"blocks.{layer}.mlp_out"), lambda t, mlp=mlp: mlp)
            for site, _, _ in recv:
                hooks.read(model, site, lambda t, site=site, rec=recorded: rec.__setitem__(site, t.clone()))
            fwd(model, target)
        with HookSet() as hooks:
            for site, idx, n in recv:
                hooks.write(model, site, _reference_writer(recorded[site], idx, n, cols))
            res = fwd(model, target)
        out[i] = evaluate(metric, res, z_tgt[0].shape[0]).mean()
    return out


def _reference_writer(value: torch.Tensor, idx: int | None, n: int, cols: list[int] | None) -> Callable:
    def write(t: torch.Tensor) -> torch.Tensor:
        out = t.clone()
        d = t.shape[-1] // n
        feats = slice(None) if idx is None else slice(idx * d, (idx + 1) * d)
        pos = slice(None) if cols is None else cols
        out[:, pos, feats] = value[:, pos, feats]
        return out

    return write
