"""Batched steering sweeps: ``points × alphas`` configurations as the rows of a few forwards.

Row ``c·B + b`` of a chunk carries configuration ``c`` (its point, its alpha) for example ``b``; each
row starts at its point's block on the cached plain run (the patching engine's ``stagger``, exact for the
decoder stacks served), so early layers run once. Equal to a loop of
:func:`~uniprobe.probes.attention.steering.steered_run` (tested).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file
from torch import nn
from uniprobe.hooks.adapters import adapter_for
from uniprobe.hooks.adapters.base import Adapter, ModelInputs
from uniprobe.hooks.errors import UniprobeError
from uniprobe.hooks.hookset import HookSet
from uniprobe.hooks.jsonio import read_json, write_json
from uniprobe.hooks.results_io import SavedFiles, result_dir, result_file
from uniprobe.hooks.store.files import save_safetensors
from uniprobe.probes.attention.steering import role_positions
from uniprobe.probes.patching.cached_run import cached_run
from uniprobe.probes.patching.engine import (
    DEFAULT_BUDGET,
    Forward,
    Metric,
    evaluate,
    forward_of,
    repeat_inputs,
    resumed_rows,
    start_layer,
)
from uniprobe.probes.patching.metrics import metric_name
from uniprobe.probes.patching.sites import PatchSite

# -- batched sweeps over alpha × points -----------------------------------------------------------------


@dataclass
class SteerResult:
    """A steering sweep: ``values [point, alpha]`` (the metric's mean over the batch) and the plain run's.

    Attributes:
        points, alphas: the axes; ``plain``: the metric without steering.
        info: forwards, rows, strategy (``"resume"``: each row started at its point's block).
    """

    values: torch.Tensor
    points: list[str]
    alphas: list[float]
    plain: float
    metric: str
    seconds: float
    info: dict = field(default_factory=dict)

    def save(self, out: str | os.PathLike) -> SavedFiles:
        """Write ``steer.json`` (:meth:`to_dict`) and ``steer.safetensors`` (``values [point, alpha]``)."""
        out = result_dir(out)
        files = {"json": out / "steer.json", "tensors": out / "steer.safetensors"}
        write_json(files["json"], self.to_dict())
        save_safetensors(files["tensors"], {"values": self.values.contiguous()}, what="steering values")
        return SavedFiles(out, files)

    @classmethod
    def load(cls, out: str | os.PathLike) -> SteerResult:
        """Read what :meth:`save` wrote (the exact ``values`` from the safetensors file)."""
        doc = read_json(result_file(out, "steer.json"))
        values = load_file(str(result_file(out, "steer.safetensors")))["values"]
        return cls(
            values, doc["points"], doc["alphas"], doc["plain"], doc["metric"], doc["seconds"], doc["info"]
        )

    def to_dict(self) -> dict:
        return {
            "values": self.values.tolist(), "points": self.points, "alphas": self.alphas, "plain": self.plain,
            "metric": self.metric, "seconds": self.seconds, "info": self.info,
        }  # fmt: skip


class _row_steer(HookSet):  # noqa: N801
    """Per-row steering: at ``point``, row ``r`` gets ``coef[point][r] × direction`` at ``cols``
    (rows past a cut block's computed prefix are carried and get nothing)."""

    def __init__(
        self,
        model: nn.Module,
        adapter: Adapter,
        coef: dict[str, torch.Tensor],
        direction: dict[str, torch.Tensor],
        cols: list[int] | None,
    ) -> None:
        super().__init__()
        self.model, self.adapter, self.coef, self.direction, self.cols = model, adapter, coef, direction, cols
        self.fired: dict[str, int] = dict.fromkeys(coef, 0)

    def install(self) -> None:
        for point, coef in self.coef.items():
            self.write(self.model, self.adapter.site(self.model, point), self._adder(point, coef))

    def _adder(self, point: str, coef: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        def add(t: torch.Tensor) -> torch.Tensor:
            self.fired[point] += 1
            d = self.direction[point].to(t.device, t.dtype)
            if d.shape[0] != t.shape[-1]:
                raise UniprobeError(
                    f"steer at {point!r}: direction has {d.shape[0]} dims, the tensor {t.shape[-1]}"
                )
            c = coef[: t.shape[0]].to(t.device, t.dtype)[:, None, None] * d
            out = t.clone()
            if self.cols is None:
                return out + c
            out[:, self.cols] = out[:, self.cols] + c
            return out

        return add


@torch.no_grad()
def steer_sweep(
    model: nn.Module,
    inputs: ModelInputs,
    direction: torch.Tensor | dict[str, torch.Tensor],
    alphas: Sequence[float],
    points: Sequence[str],
    metric: Metric,
    *,
    positions: Sequence[int] | None = None,
    role: str | None = None,
    adapter: Adapter | None = None,
    forward: Forward | None = None,
    budget_bytes: int = DEFAULT_BUDGET,
    resume: bool = True,
) -> SteerResult:
    """The metric with ``alpha × direction`` added at each point (a ``[batch, pos, d]`` tensor).

    Returns :class:`SteerResult` with ``values [point, alpha]``.

    Every ``(point, alpha)`` is a configuration; configurations run as rows of one forward per chunk
    (``budget_bytes`` of activations), each row resumed from its point's block on the cached plain run
    (``resume``; exact, as for patching — see :mod:`uniprobe.probes.patching.engine`). ``positions`` /
    ``role`` choose the steered positions (default: all). ``direction``: one ``[d]`` for every point, or a
    dict point → ``[d]`` (e.g. each point's own state difference).
    """
    t0 = time.perf_counter()
    adapter = adapter or adapter_for(model)
    if positions is not None and role is not None:
        raise UniprobeError("steer_sweep: give positions or role, not both")
    cols = (
        role_positions(inputs.layout, role)
        if role is not None
        else (None if positions is None else list(positions))
    )
    points, alphas = list(points), [float(a) for a in alphas]
    if not points or not alphas:
        raise UniprobeError("steer_sweep needs at least one point and one alpha")
    if isinstance(direction, dict):
        missing = [p for p in points if p not in direction]
        if missing:
            raise UniprobeError(f"steer_sweep: no direction for {missing[0]!r}; have {', '.join(direction)}")
        directions = {p: direction[p].float() for p in points}
    else:
        directions = dict.fromkeys(points, direction.float())
    fwd = forward_of(adapter, forward)
    tr = cached_run(model, adapter, inputs, forward, points)
    b = tr.batch
    plain = float(evaluate(metric, tr.outputs, b).mean())
    configs = [(p, a) for p in points for a in alphas]
    starts = [start_layer(PatchSite(p, (0,)), tr, resume) for p, _ in configs]
    per_chunk = max(1, budget_bytes // (tr.row_bytes * b))
    order = sorted(range(len(configs)), key=lambda i: starts[i])
    values = torch.empty(len(configs))
    chunks = 0
    for k in range(0, len(order), per_chunk):
        part = order[k : k + per_chunk]
        n = len(part)
        coef = {p: torch.zeros(n * b) for p in dict.fromkeys(configs[i][0] for i in part)}
        for row, i in enumerate(part):
            coef[configs[i][0]][row * b : (row + 1) * b] = configs[i][1]
        with (
            resumed_rows(model, adapter, tr, n, [starts[i] for i in part], None),
            _row_steer(model, adapter, coef, directions, cols) as rs,
        ):
            out = fwd(model, repeat_inputs(inputs, n))
        unfired = [p for p, c in rs.fired.items() if c == 0]
        if unfired:
            raise UniprobeError(f"steer_sweep: the module of {unfired[0]!r} did not run in the forward")
        values[part] = evaluate(metric, out, n * b).view(n, b).mean(1)
        chunks += 1
    return SteerResult(
        values=values.view(len(points), len(alphas)), points=points, alphas=alphas, plain=plain,
        metric=metric_name(metric), seconds=time.perf_counter() - t0,
        info={"forwards": chunks, "rows": len(configs) * b, "reason": tr.reason,
              "strategy": "resume" if resume and tr.resumable else "full"},
    )  # fmt: skip
