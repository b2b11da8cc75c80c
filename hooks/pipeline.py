"""Capture over a dataset, batch by batch, into an :class:`ActivationStore`.

Memory is bounded by one batch: each batch is prepared by the adapter, run once with the
requested points hooked, and written as one shard before the next begins. Batching is
deterministic (examples in order, fixed batch size), so an interrupted capture resumed with
``resume=True`` skips the finished shards and writes the rest — nothing finished is redone.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from hooks.adapters import Adapter, adapter_for
from hooks.backends import run_capture
from hooks.store import ActivationStore

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
        roles / positions: keep only these positions (see :class:`hooks.capture.capture`).
        mode: ``"understanding"``; ``"generation"`` (teacher-forced: prompt image tokens are
            ``image_gen``); or ``"generate"``: the adapter's image generation runs, every step is
            captured (tagged by step and guidance branch) and the tokens go to ``meta["generated"]``.
        overwrite / resume: what to do when ``out`` already holds a store (default: refuse).
    """
    adapter = adapter or adapter_for(model)
    if mode not in ("understanding", "generation", "generate"):
        raise ValueError(f"mode {mode!r}: choose understanding, generation or generate")
    names = adapter.expand(model, points)
    if roles is not None:
        roles = list(roles)
        if not roles:
            raise ValueError("empty role selection: pass at least one role, or None for every position")
    record = model_record(model, adapter, **(model_info or {}))
    store = ActivationStore.create(
        out, model=record, points=names, attrs=attrs, overwrite=overwrite, resume=resume
    )
    batches = [list(examples[i : i + batch_size]) for i in range(0, len(examples), batch_size)]
    todo = [i for i in range(len(batches)) if not store.has_shard(i)]
    for index in tqdm(todo, desc=f"capture → {Path(out).name}", unit="batch", disable=not progress):
        batch = batches[index]
        inputs = adapter.prepare(model, batch, mode="generation" if mode == "generate" else mode)
        cap = run_capture(
            model,
            inputs,
            names,
            adapter=adapter,
            backend=backend,
            roles=roles,
            positions=positions,
            dtype=dtype,
            generate=mode == "generate",
        )
        records = _example_records(batch, inputs, index, batch_size)
        if cap.generated is not None:
            for rec, tokens in zip(records, cap.generated.tolist(), strict=True):
                rec["meta"]["generated"] = tokens
        store.write_shard(index, {p: cap.rows(p) for p in names}, records)
    store.finalize()
    return ActivationStore.open(out)


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
