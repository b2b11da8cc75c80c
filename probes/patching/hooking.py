"""Low-level hooks for patching: record tensors at points, overwrite site rows, skip early blocks.

Four context managers, each a :class:`uniprobe.hooks.hookset.HookSet` (so everything it installed
is removed on exit, also on error):

- :class:`record`: keep the tensor at each point (detached, or live for gradients).
- :class:`overwrite`: at each point, write ``values [m, *feat]`` into ``rows [m]`` × ``positions [m]``
  of the tensor the module reads or returns (one scatter through :mod:`uniprobe.probes.kernels`).
- :class:`stagger`: rows of one batch start at different blocks; each block computes only the
  rows that have started and carries the cached stream for the others — "resume from layer l"
  for many ``l`` in one forward.
- :class:`last_position`: position-wise modules compute only the last position (exact when
  nothing downstream reads the others).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from uniprobe.hooks.adapters.base import Adapter, get_module
from uniprobe.hooks.hookset import HookSet, input_tensor, pick, replace_input, replace_output
from uniprobe.probes import kernels


class record(HookSet):  # noqa: N801 — a context manager, like torch.no_grad
    """Keep the tensor at each point: ``rec[point]`` is a list, one entry per module call.

    With ``live=True`` tensors stay in the autograd graph (for ``torch.autograd.grad``) and the
    first block's input is made to require grad when it does not (frozen weights).
    """

    def __init__(self, model: nn.Module, adapter: Adapter, points: Iterable[str], live: bool = False) -> None:
        super().__init__()
        self.model, self.adapter, self.points, self.live = model, adapter, list(points), live
        self.values: dict[str, list[torch.Tensor]] = {p: [] for p in self.points}

    def install(self) -> None:
        if self.live:
            self.pre(get_module(self.model, f"{self.adapter.blocks}.0"), _require_grad)
        for point in self.points:
            store = self.values[point]
            keep = store.append if self.live else (lambda t, store=store: store.append(t.detach()))
            self.read(self.model, self.adapter.site(self.model, point), keep)

    def one(self, point: str) -> torch.Tensor:
        """The tensor at ``point``: its single call, or the value every call agreed on.

        Raises when the module did not run, or ran several times with different values (then
        "the state at this point" is ambiguous — e.g. generation steps: use
        :mod:`uniprobe.probes.patching.generation`).
        """
        got = self.values[point]
        if not got or any(g.shape != got[0].shape or not torch.equal(g, got[0]) for g in got[1:]):
            raise ValueError(
                f"expected one value at {point!r} per forward, saw {len(got)} different ones; "
                "patch a point that runs once (or run generation through uniprobe.probes.patching.generation)"
            )
        return got[0]

    def __getitem__(self, point: str) -> list[torch.Tensor]:
        return self.values[point]


def _require_grad(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    x = input_tensor(args, kwargs)
    if x.requires_grad or not torch.is_grad_enabled():
        return None
    return replace_input(args, kwargs, x.detach().requires_grad_(True))


class Plan:
    """What to write at one point: ``values [m, *feat]`` into ``rows [m]`` × ``positions [m]``.

    ``split`` > 1 (head sites): the tensor ``[batch, pos, split·f]`` is seen as ``[batch, pos·split, f]``
    and ``positions`` index that view (``p·split + head``), so one head's slice is written alone.
    """

    def __init__(
        self, rows: torch.Tensor, positions: torch.Tensor, values: torch.Tensor, split: int = 1
    ) -> None:
        self.rows, self.positions, self.values, self.split = rows, positions, values, split
        self.fired = 0

    def apply(self, t: torch.Tensor, force: str | None) -> torch.Tensor:
        """A patched copy of ``t [batch, pos, *feat]``."""
        out = t.clone(memory_format=torch.contiguous_format)
        flat = out.view(out.shape[0], out.shape[1] * self.split, -1)
        vals = self.values.reshape(self.values.shape[0], -1)
        kernels.scatter_rows(flat, vals, self.rows, self.positions, force=force)
        self.fired += 1
        return out


def _applier(plan: Plan, force: str | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``t -> plan.apply(t, force)``: a closure per plan."""
    return lambda t: plan.apply(t, force)


class overwrite(HookSet):  # noqa: N801
    """Apply :class:`Plan` s (point → plan) during the forwards run inside the context."""

    def __init__(
        self, model: nn.Module, adapter: Adapter, plans: dict[str, Plan], force: str | None = None
    ) -> None:
        super().__init__()
        self.model, self.adapter, self.plans, self.force = model, adapter, plans, force

    def install(self) -> None:
        for point, plan in self.plans.items():
            self.write(self.model, self.adapter.site(self.model, point), _applier(plan, self.force))

    def check_fired(self, times: int | None = 1) -> None:
        """Raise when a plan's module ran other than ``times`` times (``None``: at least once) —
        a patch that silently did nothing, or ran where resuming assumed it would not."""
        for point, plan in self.plans.items():
            if plan.fired == 0 or (times is not None and plan.fired != times):
                expected = "at least once" if times is None else f"{times} time(s)"
                raise RuntimeError(
                    f"the patch at {point!r} fired {plan.fired} times in the forward, expected {expected}: "
                    "its module is not on this forward's path (or runs more than once)"
                )


class stagger(HookSet):  # noqa: N801
    """Rows start at different blocks: block ``j`` computes rows ``[:active[j]]`` only.

    Rows are ordered by start block, so the rows that have started form a prefix. A block's
    other rows leave it holding ``carry(j)`` — the unpatched stream after block ``j``: the cached
    input of block ``j + 1`` (of the final norm after the last block) — so a row starting at
    block ``l`` enters it with the cached stream, as a plain forward would. Batched tensor
    arguments (see :func:`_cut`) are cut to the computed rows; so is each block's input.

    Args:
        active: per block, how many leading rows it computes (non-decreasing).
        carry: ``(j, n_rows) → [n_rows, pos, d]``, the stream of the ``n_rows`` rows not computed.
        templates: per block, its output in the cached run (to rebuild tuple outputs of skipped blocks).
    """

    def __init__(
        self,
        model: nn.Module,
        adapter: Adapter,
        active: Sequence[int],
        rows: int,
        carry: Callable[[int, int], torch.Tensor],
        templates: Sequence[Any],
    ) -> None:
        super().__init__()
        self.blocks = get_module(model, adapter.blocks)
        self.active, self.rows, self.carry, self.templates = list(active), rows, carry, templates

    def install(self) -> None:
        for j, m in enumerate(self.active):
            if m != self.rows:
                block = self.blocks[j]
                self.swap_forward(block, self._wrap(j, m, block.forward))

    def _wrap(self, j: int, m: int, original: Callable[..., Any]) -> Callable[..., Any]:
        rows, carry, template = self.rows, self.carry, self.templates[j]

        def forward(*args: Any, **kwargs: Any) -> Any:
            rest = carry(j, rows - m)
            if m == 0:
                return replace_output(template, 0, rest) if not isinstance(template, torch.Tensor) else rest
            out = original(*_cut(args, rows, m), **_cut(kwargs, rows, m))
            head = pick(out, 0)
            return replace_output(out, 0, torch.cat([head, rest.to(head.dtype)], dim=0))

        return forward


def _cut(value: Any, rows: int, m: int) -> Any:
    """``value`` with every batched tensor cut to its first ``m`` rows.

    Batched = at least 2-D with first dim ``rows`` (hidden states, masks ``[b, 1, q, k]``,
    position ids ``[b, q]``, rotary tables ``[b, q, d]``); 1-D tensors such as cache positions and
    broadcast ``[1, ...]`` tensors pass unchanged.
    """
    if isinstance(value, torch.Tensor):
        return value[:m] if value.dim() >= 2 and value.shape[0] == rows else value
    if isinstance(value, tuple):
        return tuple(_cut(v, rows, m) for v in value)
    if isinstance(value, list):
        return [_cut(v, rows, m) for v in value]
    if isinstance(value, dict):
        return {k: _cut(v, rows, m) for k, v in value.items()}
    return value


class last_position(HookSet):  # noqa: N801
    """The given position-wise modules compute only the last position of their ``[rows, length,
    d]`` input; the other positions get a broadcast copy of it.

    Exact for anything that reads only the last position downstream of the modules (the engine
    trims the final block's MLP when the metric reads only the last position's logits). A call
    with another input shape, or whose output is not a tensor, runs whole.
    """

    def __init__(self, modules: Sequence[nn.Module], length: int) -> None:
        super().__init__()
        self.modules, self.length = list(modules), length

    def install(self) -> None:
        for module in self.modules:
            self.swap_forward(module, self._wrap(module.forward))

    def _wrap(self, original: Callable[..., Any]) -> Callable[..., Any]:
        length = self.length

        def forward(*args: Any, **kwargs: Any) -> Any:
            x = args[0] if len(args) == 1 and not kwargs else None
            if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[1] != length or length < 2:
                return original(*args, **kwargs)
            out = original(x[:, -1:])
            if not isinstance(out, torch.Tensor) or out.shape[:2] != (x.shape[0], 1):
                return original(x)
            return out.expand(x.shape[0], length, *out.shape[2:])

        return forward
