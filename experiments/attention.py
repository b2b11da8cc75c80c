"""Attention of one prompt of a loaded model: what ``uniprobe attention`` / ``uniprobe knockout`` and the
sweep's ``attention`` / ``knockout`` analyses run.

    run = attention_prompt(loaded, "draw 2 + 1 cups", query_roles=["image_gen"], key_roles=["text"])
    run.write("artifacts/attn")     # patterns.safetensors, mass.json/.safetensors, attention.png, mass.png
    ko = knockout_prompt(loaded, "what is 2 + 1 ?", {"question": ["text"], "bos": [0]}, query=[-1],
                         target="three")
    ko.write("artifacts/ko")        # patch.json / patch.safetensors (a PatchResult), knockout.png
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from uniprobe.experiments.models import LoadedModel
from uniprobe.experiments.patching import _ids, example, token_id, token_labels
from uniprobe.hooks.errors import UsageError
from uniprobe.hooks.jsonio import write_json
from uniprobe.hooks.layout import ROLES
from uniprobe.hooks.store.files import save_safetensors

MODES = ("understanding", "generation")


def _inputs(loaded: LoadedModel, prompt: str, mode: str) -> Any:
    if mode not in MODES:
        raise UsageError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    return loaded.adapter.prepare(loaded.model, [example(loaded, prompt)], mode=mode)


def position_labels(loaded: LoadedModel, inputs: Any) -> list[str]:
    """One label per stream position: the token's text, or ``role:i`` past the prompt (query tokens)."""
    names = inputs.layout.names(0)
    ids = _ids(inputs)
    start = names.index(next(r for r in names if r != "pad")) if any(r != "pad" for r in names) else 0
    labels = ["pad"] * start + token_labels(loaded, ids)
    return labels + [f"{r}:{i}" for i, r in enumerate(names[len(labels) :])]


def _present(inputs: Any) -> list[str]:
    return [r for r in ROLES if r != "pad" and bool(inputs.layout.mask(r).any())]


def _check_roles(what: str, roles: Sequence[str], present: list[str]) -> list[str]:
    bad = [r for r in roles if r not in present]
    if bad:
        raise UsageError(f"--{what} {bad}: not in this prompt; its roles are {', '.join(present)}")
    return list(roles)


def _layers(loaded: LoadedModel, layers: Sequence[int] | None) -> list[int]:
    n = loaded.adapter.n_layers(loaded.model)
    out = list(range(n)) if layers is None else [int(x) for x in layers]
    bad = [x for x in out if not 0 <= x < n]
    if bad:
        raise UsageError(f"--layers {bad}: the model has {n} blocks (0..{n - 1})")
    return out


@dataclass
class AttentionRun:
    """Patterns and the attention-mass table of one prompt.

    Attributes:
        patterns: ``[layer, head, q, k]`` attention weights (every position of the stream).
        roles, labels: each position's role and token label; ``table``: the :class:`MassTable`.
    """

    patterns: torch.Tensor
    layers: list[int]
    roles: list[str]
    labels: list[str]
    table: Any
    title: str
    files: dict[str, Path] = field(default_factory=dict)

    def write(self, out: str | Path) -> dict[str, Path]:
        """``patterns.safetensors`` (+ JSON of roles/labels), ``mass.*``, ``attention.png``, ``mass.png``."""
        from uniprobe.probes.attention.plots import attention_map_figure, save_figure

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        save_safetensors(
            out / "patterns.safetensors", {"patterns": self.patterns.contiguous()}, what="patterns"
        )
        write_json(out / "patterns.json", {"layers": self.layers, "roles": self.roles, "labels": self.labels,
                                           "shape": ["layer", "head", "query", "key"]})  # fmt: skip
        saved = self.table.save(out)
        title = f"{self.title}: mean over heads (bands: left = queries, top = keys)"
        fig = attention_map_figure(
            self.patterns.mean(1), self.roles, layers=self.layers, tokens=self.labels, title=title
        )
        self.files = {
            "patterns": out / "patterns.safetensors",
            "mass": saved["json"],
            "png": save_figure(fig, out / "attention.png"),
            "mass_png": save_figure(
                self.table.figure(title=f"{self.title}: attention mass"), out / "mass.png"
            ),
        }
        return self.files


def attention_prompt(
    loaded: LoadedModel,
    prompt: str,
    *,
    query_roles: Sequence[str] | None = None,
    key_roles: Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
    mode: str = "understanding",
    name: str | None = None,
) -> AttentionRun:
    """Capture every layer's pattern of one prompt and the mass from ``query_roles`` to ``key_roles``.

    Defaults: queries = the role of the last position; keys = every role of the prompt.
    """
    from uniprobe.hooks.capture import capture
    from uniprobe.probes.attention.mass import MassTable, attention_mass

    inputs = _inputs(loaded, prompt, mode)
    layers = _layers(loaded, layers)
    present = _present(inputs)
    roles = inputs.layout.names(0)
    query_roles = _check_roles("query-roles", query_roles or [roles[-1]], present)
    key_roles = _check_roles("key-roles", key_roles or present, present)
    model, adapter, layout = loaded.model, loaded.adapter, inputs.layout
    points = [f"blocks.{i}.attn.pattern" for i in layers]
    keys = range(layout.length)
    with torch.no_grad(), capture(model, points, adapter=adapter, layout=layout, key_positions=keys) as cap:
        adapter.run(model, inputs)
    patterns = torch.stack([cap[p][0].transpose(0, 1) for p in points])  # [layer, head, q, k]
    qm, km = layout.mask(query_roles), layout.mask(key_roles)
    per = torch.stack([attention_mass(p[None], qm, km)[0] for p in patterns])[None]  # [1, layer, head]
    table = MassTable(per[0].clone(), per, layers, query_roles, key_roles, {"prompt": prompt, "mode": mode})
    return AttentionRun(patterns, layers, roles, position_labels(loaded, inputs), table, name or loaded.spec)


def parse_groups(items: Sequence[str] | Mapping[str, Sequence[str | int]]) -> dict[str, list[str | int]]:
    """Key groups from ``["question=text", "cot=cot", "bos=0,1"]`` (roles, or positions) or a mapping."""
    if isinstance(items, Mapping):
        return {str(k): parse_selection(v) for k, v in items.items()}
    groups: dict[str, list[str | int]] = {}
    for item in items:
        name, sep, spec = item.partition("=")
        if not sep or not name or not spec:
            raise UsageError(
                f"key group {item!r}: write NAME=ROLE[,ROLE] or NAME=POS[,POS] (e.g. cot=cot, bos=0)"
            )
        groups[name] = parse_selection(spec.split(","))
    if not groups:
        raise UsageError("no key groups: pass e.g. --keys question=text cot=cot")
    return groups


def parse_selection(items: Sequence[str | int] | str) -> list[str | int]:
    """``["image_gen"]`` → roles; ``["5", "6"]`` → positions (ints); a mix is an error."""
    items = [items] if isinstance(items, (str, int)) else list(items)
    out = [int(x) if isinstance(x, int) or str(x).lstrip("-").isdigit() else str(x) for x in items]
    if not out or len({type(x) for x in out}) > 1:
        raise UsageError(f"{items!r}: give role names or positions, not both (and at least one)")
    return out


@dataclass
class KnockoutRun:
    """A knockout sweep of one prompt: the :class:`PatchResult` and its heatmap's title."""

    result: Any
    data: dict[str, Any]
    title: str
    files: dict[str, Path] = field(default_factory=dict)

    def write(self, out: str | Path) -> dict[str, Path]:
        """``patch.json`` / ``patch.safetensors`` (``PatchResult.save``) and ``knockout.png``."""
        from uniprobe.probes.patching.plots import heatmap

        saved = self.result.save(out)
        write_json(Path(out) / "knockout.json", self.data)
        png = heatmap(self.result, Path(out) / "knockout.png", title=self.title)
        self.files = {"json": saved["json"], "png": Path(png), "about": Path(out) / "knockout.json"}
        return self.files


def knockout_prompt(
    loaded: LoadedModel,
    prompt: str,
    key_groups: Sequence[str] | Mapping[str, Sequence[str | int]],
    *,
    target: str | int,
    foil: str | int | None = None,
    query: Sequence[str | int] = ("image_gen",),
    layers: Sequence[int] | None = None,
    window: int = 1,
    heads: Sequence[int] | None = None,
    mode: str = "understanding",
    budget_mb: float = 512.0,
    name: str | None = None,
) -> KnockoutRun:
    """Knock out ``query`` → each key group at every layer (``window`` layers at a time) of one prompt.

    The metric: logit ``target − foil`` (or p(target) without a foil) where the answer is read (the last
    prompt position). Negative query positions count from the end (``-1`` = the last position).
    """
    from uniprobe.probes.attention.knockout import knockout_grid, knockout_sweep
    from uniprobe.probes.patching.metrics import LogitDiff, TargetProb

    inputs = _inputs(loaded, prompt, mode)
    groups = parse_groups(key_groups)
    length = inputs.layout.length
    query = [length + q if isinstance(q, int) and q < 0 else q for q in parse_selection(query)]
    present = _present(inputs)
    for sel in [query, *groups.values()]:
        _check_roles("query/--keys", [r for r in sel if isinstance(r, str)], present)
    model, adapter = loaded.model, loaded.adapter
    answer = max(inputs.layout.positions(0, ["text", "image_und", "cot"]) or [length - 1])
    position = -1 if answer == length - 1 else answer
    t_id = token_id(loaded, target)
    metric = (
        TargetProb(t_id, position=position)
        if foil is None
        else LogitDiff(t_id, token_id(loaded, foil), position)
    )
    kos, grid = knockout_grid(model, groups, query=query, layers=_layers(loaded, layers), window=window,
                              heads=heads, adapter=adapter)  # fmt: skip
    result = knockout_sweep(
        model, inputs, (kos, grid), metric, adapter=adapter, budget_bytes=int(budget_mb * 2**20)
    )
    name = name or loaded.spec
    data = {"model": name, "prompt": prompt, "mode": mode, "query": query, "key_groups": groups,
            "metric": result.metric, "window": window, "heads": None if heads is None else list(heads),
            "clean": result.clean, "all_knocked": result.corrupted}  # fmt: skip
    what = "(1 = no effect, 0 = every group at every layer)"
    title = f"{name}: knockout {query} → key group, {result.metric}\n{what}"
    return KnockoutRun(result, data, title)
