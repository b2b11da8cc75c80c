"""Capture over a dataset, batch by batch, into an :class:`ActivationStore`.

Memory is bounded by one shard: each batch is prepared by the adapter and run once with the
requested points hooked; the batches of a shard (``shard_size`` consecutive examples) accumulate and
are written as one file before the next shard begins. Sharding is deterministic (examples in order,
fixed batch and shard size), so an interrupted capture resumed with ``resume=True`` skips the
finished shards and writes the rest — nothing finished is redone.

**Shard size.** ``shard_size=None`` (the default) picks ``batch_size × k`` examples per shard, the
largest ``k ≥ 1`` that keeps a shard under :data:`AUTO_SHARD_EXAMPLES` examples (256) and, as
estimated from the first batch's bytes per example, under :data:`AUTO_SHARD_BYTES` (64 MiB). The
estimate is deterministic (same model, examples and settings → same size); a resume takes the size
the store recorded; the resolved size is part of the capture identity.

Resuming continues exactly the capture that was started: the store records the capture's identity
(:func:`uniprobe.hooks.store.identity.capture_identity`: a digest of the examples in order, batch size,
shard size, roles, positions, mode, dtype, adapter, backend) and refuses a resume that differs in any of them.
Before anything is written the examples' labels are checked (one type per key); before the store is
marked complete every point must have stored rows (:class:`EmptyCaptureError` otherwise, the store
staying incomplete), and a requested role that no example has is warned about with the row counts.
"""

from __future__ import annotations

import dataclasses
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
from uniprobe.hooks.errors import UniprobeError
from uniprobe.hooks.layout import ROLES
from uniprobe.hooks.rows import Rows
from uniprobe.hooks.store import ActivationStore
from uniprobe.hooks.store.errors import EmptyCaptureError
from uniprobe.hooks.store.format import read_manifest_json
from uniprobe.hooks.store.identity import capture_identity
from uniprobe.hooks.store.integrity import LabelTypes

EXAMPLE_KEYS = ("id", "labels", "meta")
AUTO_SHARD_EXAMPLES = 256
"""At most this many examples per shard when ``shard_size`` is not given."""
AUTO_SHARD_BYTES = 64 * 2**20
"""At most about this many bytes of values per shard when ``shard_size`` is not given."""


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
    shard_size: int | None = None,
    backend: str = "torch",
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    resume: bool = False,
    attrs: dict[str, Any] | None = None,
    model_info: dict[str, Any] | None = None,
    progress: bool = True,
    key_roles: Iterable[str] | None = None,
    generate_kwargs: dict[str, Any] | None = None,
    save_latents: bool = True,
) -> ActivationStore:
    """Capture ``points`` for every example into a store at ``out``; returns it opened for reading.

    Args:
        examples: dicts with ``input_ids`` (plus family keys such as ``pixel_values``), an
            optional ``id``, ``labels`` (``{key: value}``, what probes predict) and ``meta``.
        roles / positions: keep only these positions (see :class:`uniprobe.hooks.capture.capture`).
        mode: ``"understanding"``; ``"generation"`` (teacher-forced: prompt image tokens are
            ``image_gen``); or ``"generate"``: the adapter's image generation runs, every step is
            captured (tagged by step, guidance branch and — in a diffusion decoder — timestep); image
            tokens go to ``meta["generated"]``, a diffusion decoder's latents ``[n, *latent]`` into the
            shard files (:meth:`ActivationStore.generated`), never into the JSON.
        batch_size: examples per forward pass.
        shard_size: examples per shard file (consecutive examples; several batches accumulate into
            one shard, the last batch of a shard may be smaller). None: automatic, ``batch_size × k``
            up to 256 examples or ~64 MiB per shard, whichever comes first (see the module docstring).
        key_roles: for attention points (``blocks.*.attn.pattern``): store each query row's attention
            mass on each of these key roles, ``[head, n_roles]`` — the same columns for every example
            (:mod:`uniprobe.hooks.attn_capture`); without it a pattern's columns are the batch's positions.
        generate_kwargs: settings for the adapter's generation (``mode="generate"``), e.g.
            ``{"num_inference_steps": 8, "guidance_scale": 3.0, "seed": 0}`` for a diffusion decoder;
            part of the capture identity when given.
        save_latents: store generated latents (False: keep only the rows; tokens always go to ``meta``).
        overwrite / resume: what to do when ``out`` already holds a store (default: refuse). A
            resume must repeat the capture that started the store (same examples in the same
            order, batch size, shard size, roles, positions, mode, dtype, adapter, backend, model, points).

    Raises:
        ResumeMismatchError: ``resume`` with other settings than the store was started with.
        MixedLabelTypesError: a label key has values of several types (``0`` and ``"0"``).
        StoreLockedError: another process is writing ``out``.
        EmptyCaptureError: a point got no rows at all; the store is left incomplete.
    """
    adapter = adapter or adapter_for(model)
    if mode not in ("understanding", "generation", "generate"):
        raise ValueError(f"mode {mode!r}: choose understanding, generation or generate")
    if not _whole(batch_size):
        raise ValueError(f"batch_size must be a whole number of at least 1, got {batch_size!r}")
    if shard_size is not None and not _whole(shard_size):
        raise ValueError(
            f"shard_size must be a whole number of at least 1 or None (automatic), got {shard_size!r}"
        )
    names = adapter.expand(model, points)
    if roles is not None:
        roles = list(roles)
        if not roles:
            raise ValueError("empty role selection: pass at least one role, or None for every position")
    positions = None if positions is None else list(positions)
    if generate_kwargs and mode != "generate":
        raise ValueError(f"generate_kwargs {sorted(generate_kwargs)} apply to mode='generate', not {mode!r}")
    if generate_kwargs:  # recorded in the store's identity: plain JSON only
        try:
            json.dumps(generate_kwargs, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"generate_kwargs must be plain JSON settings (numbers, strings), as the store records them "
                f"({err}); set objects such as a scheduler on the model instead (model.scheduler = ...)"
            ) from None
    LabelTypes(_label_view(examples))  # refuse 0 / "0" before any work
    record = model_record(model, adapter, **(model_info or {}))

    def run(batch: list[dict[str, Any]]) -> tuple[Any, Any]:
        inputs = adapter.prepare(model, batch, mode="generation" if mode == "generate" else mode)
        cap = run_capture(
            model, inputs, names, adapter=adapter, backend=backend, roles=roles, positions=positions,
            dtype=dtype, generate=mode == "generate", key_roles=key_roles, generate_kwargs=generate_kwargs,
        )  # fmt: skip
        return inputs, cap

    first = None  # the first batch, run once to size the shards, reused as shard 0's first batch
    if shard_size is None and resume:
        shard_size = _stored_shard_size(Path(out))  # the size this capture resolved when it started
    if shard_size is None:
        first = run(list(examples[:batch_size])) if len(examples) else None
        shard_size = (
            auto_shard_size(first[1], names, min(batch_size, len(examples)), batch_size)
            if first
            else batch_size
        )
    identity = capture_identity(
        examples, batch_size=batch_size, shard_size=shard_size, roles=roles, positions=positions, mode=mode,
        dtype=dtype, adapter=adapter, backend=backend,
    )  # fmt: skip
    if key_roles is not None:  # only then: stores captured before attention points resume as before
        identity["key_roles"] = list(key_roles)
    if generate_kwargs:  # likewise: generation settings join the identity only when given
        identity["generate_kwargs"] = dict(generate_kwargs)
    store = ActivationStore.create(
        out, model=record, points=names, attrs=attrs, overwrite=overwrite, resume=resume, identity=identity
    )
    with store:  # the writer lock goes with the writer, also on errors and Ctrl-C
        starts = range(0, len(examples), shard_size)
        todo = [i for i in range(len(starts)) if not store.has_shard(i)]
        n_batches = sum(-(-min(shard_size, len(examples) - starts[i]) // batch_size) for i in todo)
        bar = tqdm(total=n_batches, desc=f"capture → {Path(out).name}", unit="batch", disable=not progress)
        for index in todo:
            start = starts[index]
            shard = list(examples[start : start + shard_size])
            parts: dict[str, list[Rows]] = {p: [] for p in names}
            records: list[dict] = []
            latents: list[torch.Tensor] = []  # a diffusion decoder's samples: into the shard, not JSON
            for offset in range(0, len(shard), batch_size):
                batch = shard[offset : offset + batch_size]
                if first is not None and start + offset == 0:
                    inputs, cap = first
                else:
                    inputs, cap = run(batch)
                recs = _example_records(batch, inputs, start + offset)
                if cap.generated is not None and cap.generated.dtype.is_floating_point:
                    latents.append(cap.generated)
                elif cap.generated is not None:
                    for rec, tokens in zip(recs, cap.generated.tolist(), strict=True):
                        rec["meta"]["generated"] = tokens
                for p in names:
                    rows = cap.rows(p)  # batch-local example indices → shard-local
                    parts[p].append(dataclasses.replace(rows, example=rows.example + offset))
                records.extend(recs)
                bar.update(1)
            first = None
            generated = torch.cat(latents) if latents and save_latents else None
            store.write_shard(index, {p: Rows.cat(r) for p, r in parts.items()}, records, generated)
        bar.close()
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


def _stored_shard_size(out: Path) -> int | None:
    """The shard size recorded in the identity of the store at ``out``, if it can be read."""
    try:
        identity = read_manifest_json(out).get("identity") or {}
        # a store from before shard sizes existed wrote one shard per batch
        size = identity.get("shard_size", identity.get("batch_size"))
    except (OSError, ValueError, UniprobeError):
        return None
    return size if _whole(size) else None


def _whole(n: Any) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 1


def auto_shard_size(cap: Any, names: list[str], n_batch: int, batch_size: int) -> int:
    """Examples per shard when none was asked: ``batch_size × k``, the largest ``k ≥ 1`` with at most
    :data:`AUTO_SHARD_EXAMPLES` examples and about :data:`AUTO_SHARD_BYTES` bytes of values, the
    bytes per example measured on the first batch (``n_batch`` examples of capture ``cap``)."""
    nbytes = sum(cap.rows(p).values.numel() * cap.rows(p).values.element_size() for p in names)
    per_example = max(1, nbytes // max(1, n_batch))
    limit = min(AUTO_SHARD_EXAMPLES, AUTO_SHARD_BYTES // per_example)
    return batch_size * max(1, limit // batch_size)


def _example_records(batch: list[dict[str, Any]], inputs: Any, start: int) -> list[dict]:
    """Records of ``batch``, whose first example is the capture's example ``start`` (the default id)."""
    records = []
    for j, ex in enumerate(batch):
        records.append(
            {
                "id": str(ex.get("id", start + j)),
                "labels": dict(ex.get("labels", {})),
                "meta": dict(ex.get("meta", {})),
                "layout": inputs.layout.roles[j].tolist(),
            }
        )
    return records
