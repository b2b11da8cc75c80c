"""Steering (activation addition): add ``alpha × direction`` at chosen points, positions and steps.

    d = probe_direction(results, "blocks.2.resid_post", "text", cls="4")     # or mean_difference / state_at
    out = steered_run(model, inputs, [Steer("blocks.2.resid_post", d, alpha=4.0, role="image_gen")])
    tokens = steered_generation(model, prompt, [Steer("blocks.1.resid_pre", d, 8.0, steps=range(1, 5))])
    res = steer_sweep(model, inputs, d, alphas=[0, 2, 4, 8], points=["blocks.0.resid_pre", ...], metric=m)
    res.values                                        # [point, alpha], the metric's batch mean

**Where.** A :class:`Steer` names a canonical hook point whose tensor is ``[batch, pos, d]`` (block points
``blocks.{i}.resid_pre|attn_out|mlp_out|resid_post``, a query model's ``queries`` / ``connector.out``),
the positions along dim 1 (absolute stream positions, a role of the inputs' layout, or every position),
the generation steps (``None``: every call), and the batch rows (``None``: every row, or only the
conditional branch of a classifier-free-guided generation, as for patching).

**Generation.** :func:`steered_generation` runs the adapter's own loop with the call tracker of
:mod:`uniprobe.hooks.calls` (step 0 = the prompt pass, step ``s`` = the pass feeding generated token
``s``): a steer with ``positions=None`` and ``steps=range(1, n)`` shifts every drawing position; one at
the ``<boi>`` position and ``steps=[0]`` shifts the prompt pass only. A query model draws in one forward:
steer role ``"query"`` with :func:`steered_run` / :func:`steer_sweep`.

**Sweeps** (:func:`~uniprobe.probes.attention.steer_sweep.steer_sweep`): ``points × alphas``
configurations run as the rows of a few forwards
(the batch repeated once per configuration, row ``c·B + b`` carrying configuration ``c``'s coefficient,
chunked by a memory budget); equal to a loop of :func:`steered_run` (tested), and ``alpha = 0`` rows equal
the plain run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from uniprobe.hooks.adapters import adapter_for
from uniprobe.hooks.adapters.base import Adapter, ModelInputs
from uniprobe.hooks.calls import CallLog, track_calls
from uniprobe.hooks.errors import UniprobeError
from uniprobe.hooks.hookset import HookSet
from uniprobe.hooks.layout import TokenLayout
from uniprobe.probes.patching.engine import (
    Forward,
    forward_of,
)

# -- directions ----------------------------------------------------------------------------------------


def probe_direction(results: Any, point: str, role: str, cls: Any = None) -> torch.Tensor:
    """A saved probe's unit direction ``[d]`` for class ``cls`` (:meth:`ProbeResults.direction`).

    ``cls=None`` is allowed for a probe with one weight row (binary) only; otherwise name the class.
    The weight lives in raw activation space (the probe's standardisation is folded in), so adding it
    moves the activation toward ``cls`` as the probe reads it.
    """
    readout = results.direction(point, role)
    if cls is None:
        if readout.weight.shape[0] != 1:
            raise UniprobeError(
                f"the probe at {point!r}/{role!r} has {readout.weight.shape[0]} classes {readout.classes}: "
                "pass cls= to pick the class to steer toward"
            )
        w = readout.weight[0]
        return (w / w.norm().clamp_min(1e-12)).float()
    return readout.unit(cls).float()


def mean_difference(
    store_a: Any, store_b: Any, point: str, role: str | list[str] | None = None, reduce: str | int = "last"
) -> torch.Tensor:
    """``mean(store_a) − mean(store_b)`` at ``point`` (each example reduced by :meth:`ActivationStore.matrix`)
    → ``[d]`` float32, not normalised (its norm is the typical distance between the two sets)."""
    a = store_a.matrix(point, role, reduce=reduce).values.float()
    b = store_b.matrix(point, role, reduce=reduce).values.float()
    if a.shape[1:] != b.shape[1:]:
        raise UniprobeError(
            f"the stores hold different feature shapes at {point!r}: {a.shape[1:]} vs {b.shape[1:]}"
        )
    return a.mean(0) - b.mean(0)


@torch.no_grad()
def state_at(
    model: nn.Module,
    inputs: ModelInputs,
    point: str,
    position: int,
    *,
    adapter: Adapter | None = None,
    forward: Forward | None = None,
) -> torch.Tensor:
    """A captured state as a direction: the tensor at ``point``, ``position`` → ``[d]`` (batch mean)."""
    from uniprobe.probes.patching.engine import collect_states

    adapter = adapter or adapter_for(model)
    _, states = collect_states(model, adapter, inputs, [point], forward)
    t = states[point]
    if not -t.shape[1] <= position < t.shape[1]:
        raise UniprobeError(f"position {position} is outside the run at {point!r} (0..{t.shape[1] - 1})")
    return t[:, position].float().mean(0)


def role_positions(layout: TokenLayout, role: str) -> list[int]:
    """Positions of ``role`` — the same in every example (steering shares positions across rows)."""
    mask = layout.mask(role)
    if not bool(mask.any()):
        present = [r for r, n in layout.counts().items() if n]
        raise UniprobeError(f"role {role!r} has no positions in these inputs (present: {', '.join(present)})")
    if not bool((mask == mask[:1]).all()):
        raise UniprobeError(
            f"role {role!r} sits at different positions in different examples; steer them one by one"
        )
    return list(layout.positions(0, role))


# -- steering hooks ------------------------------------------------------------------------------------


@dataclass
class Steer:
    """Add ``alpha × direction`` at ``point``.

    Attributes:
        point: canonical hook point with a ``[batch, pos, d]`` tensor.
        direction: ``[d]``.
        alpha: the coefficient (0 = no change).
        positions: absolute positions (dim 1), or ``None`` = every position of every call.
        role: instead of ``positions``: the positions of this role in the inputs' layout.
        steps: generation steps to steer (``None``: every call; a plain forward is step 0).
        rows: batch rows (``None``: all, or the conditional branch under classifier-free guidance).
    """

    point: str
    direction: torch.Tensor
    alpha: float = 1.0
    positions: Sequence[int] | None = None
    role: str | None = None
    steps: Sequence[int] | None = None
    rows: Sequence[int] | None = None
    applied: int = field(default=0, compare=False)

    def __post_init__(self) -> None:
        if self.positions is not None and self.role is not None:
            raise UniprobeError(f"steer at {self.point!r}: give positions or role, not both")
        if self.direction.dim() != 1:
            raise UniprobeError(
                f"steer at {self.point!r}: direction must be [d], got shape {tuple(self.direction.shape)}"
            )


class steering(HookSet):  # noqa: N801 — a context manager, like torch.no_grad
    """Apply :class:`Steer` s during the forwards (or generation) run inside the context.

    ``layout`` resolves roles; ``cond_rows``: under classifier-free guidance, the conditional rows
    (steered by default). Steps are tracked on block 0 (:func:`uniprobe.hooks.calls.track_calls`).
    """

    def __init__(
        self,
        model: nn.Module,
        steers: Sequence[Steer],
        *,
        adapter: Adapter | None = None,
        layout: TokenLayout | None = None,
        cond_rows: int | None = None,
        expect: str = "any",
    ) -> None:
        super().__init__()
        self.model, self.adapter = model, adapter or adapter_for(model)
        self.steers, self.cond_rows = list(steers), cond_rows
        self.log = CallLog(model, expect)
        self.where: list[list[int] | None] = []
        for s in self.steers:
            if s.role is not None:
                if layout is None:
                    raise UniprobeError(
                        f"steer at {s.point!r} names role {s.role!r}: pass the inputs' layout"
                    )
                self.where.append(role_positions(layout, s.role))
            else:
                self.where.append(None if s.positions is None else [int(p) for p in s.positions])

    def install(self) -> None:
        track_calls(self, self.model, self.adapter.blocks, self.log)
        for point in dict.fromkeys(s.point for s in self.steers):
            todo = [i for i, s in enumerate(self.steers) if s.point == point]
            self.write(self.model, self.adapter.site(self.model, point), self._adder(todo))

    def _adder(self, todo: list[int]) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda t: self._add(t, todo)

    def _add(self, t: torch.Tensor, todo: list[int]) -> torch.Tensor:
        call = self.log.last
        step, offset = (call.step, call.offset) if call else (0, 0)
        out = None
        for i in todo:
            s, where = self.steers[i], self.where[i]
            if s.steps is not None and step not in s.steps:
                continue
            if t.shape[-1] != s.direction.shape[0]:
                raise UniprobeError(
                    f"steer at {s.point!r}: direction has {s.direction.shape[0]} dims, "
                    f"the tensor {t.shape[-1]}"
                )
            cols = (
                list(range(t.shape[1]))
                if where is None
                else [p - offset for p in where if 0 <= p - offset < t.shape[1]]
            )
            if not cols:
                continue
            rows = list(s.rows) if s.rows is not None else list(range(self.cond_rows or t.shape[0]))
            out = t.clone() if out is None else out
            delta = (s.alpha * s.direction).to(out.dtype).to(out.device)
            r, c = (
                torch.tensor(rows, device=out.device)[:, None],
                torch.tensor(cols, device=out.device)[None, :],
            )
            out[r, c] = out[r, c] + delta
            s.applied += 1
        return t if out is None else out

    def check_applied(self) -> None:
        """Raise when a steer never applied (its point never ran, or its positions/steps never came)."""
        missed = [s for s in self.steers if s.applied == 0]
        if missed:
            steps = sorted({c.step for c in self.log.calls})
            raise UniprobeError(
                f"{len(missed)} steer(s) never applied (e.g. {missed[0].point!r}, positions "
                f"{missed[0].positions or missed[0].role}, steps {missed[0].steps}); the run had steps "
                f"{steps[0] if steps else '-'}..{steps[-1] if steps else '-'}"
            )


@torch.no_grad()
def steered_run(
    model: nn.Module,
    inputs: ModelInputs,
    steers: Sequence[Steer],
    *,
    adapter: Adapter | None = None,
    forward: Forward | None = None,
) -> Any:
    """One forward of ``inputs`` with ``steers`` applied → the model's outputs."""
    adapter = adapter or adapter_for(model)
    for s in steers:
        s.applied = 0
    with steering(model, steers, adapter=adapter, layout=inputs.layout) as st:
        out = forward_of(adapter, forward)(model, inputs)
    st.check_applied()
    return out


@torch.no_grad()
def steered_generation(
    model: nn.Module,
    inputs: ModelInputs,
    steers: Sequence[Steer],
    *,
    adapter: Adapter | None = None,
    generate: Callable[..., Any] | None = None,
    **generate_kwargs: Any,
) -> Any:
    """The adapter's image generation (or ``generate(model, inputs, **kw)``) with ``steers`` → its tokens."""
    adapter = adapter or adapter_for(model)
    gen = generate or adapter.generate
    if gen is None:
        raise UniprobeError(f"the {adapter.name!r} adapter has no generation; pass generate=...")
    for s in steers:
        s.applied = 0
    cond = inputs.kwargs["input_ids"].shape[0] if adapter.generation_cfg else None
    expect = "generation" if generate is None else "any"
    with steering(model, steers, adapter=adapter, layout=inputs.layout, cond_rows=cond, expect=expect) as st:
        tokens = gen(model, inputs, **generate_kwargs)
    st.check_applied()
    return tokens
