"""Capture over a dataset, batch by batch, into an :class:`ActivationStore`.

Memory is bounded by one batch: each batch is prepared by the adapter, run once with the
requested points hooked, and written as one shard before the next begins. Batching is
deterministic (examples in order, fixed batch size), so an interrupted capture resumed with
``resume=True`` skips the finished shards and writes the rest — nothing finished is redone.

Resuming continues exactly the capture that was started: the store records the capture's identity
(:func:`uniprobe.hooks.store.identity.capture_identity`: a digest of the examples in order, batch size,
roles, positions, mode, dtype, adapter, backend) and refuses a resume that differs in any of them.
Before anything is written the examples' labels are checked (one type per key); before the store is
marked complete every point must have stored rows (:class:`EmptyCaptureError` otherwise, the store
staying incomplete), and a requested role that no example has is warned about with the row counts.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from uniprobe.hooks.adapters import Adapter, adapter_for
from uniprobe.hooks.backends import run_capture
from uniprobe.hooks.layout import ROLES
from uniprobe.hooks.store import ActivationStore
from uniprobe.hooks.store.errors import EmptyCaptureError
from uniprobe.hooks.store.identity import capture_identity
from uniprobe.hooks.store.integrity import LabelTypes

EXAMPLE_KEYS = ("id", "labels", "meta")


def config_hash(model: nn.Module) -> str:
    """sha256 (first 16 hex) of the model's config as JSON, or of its parameter shapes."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        text = config.to_json_string(use_diff=False)
    else:
        text = json.dumps({k: list(v.shape) for k, v in model.state_dict().items()}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def model_record(model: nn.Module, adapter: Adapter, **extra: Any) -> dict[str, Any]:
    """The ``model`` entry of a store manifest."""
    return {
        "model_class": type(model).__name__,
        "config_hash": config_hash(model),
        "adapter": adapter.name,
        "n_layers": adapter.n_layers(model),
        **extra,
    }


def capture_dataset(
    model: nn.Module,
    examples: Sequence[dict[str, Any]],
    points: str | Iterable[str],
    out: str | Path,
    *,
    adapter: Adapter | None = None,
    roles: Iterable[str] | None = None,
    positions: Iterable[int] | None = None,
    mode: str = "understanding",
    batch_size: int = 16,
    backend: str = "torch",
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    resume: bool = False,
    attrs: dict[str, Any] | None = None,
    model_info: dict[str, Any] | None = None,
    progress: bool = True,
) -> ActivationStore:
    """Capture ``points`` for every example into a store at ``out``; returns it opened for reading.

    Args:
        examples: dicts with ``input_ids`` (plus family keys such as ``pixel_values``), an
            optional ``id``, ``labels`` (``{key: value}``, what probes predict) and ``meta``.
        roles / positions: keep only these positions (see :class:`uniprobe.hooks.capture.capture`).
        mode: ``"understanding"``; ``"generation"`` (teacher-forced: prompt image tokens are
            ``image_gen``); or ``"generate"``: the adapter's image generation runs, every step is
            captured (tagged by step and guidance branch) and the tokens go to ``meta["generated"]``.
        overwrite / resume: what to do when ``out`` already holds a store (default: refuse). A
            resume must repeat the capture that started the store (same examples in the same
            order, batch size, roles, positions, mode, dtype, adapter, backend, model, points).

    Raises:
        ResumeMismatchError: ``resume`` with other settings than the store was started with.
        MixedLabelTypesError: a label key has values of several types (``0`` and ``"0"``).
        StoreLockedError: another process is writing ``out``.
        EmptyCaptureError: a point got no rows at all; the store is left incomplete.
    """
    adapter = adapter or adapter_for(model)
    if mode not in ("understanding", "generation", "generate"):
        raise ValueError(f"mode {mode!r}: choose understanding, generation or generate")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a whole number of at least 1, got {batch_size!r}")
    names = adapter.expand(model, points)
    if roles is not None:
        roles = list(roles)
        if not roles:
            raise ValueError("empty role selection: pass at least one role, or None for every position")
    positions = None if positions is None else list(positions)
    LabelTypes(_label_view(examples))  # refuse 0 / "0" before any work
    record = model_record(model, adapter, **(model_info or {}))
    identity = capture_identity(
        examples, batch_size=batch_size, roles=roles, positions=positions, mode=mode, dtype=dtype,
        adapter=adapter, backend=backend,
    )  # fmt: skip
    store = ActivationStore.create(
        out, model=record, points=names, attrs=attrs, overwrite=overwrite, resume=resume, identity=identity
    )
    with store:  # the writer lock goes with the writer, also on errors and Ctrl-C
        batches = [list(examples[i : i + batch_size]) for i in range(0, len(examples), batch_size)]
        todo = [i for i in range(len(batches)) if not store.has_shard(i)]
        for index in tqdm(todo, desc=f"capture → {Path(out).name}", unit="batch", disable=not progress):
            batch = batches[index]
            inputs = adapter.prepare(model, batch, mode="generation" if mode == "generate" else mode)
            cap = run_capture(
                model, inputs, names, adapter=adapter, backend=backend, roles=roles, positions=positions,
                dtype=dtype, generate=mode == "generate",
            )  # fmt: skip
            records = _example_records(batch, inputs, index, batch_size)
            if cap.generated is not None:
                for rec, tokens in zip(records, cap.generated.tolist(), strict=True):
                    rec["meta"]["generated"] = tokens
            store.write_shard(index, {p: cap.rows(p) for p in names}, records)
        check_rows_stored(store, roles, mode)
        store.finalize()
    return ActivationStore.open(out)


def _label_view(examples: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``id`` and ``labels`` of every example, the ids as :func:`_example_records` will give them
    (labels that are not a dict are left to the store's own error)."""
    return [
        {"id": str(ex.get("id", i)), "labels": labels if isinstance(labels, Mapping) else {}}
        for i, ex in enumerate(examples)
        for labels in [ex.get("labels") or {}]
    ]


def check_rows_stored(store: ActivationStore, roles: list[str] | None, mode: str) -> None:
    """Refuse to mark complete a store with a point that holds no rows; warn about requested roles
    that hold no rows at any point.

    Raises:
        EmptyCaptureError: naming the empty points, rows per point and the roles the examples have.
    """
    per_point = {p: store.role_counts(p) for p in store.points}
    empty = [p for p, counts in per_point.items() if not counts]
    in_layouts = Counter(ROLES[r] for ex in store.examples for r in ex["layout"])
    have = ", ".join(f"{r} ({in_layouts[r]} positions)" for r in ROLES if in_layouts[r]) or "none"
    if empty:
        rows = ", ".join(f"{p} {sum(c.values())}" for p, c in per_point.items())
        why = " or a generation that produced no steps" if mode == "generate" else ""
        raise EmptyCaptureError(
            f"the capture into {store.path} stored no rows at {', '.join(repr(p) for p in empty)} "
            f"(rows per point: {rows}; roles requested: {roles or 'all'}; roles in the examples' layouts: "
            f"{have}); probes could never read {'it' if len(empty) == 1 else 'them'}. A role no example "
            f"has{why} leaves a point empty. The store is left incomplete: capture again with "
            "overwrite=True and roles / points that the examples have"
        )
    for role in roles or []:
        if not any(counts.get(role) for counts in per_point.values()):
            rows = ", ".join(f"{r} {sum(c.get(r, 0) for c in per_point.values())}" for r in roles)
            warnings.warn(
                f"requested role {role!r} has no rows at any point of {store.path} (rows per requested "
                f"role over all points: {rows}; roles in the examples' layouts: {have}); probes of "
                f"{role!r} will find nothing",
                stacklevel=3,
            )


def _example_records(batch: list[dict[str, Any]], inputs: Any, index: int, batch_size: int) -> list[dict]:
    records = []
    for j, ex in enumerate(batch):
        records.append(
            {
                "id": str(ex.get("id", index * batch_size + j)),
                "labels": dict(ex.get("labels", {})),
                "meta": dict(ex.get("meta", {})),
                "layout": inputs.layout.roles[j].tolist(),
            }
        )
    return records
