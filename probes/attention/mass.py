"""Attention mass: how much attention a set of query roles puts on a set of key roles, per layer and head.

    table = mass_table(model, inputs, query_roles=["image_gen"], key_roles=["cot"])   # [layer, head]
    table.values, table.save(out), table.figure()
    metric = AttentionMass([5], ["image_gen"], ["cot"])                          # a patching metric
    knockout_sweep(model, inputs, kos, metric)              # the mass left after each knockout

For one example, layer and head: the mean over its selected query positions of the summed attention
weight on its selected key positions (0 = never looks there, 1 = looks nowhere else). Weights come from
the attention-function interception (:mod:`uniprobe.hooks.attention`): recomputed from q and k as eager
attention does, whatever kernel the model runs.

As a metric (``outputs → [rows]``) the mass is measured *during* the forward, so the forward must run
through :meth:`AttentionMass.wrap`; the knockout sweep does this itself, a patching sweep takes
``forward=metric.wrap(adapter.run)`` and ``resume=False`` (a resumed forward skips some rows at the
measured layer).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from uniprobe.hooks.adapters import adapter_for
from uniprobe.hooks.adapters.base import Adapter, ModelInputs
from uniprobe.hooks.attention import AttnCall, intercept_attention
from uniprobe.hooks.errors import UsageError
from uniprobe.hooks.jsonio import read_json, write_json
from uniprobe.hooks.layout import TokenLayout, role_ids
from uniprobe.hooks.results_io import SavedFiles, result_dir, result_file
from uniprobe.hooks.store.files import save_safetensors

Forward = Callable[[nn.Module, ModelInputs], Any]
_EVERY_ROW = (
    "the attention mass needs every row at every measured layer (a resumed patching forward skips rows "
    "and blocks; pass resume=False)"
)
JSON, TENSORS = "mass.json", "mass.safetensors"


def attention_mass(pattern: torch.Tensor, query_mask: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """``[b, h]``: mean over the selected queries of the weight on the selected keys.

    ``pattern`` ``[b, h, q, k]``; ``query_mask`` bool ``[b, q]``; ``key_mask`` bool ``[b, k]``. An example
    with no selected query gets NaN.
    """
    on_keys = (pattern.float() * key_mask[:, None, None, :].to(pattern.device)).sum(-1)  # [b, h, q]
    qm = query_mask.to(pattern.device).float()
    return (on_keys * qm[:, None, :]).sum(-1) / qm.sum(-1)[:, None]


def _masks(layout: TokenLayout, call: AttnCall, query_roles: Sequence[str], key_roles: Sequence[str]):
    """Bool ``[rows, q]`` / ``[rows, k]`` role masks of one call's queries and keys."""
    rows, q, k = call.query.shape[0], call.query.shape[-2], call.key.shape[-2]
    if k > layout.length:
        raise UsageError(
            f"layer {call.layer} attends {k} keys but the layout has {layout.length} positions: the "
            "attention mass is measured on a plain forward of the laid-out inputs (not on cached "
            "generation steps; capture blocks.N.attn.pattern with key_roles=... during generation instead)"
        )
    roles = layout.roles_at(0, k)
    if roles.shape[0] != rows:
        raise UsageError(
            f"layer {call.layer} ran {rows} rows but the layout has {roles.shape[0]}: {_EVERY_ROW}"
        )
    qids, kids = torch.tensor(role_ids(query_roles)), torch.tensor(role_ids(key_roles))
    return torch.isin(roles[:, k - q :], qids), torch.isin(roles, kids)


def _check(layout: TokenLayout, query_roles: Sequence[str], key_roles: Sequence[str]) -> None:
    for what, roles in (("query_roles", query_roles), ("key_roles", key_roles)):
        if not roles:
            raise UsageError(f"{what} is empty: name at least one role")
        if not bool(layout.mask(list(roles)).any()) and layout.tail_role not in roles:
            present = [r for r, n in layout.counts().items() if n]
            raise UsageError(
                f"{what} {list(roles)}: no such position in this batch (present: {', '.join(present)})"
            )


@dataclass
class MassTable:
    """Attention mass from ``query_roles`` to ``key_roles``.

    Attributes:
        values: ``[layer, head]`` mean over the examples; ``per_example``: ``[example, layer, head]``.
        layers: the block index of each row of ``values``.
    """

    values: torch.Tensor
    per_example: torch.Tensor
    layers: list[int]
    query_roles: list[str]
    key_roles: list[str]
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "query_roles": self.query_roles,
            "key_roles": self.key_roles,
            "layers": self.layers,
            "values": [[None if v != v else v for v in row] for row in self.values.tolist()],
            "info": self.info,
        }

    def to_pandas(self) -> Any:
        """One row per layer × head: ``layer``, ``head``, ``mass`` (pandas is optional)."""
        from uniprobe.hooks.tables import import_pandas

        pd = import_pandas("MassTable.to_pandas()")
        n_heads = self.values.shape[1]
        return pd.DataFrame(
            {
                "layer": [layer for layer in self.layers for _ in range(n_heads)],
                "head": list(range(n_heads)) * len(self.layers),
                "mass": self.values.flatten().double().numpy(),
            }
        )

    def save(self, out: str | os.PathLike) -> SavedFiles:
        """Write ``mass.json`` and ``mass.safetensors`` (``values``, ``per_example``)."""
        out = result_dir(out)
        files = {"json": out / JSON, "tensors": out / TENSORS}
        write_json(files["json"], self.to_dict())
        tensors = {"values": self.values.clone(), "per_example": self.per_example.clone()}  # no shared memory
        save_safetensors(files["tensors"], tensors, what="attention mass")
        return SavedFiles(out, files)

    @classmethod
    def load(cls, out: str | os.PathLike) -> MassTable:
        doc = read_json(result_file(out, JSON))
        t = load_file(str(result_file(out, TENSORS)))
        return cls(
            t["values"], t["per_example"], doc["layers"], doc["query_roles"], doc["key_roles"], doc["info"]
        )

    def figure(self, title: str | None = None) -> Any:
        """Heatmap of ``values``: layers bottom to top × heads, mass 0..1."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        n_layers, n_heads = self.values.shape
        fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * n_heads + 2.5), max(3.0, 0.35 * n_layers + 2)))
        im = ax.imshow(self.values.numpy(), cmap="viridis", vmin=0, vmax=1, aspect="auto", origin="lower")
        ax.set_xticks(range(n_heads))
        ax.set_yticks(range(n_layers))
        ax.set_yticklabels([str(x) for x in self.layers])
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        q, k = "+".join(self.query_roles), "+".join(self.key_roles)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04).set_label(f"attention mass {q} → {k}", fontsize=8)
        ax.set_title(title or f"attention mass from {q} to {k}", fontsize=10)
        fig.tight_layout()
        return fig


@torch.no_grad()
def mass_table(
    model: nn.Module,
    inputs: ModelInputs,
    query_roles: Sequence[str],
    key_roles: Sequence[str],
    *,
    layers: Sequence[int] | None = None,
    adapter: Adapter | None = None,
    forward: Forward | None = None,
) -> MassTable:
    """One forward of ``inputs``: attention mass from ``query_roles`` to ``key_roles``, per layer × head."""
    adapter = adapter or adapter_for(model)
    layers = list(range(adapter.n_layers(model))) if layers is None else [int(x) for x in layers]
    query_roles, key_roles = list(query_roles), list(key_roles)
    _check(inputs.layout, query_roles, key_roles)
    seen: dict[int, torch.Tensor] = {}

    def on_call(call: AttnCall) -> None:
        qm, km = _masks(inputs.layout, call, query_roles, key_roles)
        seen[call.layer] = attention_mass(call.pattern(), qm, km)

    with intercept_attention(model, adapter, layers, on_call):
        (forward or adapter.run)(model, inputs)
    per = torch.stack([seen[x] for x in layers], dim=1).cpu()  # [b, layer, head]
    return MassTable(per.nanmean(0), per, layers, query_roles, key_roles)


@dataclass
class MassOutputs:
    """A model's outputs with the attention mass the wrapped forward measured (``[rows]``)."""

    outputs: Any
    attention_mass: torch.Tensor


class AttentionMass:
    """Patching / knockout metric: attention mass from ``query_roles`` to ``key_roles``, mean over
    ``layers`` and ``heads`` (all when None) → ``[rows]``. Run the forward through :meth:`wrap`."""

    reads_attention = True  # the knockout sweep wraps its forward and runs every row at every layer
    position = None
    last_position_only = False

    def __init__(
        self,
        layers: Sequence[int],
        query_roles: Sequence[str],
        key_roles: Sequence[str],
        heads: Sequence[int] | None = None,
    ) -> None:
        self.layers, self.heads = [int(x) for x in layers], None if heads is None else list(heads)
        self.query_roles, self.key_roles = list(query_roles), list(key_roles)
        role_ids(self.query_roles + self.key_roles)
        if not self.layers:
            raise UsageError("AttentionMass needs at least one layer")
        self.name = f"attention_mass({'+'.join(self.query_roles)}→{'+'.join(self.key_roles)})"

    def wrap(self, forward: Forward, adapter: Adapter | None = None) -> Forward:
        """``forward`` run under the interception at ``layers``; returns :class:`MassOutputs`."""

        def run(model: nn.Module, inputs: ModelInputs) -> MassOutputs:
            seen: dict[int, torch.Tensor] = {}

            def on_call(call: AttnCall) -> None:
                qm, km = _masks(inputs.layout, call, self.query_roles, self.key_roles)
                m = attention_mass(call.pattern(), qm, km)
                seen[call.layer] = m if self.heads is None else m[:, self.heads]

            with intercept_attention(model, adapter or adapter_for(model), self.layers, on_call):
                out = forward(model, inputs)
            missing = [x for x in self.layers if x not in seen]
            if missing:
                raise UsageError(f"layers {missing} did not run: {_EVERY_ROW}")
            mass = torch.stack([seen[x].mean(-1) for x in self.layers]).mean(0)
            return MassOutputs(out, mass.cpu())

        return run

    def __call__(self, outputs: Any) -> torch.Tensor:
        if not isinstance(outputs, MassOutputs):
            raise UsageError(
                f"{self.name} reads the attention measured during the forward: run it through "
                "metric.wrap(forward) (patch_sweep(..., forward=metric.wrap(adapter.run), resume=False))"
            )
        return outputs.attention_mass

    def __repr__(self) -> str:
        return self.name
