"""Attention hook points and their capture: ``blocks.{i}.attn.{q,k,v,scores,pattern,z,head_out}``.

Per block ``i`` (shapes per captured row = one *query* position; ``h`` heads, ``h_kv`` key/value heads):

- ``q`` ``[h, d_head]``, ``k`` / ``v`` ``[h_kv, d_head]``: what the attention function receives (after
  q/k norms and RoPE) at the row's own position — the keys/values this call adds to the cache.
- ``pattern`` ``[h, n_keys]``: softmax weights from the row's query to the selected keys; ``scores``:
  the same before the softmax, mask added (dtype min where masked). Both are recomputed from q and k as
  eager attention does (:mod:`uniprobe.hooks.attention`), whatever kernel the model runs.
- ``z`` ``[h, d_head]``: the input of ``o_proj`` split by head; ``head_out`` ``[h, d_model]``: each head's
  contribution to ``attn_out`` (their sum plus ``o_proj`` 's bias is ``attn_out``).

**Both axes are selected.** Rows (queries) are chosen as for every point, by ``roles`` / ``positions``
(e.g. ``roles=["image_gen"]``). Keys are chosen by ``key_roles`` or ``key_positions`` — so a 576-token
image over 30 layers is kept only where asked:

- ``key_roles=["text", "cot"]``: the pattern's columns are the *attention mass* on each listed role
  (sum of the weights over the keys of that role, ``[h, n_roles]``); every example has the same
  columns whatever its length or padding, so this is the form to put in an :class:`ActivationStore`.
- ``key_positions=[...]``: per-key weights at those absolute positions (for maps), ``[h, n_positions]``;
  a key that does not exist yet in a call (a generated position still to come) is NaN.
- neither: per-key weights at every position of the layout (``0 .. layout.length − 1``; the first
  call's keys without a layout). During generation pass ``key_positions`` covering the generated
  positions to see them.

``scores`` take ``key_positions`` only (a sum of logits is not a quantity). ``Captured.key_columns``
names each point's columns (``"role:text"`` or ``"pos:7"``). During generation every call is tagged
by step and guidance branch like any other point.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from uniprobe.hooks.adapters.base import Adapter, Site
from uniprobe.hooks.attention import (
    AttnCall,
    attention_module,
    head_outputs,
    intercept_attention,
    split_heads,
    z_site,
)
from uniprobe.hooks.errors import UsageError
from uniprobe.hooks.hookset import HookSet
from uniprobe.hooks.layout import role_ids

ATTN_KINDS: tuple[str, ...] = ("q", "k", "v", "scores", "pattern", "z", "head_out")
INTERCEPTED: frozenset[str] = frozenset({"q", "k", "v", "scores", "pattern"})
_POINT = re.compile(r"^blocks\.(\d+)\.attn\.(\w+)$")


def attention_points(n_layers: int) -> list[str]:
    """Every attention point of a model with ``n_layers`` blocks, in execution order."""
    return [f"blocks.{i}.attn.{k}" for i in range(n_layers) for k in ATTN_KINDS]


def parse_attention_point(point: str) -> tuple[int, str] | None:
    """``"blocks.3.attn.pattern"`` → ``(3, "pattern")``; None for other points."""
    m = _POINT.match(point)
    if m and m.group(2) in ATTN_KINDS:
        return int(m.group(1)), m.group(2)
    return None


def attention_site(model: nn.Module, adapter: Adapter, point: str) -> Site:
    """The module site of ``z`` / ``head_out`` (the ``o_proj`` input); the intercepted kinds have none."""
    layer, kind = parse_attention_point(point) or (None, "")
    if layer is None:
        raise UsageError(f"{point!r} is not an attention point (blocks.N.attn.{{{', '.join(ATTN_KINDS)}}})")
    attention_module(model, adapter, layer)  # checks the layer and the module's form
    if kind in INTERCEPTED:
        raise UsageError(
            f"{point!r} is computed inside the attention function, not at a module's input or output; "
            "read it with uniprobe.capture (it intercepts the attention call) or "
            "uniprobe.hooks.attention.intercept_attention"
        )
    return z_site(adapter, layer)


class KeyColumns:
    """The key columns of pattern/scores rows: roles (mass per role) or absolute positions."""

    def __init__(self, key_roles: Iterable[str] | None, key_positions: Iterable[int] | None) -> None:
        if key_roles is not None and key_positions is not None:
            raise UsageError("pass key_roles (attention mass per role) or key_positions (per key), not both")
        self.roles = None if key_roles is None else list(key_roles)
        if self.roles is not None:
            if not self.roles:
                raise UsageError("key_roles is empty: name at least one role, or pass None for every key")
            role_ids(self.roles)
        self.positions = None if key_positions is None else [int(p) for p in key_positions]
        if self.positions is not None and (not self.positions or min(self.positions) < 0):
            raise UsageError(f"key_positions must be non-empty and >= 0, got {self.positions[:8]}")

    def names(self) -> list[str]:
        if self.roles is not None:
            return [f"role:{r}" for r in self.roles]
        return [f"pos:{p}" for p in self.positions or []]

    def select(self, weights: torch.Tensor, roles: torch.Tensor | None, mass: bool) -> torch.Tensor:
        """``[b, h, q, k]`` → ``[b, q, h, n_cols]``; ``roles`` ``[b, k]`` are the keys' roles."""
        if self.roles is not None:
            if not mass:
                raise UsageError("scores take key_positions only (a sum of pre-softmax scores is not a mass)")
            if roles is None:
                raise UsageError("key_roles needs a layout (TokenLayout) for the batch")
            onehot = (roles[:, :, None] == torch.tensor(role_ids(self.roles))[None, None]).to(weights.dtype)
            cols = torch.einsum("bhqk,bkr->bqhr", weights, onehot.to(weights.device))
            return cols
        assert self.positions is not None
        k = weights.shape[-1]
        pos = torch.tensor(self.positions, device=weights.device)
        inside = pos < k
        out = torch.full((*weights.shape[:-1], len(self.positions)), float("nan"), dtype=weights.dtype)
        out = out.to(weights.device)
        out[..., inside] = weights[..., pos[inside]]
        return out.transpose(1, 2)


def install_attention_capture(
    hooks: HookSet,
    model: nn.Module,
    adapter: Adapter,
    result: Any,
    points: Sequence[str],
    key_roles: Iterable[str] | None = None,
    key_positions: Iterable[int] | None = None,
) -> list[str]:
    """Register, in ``hooks``, what records the attention ``points`` into ``result`` (a
    :class:`~uniprobe.hooks.capture.Captured`); returns the attention points handled."""
    chosen = [(p, parse_attention_point(p)) for p in points]
    chosen = [(p, lk) for p, lk in chosen if lk is not None]
    if not chosen:
        return []
    if key_positions is None and key_roles is None:
        layout = result.layout
        key_positions = range(layout.length) if layout is not None else None
    keys = KeyColumns(key_roles, key_positions)
    result.key_columns = {}
    intercepted: dict[int, list[tuple[str, str]]] = {}
    for point, (layer, kind) in chosen:
        if kind in INTERCEPTED:
            intercepted.setdefault(layer, []).append((point, kind))
            if kind in ("pattern", "scores"):
                if kind == "scores" and keys.roles is not None:
                    raise UsageError(f"{point}: scores take key_positions only, not key_roles {keys.roles}")
                result.key_columns[point] = keys.names()
        else:
            module = attention_module(model, adapter, layer)
            hooks.read(model, z_site(adapter, layer), _z_adder(result, point, kind, module))
    if intercepted:
        hooks.hold(
            intercept_attention(model, adapter, list(intercepted), _callback(result, intercepted, keys))
        )
    return [p for p, _ in chosen]


def _z_adder(result: Any, point: str, kind: str, module: nn.Module) -> Callable[[torch.Tensor], None]:
    n_heads = module.o_proj.in_features // int(module.head_dim)

    def add(z: torch.Tensor) -> None:
        z = split_heads(z.detach(), n_heads)
        result.add(point, z if kind == "z" else head_outputs(z, module.o_proj))

    return add


def _callback(result: Any, per_layer: dict[int, list[tuple[str, str]]], keys: KeyColumns) -> Callable:
    def on_call(call: AttnCall) -> None:
        todo = per_layer.get(call.layer)
        if not todo:
            return
        if keys.positions is None and keys.roles is None:  # no layout: the first call's keys
            keys.positions = list(range(call.key.shape[-2]))
            for point, kind in todo:
                if kind in ("pattern", "scores"):
                    result.key_columns[point] = keys.names()
        q = call.query.shape[-2]
        for point, kind in todo:
            if kind == "q":
                result.add(point, call.query.detach().transpose(1, 2))
            elif kind in ("k", "v"):
                t = call.key if kind == "k" else call.value
                result.add(point, t.detach()[:, :, -q:].transpose(1, 2))
            else:
                w = call.pattern() if kind == "pattern" else call.scores()
                result.add(point, keys.select(w.detach(), _key_roles(result, call), kind == "pattern"))

    return on_call


def _key_roles(result: Any, call: AttnCall) -> torch.Tensor | None:
    """``[rows, k]`` roles of the call's keys (rows mapped to examples as capture does), or None."""
    if result.layout is None:
        return None
    roles = result.layout.roles_at(0, call.key.shape[-2])
    rows = call.query.shape[0]
    b = result.cfg_batch or rows
    return roles[torch.arange(rows) % b] if roles.shape[0] != rows else roles


__all__ = [
    "ATTN_KINDS",
    "INTERCEPTED",
    "KeyColumns",
    "attention_points",
    "attention_site",
    "install_attention_capture",
    "parse_attention_point",
]
