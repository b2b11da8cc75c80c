"""Reading a store: :class:`ActivationStore` itself, its metadata, row selection and per-example rows.

**Reads are lazy**: ``safetensors.safe_open`` memory-maps a shard and only requested tensors are read
(the integrity checks of :mod:`.integrity` run on the first read of each shard). Readers
(:meth:`ActivationStore.open`) take no lock: reading beside a writer is safe.

What a store gives back is plain row selection: :meth:`ActivationStore.rows` (every row of a point,
filtered by role, step, branch, timestep), :meth:`ActivationStore.matrix` (one row per example: the example's
rows reduced over their positions, with the examples' labels), :meth:`ActivationStore.role_counts`
(rows per role, from the manifest), :meth:`ActivationStore.timesteps` (denoising step → timestep),
:meth:`ActivationStore.generated` (generated latents) and :meth:`ActivationStore.subset` (a read-only
view of some examples, renumbered ``0..k-1``, without copying anything). Building probe designs from
these (role selections, label encoding, splits) is :mod:`uniprobe.probes.design`'s job.
"""

from __future__ import annotations

import os
import weakref
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from uniprobe.hooks.layout import ROLE_ID, ROLES, role_ids
from uniprobe.hooks.rows import BRANCH_IDS, Rows
from uniprobe.hooks.store.errors import StoreCorruptError
from uniprobe.hooks.store.format import (
    FLOAT_COLUMNS,
    GENERATED_KEY,
    INDEX_COLUMNS,
    VERIFY_MODES,
    dtype_from_name,
    near,
    read_manifest_json,
)
from uniprobe.hooks.store.integrity import IntegrityChecks, LabelTypes
from uniprobe.hooks.store.lock import StoreLock
from uniprobe.hooks.store.resume import Resume
from uniprobe.hooks.store.summary import Summary
from uniprobe.hooks.store.writer import Writer

REDUCTIONS: tuple[str, ...] = ("last", "first", "mean")  # or an int: the k-th row


@dataclass
class Matrix:
    """One row per example, reduced from a store (see :meth:`ActivationStore.matrix`).

    Attributes:
        values: ``[n_kept, *feature]`` (``[n_kept, d_model]`` for residual points), the store's dtype.
        example: ``[n_kept]`` int64 global example indices, ascending.
        labels: label key → list of ``n_kept`` values (``None`` where an example lacks the key).
        ids: the ``n_kept`` example ids (strings), or None when the matrix was built by hand.
    """

    values: torch.Tensor
    example: torch.Tensor
    labels: dict[str, list]
    ids: list[str] | None = None

    def __len__(self) -> int:
        return self.values.shape[0]

    def numpy(self) -> Any:
        """``values`` as a numpy array ``[n_kept, *feature]`` (bfloat16, which numpy lacks, as float32)."""
        values = self.values.detach().cpu()
        return (values.float() if values.dtype == torch.bfloat16 else values).numpy()

    def to_pandas(self, features: str = "columns") -> Any:
        """A pandas DataFrame, one row per kept example (pandas is optional: ``pip install pandas``).

        Columns: ``example`` (global index), ``id``, one column per label key, then the values:
        ``features="columns"`` (default) one float column per feature, named ``f0``, ``f1``, ...
        (values flattened to ``[n_kept, prod(feature)]``); ``features="array"`` one column ``values``
        whose cells are numpy arrays ``[*feature]`` (compact for wide points).
        """
        from uniprobe.hooks.tables import import_pandas

        pd = import_pandas("Matrix.to_pandas()")
        if features not in ("columns", "array"):
            raise ValueError(f"features must be 'columns' or 'array', got {features!r}")
        values = self.numpy()
        ids = self.ids if self.ids is not None else [None] * len(self)
        head = pd.DataFrame({"example": self.example.tolist(), "id": ids, **self.labels})
        if features == "array":
            head["values"] = list(values)
            return head
        flat = values.reshape(len(self), -1)
        body = pd.DataFrame(flat, columns=[f"f{i}" for i in range(flat.shape[1])])
        return pd.concat([head, body], axis=1)


def reduce_per_example(r: Rows, reduce: str | int, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(example [k], values [k, *feature])``: each example's rows of ``r`` ordered by position (ties
    by step) and reduced by ``reduce`` (see :meth:`ActivationStore.matrix`); ``what`` names the rows in
    the error when no example has a k-th row."""
    order = torch.argsort(r.step, stable=True)
    order = order[torch.argsort(r.pos[order], stable=True)]
    order = order[torch.argsort(r.example[order], stable=True)]
    r = r.select(order)
    example, counts = torch.unique_consecutive(r.example, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    if reduce == "mean":
        # accumulate in float32 (float64 for float64 stores): half-precision sums lose the mean
        acc_dtype = torch.float64 if r.values.dtype == torch.float64 else torch.float32
        group = torch.repeat_interleave(torch.arange(len(example)), counts)
        acc = torch.zeros(len(example), *r.values.shape[1:], dtype=acc_dtype)
        acc.index_add_(0, group, r.values.to(acc_dtype))
        acc /= counts.to(acc_dtype).view(-1, *[1] * (r.values.dim() - 1))
        return example, acc.to(r.values.dtype) if r.values.dtype.is_floating_point else acc
    if reduce == "first":
        idx = starts
    elif reduce == "last":
        idx = starts + counts - 1
    else:
        assert isinstance(reduce, int)
        ok = counts > reduce if reduce >= 0 else counts >= -reduce
        example, idx = example[ok], (starts + reduce if reduce >= 0 else starts + counts + reduce)[ok]
        if len(example) == 0:
            raise ValueError(
                f"no example has a row at reduce={reduce} for {what}: "
                f"examples have {int(counts.min())}..{int(counts.max())} such rows"
            )
    return example, r.values[idx]


class ActivationStore(Writer, Resume, IntegrityChecks, Summary):
    """Captured activations in a directory of safetensors shards with a JSON manifest.

    Make one with :meth:`create` (for writing, also readable) or :meth:`open` (read-only); a read-only
    view of some examples with :meth:`subset`. See :mod:`uniprobe.hooks.store` for the on-disk format
    and guarantees.
    """

    def __init__(self, path: Path, manifest: dict, *, writable: bool, verify: str, allow_holes: bool) -> None:
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
        self.path = Path(path)
        self._m = manifest
        self._writable = writable
        self._verify = verify
        self._lock: StoreLock | None = None
        self._release: weakref.finalize | None = None
        self._label_types: LabelTypes | None = None  # built on the first write
        self._checked: set[int] = set()  # shards whose header matched the manifest
        self._hashed: set[int] = set()  # shards whose sha256 matched the manifest
        # a view (subset): the global indices it keeps, ascending, and global -> view index (-1: dropped)
        self._kept: list[int] | None = None
        self._renumber: torch.Tensor | None = None
        self._validate_manifest(allow_holes)
        self._records: dict[int, dict] = {int(r["index"]): r for r in manifest["shards"]}
        self._spans = self._spans_from_examples()
        store_roles = list(manifest["roles"])
        unknown = [r for r in store_roles if r not in ROLE_ID]
        if unknown:
            raise ValueError(
                f"store {path} uses roles {unknown} that this toolkit does not know (toolkit roles: {ROLES})"
            )
        # store role id -> toolkit role id (stores written by an older toolkit may number roles differently)
        self._role_map = (
            None if store_roles == list(ROLES) else torch.tensor([ROLE_ID[r] for r in store_roles])
        )

    @classmethod
    def open(cls, path: str | os.PathLike, verify: str = "lazy") -> ActivationStore:
        """Open the store at ``path`` read-only (no lock: reading beside a writer is safe).

        Args:
            verify: when to check shard sha256s: ``"lazy"`` (first read of each shard), ``"full"``
                (all at open, with every shard header), ``"none"``. File presence, sizes and places are
                always checked at open; the manifest digest unless ``"none"``.

        Raises:
            FileNotFoundError: nothing at ``path``.
            StoreCorruptError: unreadable or edited manifest, missing/truncated/altered shard, a shard
                outside the store directory, or shards that disagree with the manifest.
        """
        path = Path(path)
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
        store = cls(path, read_manifest_json(path), writable=False, verify=verify, allow_holes=False)
        problems = []
        for index in sorted(store._records):
            problems += store._file_problems(store._records[index])
        if problems:
            raise StoreCorruptError(store._corrupt_message(problems))
        if verify != "none":
            store._check_digest()
        if verify == "full":
            store.verify()
        return store

    def subset(self, examples: Iterable[int]) -> ActivationStore:
        """A read-only view of this store restricted to some examples; nothing is copied or written.

        The view's examples are renumbered ``0..k-1`` in store order (as a store holding only them
        would number them): ``n_examples``, ``examples``, ``labels``, ``layout``, ``rows``, ``matrix``
        and ``role_counts`` see only them; ``path``, ``points``, ``model``, ``manifest`` and the
        integrity checks are the source store's.

        Args:
            examples: indices of this store's examples (of this view's, for a view); order and
                repeats do not count.

        Raises:
            IndexError: an index out of range.
        """
        wanted = sorted({int(e) for e in examples})
        bad = [e for e in wanted if not 0 <= e < self.n_examples]
        if bad:
            raise IndexError(f"examples {bad[:5]} out of range; {self.path} has {self.n_examples} examples")
        view = object.__new__(type(self))
        view.__dict__.update(self.__dict__)
        view._writable, view._lock, view._release = False, None, None  # a view never writes
        view._kept = wanted if self._kept is None else [self._kept[e] for e in wanted]
        n_total = len(self._m["examples"])
        view._renumber = torch.full((n_total,), -1, dtype=torch.long)
        view._renumber[torch.tensor(view._kept, dtype=torch.long)] = torch.arange(len(view._kept))
        return view

    # -- metadata ---------------------------------------------------------------------------------
    @property
    def _ex(self) -> list[dict]:
        """The manifest's example dicts this store (or view) shows, by its example index."""
        exs = self._m["examples"]
        return exs if self._kept is None else [exs[i] for i in self._kept]

    @property
    def manifest(self) -> dict:
        """The manifest as a dict (read-only by convention; a view's is its source store's)."""
        return self._m

    @property
    def points(self) -> list[str]:
        """Hook points, in capture order."""
        return list(self._m["points"])

    @property
    def n_examples(self) -> int:
        return len(self._ex)

    def __len__(self) -> int:
        return self.n_examples

    @property
    def is_view(self) -> bool:
        """Whether this is a :meth:`subset` view of a store."""
        return self._kept is not None

    @property
    def complete(self) -> bool:
        return bool(self._m["complete"])

    @property
    def model(self) -> dict:
        return dict(self._m["model"])

    @property
    def attrs(self) -> dict:
        return dict(self._m.get("attrs", {}))

    @property
    def identity(self) -> dict | None:
        """The capture identity the store was made with (None: made through the API, or schema 1)."""
        identity = self._m.get("identity")
        return None if identity is None else dict(identity)

    @property
    def expected_examples(self) -> int | None:
        """How many examples the capture that fills the store was given (None if unknown: no identity,
        or a view, whose examples were chosen after capture)."""
        prompts = (self._m.get("identity") or {}).get("prompts") or {}
        n = prompts.get("n_examples")
        return n if isinstance(n, int) and self._kept is None else None

    def role_counts(self, point: str) -> dict[str, int]:
        """Rows per role name at ``point`` over the finished shards, roles in toolkit order, only roles
        with rows (from the manifest, reading no shard; a view reads the shards' index columns)."""
        self._check_point(point)
        counts: Counter = Counter()
        if self._kept is None:
            for rec in self._records.values():
                counts.update(rec["role_rows"][point])
        else:
            counts.update(ROLES[i] for i in self._select(point, None, None, None, False).role.tolist())
        return {r: counts[r] for r in ROLES if counts[r]}

    def role_rows(self, point: str) -> dict[str, int]:
        """The same as :meth:`role_counts` (its older name)."""
        return self.role_counts(point)

    @property
    def dtype(self) -> torch.dtype | None:
        """dtype of every point's values (``None`` before the first shard)."""
        return dtype_from_name(self._m["dtype"]) if self._m["dtype"] else None

    def feature_shape(self, point: str) -> tuple[int, ...]:
        """Feature shape of ``point``: values are ``[n, *feature_shape]``."""
        self._check_point(point)
        return tuple(self._m["feature_shapes"].get(point, ()))

    @property
    def examples(self) -> list[dict]:
        """Per-example dicts (``id``, ``labels``, ``meta``, ``layout``, ``shard``), by global index."""
        return [dict(ex) for ex in self._ex]

    @property
    def label_keys(self) -> list[str]:
        """Label keys present on any example, in first-seen order."""
        return list(dict.fromkeys(k for ex in self._ex for k in ex["labels"]))

    def labels(self, key: str) -> list:
        """Label ``key`` of every example, by global index (``None`` where an example lacks it)."""
        keys = self.label_keys
        if key not in keys:
            raise KeyError(f"no label {key!r} in {self.path}; {near(key, keys)}label keys: {keys}")
        return [ex["labels"].get(key) for ex in self._ex]

    def layout(self, example: int) -> list[str]:
        """Role names of the positions of global example ``example``."""
        if not -self.n_examples <= example < self.n_examples:
            raise IndexError(f"example {example} out of range; the store has {self.n_examples} examples")
        names = self._m["roles"]
        return [names[i] for i in self._ex[example]["layout"]]

    def _check_point(self, point: str) -> None:
        points = self._m["points"]
        if point not in points:
            raise ValueError(f"no hook point {point!r} in {self.path}; {near(point, points)}points: {points}")

    # -- reading ----------------------------------------------------------------------------------
    def _columns(self, f: Any, point: str) -> dict[str, torch.Tensor]:
        cols = {c: f.get_tensor(f"{point}/{c}") for c in INDEX_COLUMNS}
        keys = set(f.keys())
        for c in FLOAT_COLUMNS:  # optional: shards written before the column existed read as NaN
            key = f"{point}/{c}"
            cols[c] = f.get_tensor(key) if key in keys else torch.full(cols["step"].shape, float("nan"))
        if self._role_map is not None:
            cols["role"] = self._role_map[cols["role"]]
        return cols

    def _select(
        self,
        point: str,
        roles: str | Iterable[str] | None,
        step: int | Iterable[int] | None,
        branch: str | int | None,
        with_values: bool = True,
        timestep: float | Iterable[float] | None = None,
    ) -> Rows:
        self._check_point(point)
        t_set = None if timestep is None else _timestep_set(timestep)
        role_set = (
            None if roles is None else torch.tensor(role_ids([roles] if isinstance(roles, str) else roles))
        )
        step_set = None if step is None else torch.tensor([step] if isinstance(step, int) else list(step))
        if isinstance(branch, str):
            if branch not in BRANCH_IDS:
                raise ValueError(f"unknown branch {branch!r}; branches are {', '.join(BRANCH_IDS)}")
            branch = BRANCH_IDS[branch]
        parts = []
        for index in sorted(self._records):
            if self._renumber is not None:  # a view: skip shards holding none of its examples
                first, last = self._records[index]["examples"]
                if not bool((self._renumber[first:last] >= 0).any()):
                    continue
            with self._open_shard(index) as f:
                cols = self._columns(f, point)
                keep = torch.ones_like(cols["role"], dtype=torch.bool)
                if self._renumber is not None:
                    cols["example"] = self._renumber[cols["example"]]
                    keep &= cols["example"] >= 0
                if role_set is not None:
                    keep &= torch.isin(cols["role"], role_set)
                if step_set is not None:
                    keep &= torch.isin(cols["step"], step_set)
                if branch is not None:
                    keep &= cols["branch"] == branch
                if t_set is not None:
                    keep &= _timestep_in(cols["timestep"], t_set)
                sel = keep.nonzero().flatten()
                if sel.numel() == 0:
                    continue
                if with_values:
                    # read only the span that holds the kept rows
                    lo, hi = int(sel[0]), int(sel[-1]) + 1
                    values = f.get_slice(f"{point}/values")[lo:hi][keep[lo:hi]]
                else:
                    values = torch.empty(len(sel), 0)
                parts.append(Rows(values=values, **{c: t[keep] for c, t in cols.items()}))
        if parts:
            return Rows.cat(parts)
        empty = torch.empty(0, dtype=torch.long)
        dtype = self.dtype or torch.float32
        shape = self._m["feature_shapes"].get(point, []) if with_values else [0]
        return Rows(torch.empty(0, *shape, dtype=dtype), *(empty.clone() for _ in INDEX_COLUMNS))

    def rows(
        self,
        point: str,
        roles: str | Iterable[str] | None = None,
        step: int | Iterable[int] | None = None,
        branch: str | int | None = None,
        *,
        timestep: float | Iterable[float] | None = None,
    ) -> Rows:
        """All rows at ``point`` across shards, filtered; ``example`` holds global indices.

        Args:
            roles: a role name or names (``None``: every role).
            step: a generation step or steps (``None``: every step).
            branch: ``"cond"``/``"uncond"`` (a flow model's ``"uncond_text"``/``"uncond_image"``) or its
                index (``None``: every branch).
            timestep: a denoising timestep or timesteps, in the model's units (``None``: every row;
                matched to float32 precision; rows without a timestep never match).

        Returns:
            :class:`Rows` with ``values`` ``[n, *feature]`` in the store's dtype, in shard order, and
            ``timestep`` ``[n]`` float32 (NaN for rows without one, and in stores made before it was kept).
        """
        return self._select(point, roles, step, branch, timestep=timestep)

    def timesteps(self, point: str) -> dict[int, float]:
        """Denoising step → the timestep its rows at ``point`` ran at (rows without a timestep are
        left out: ``{}`` for a plain forward, the prompt pass, or a store made before timesteps were kept).

        Raises:
            ValueError: a step whose rows ran at several timesteps (flow captures of per-row timesteps);
                read ``rows(point).timestep`` then.
        """
        r = self._select(point, None, None, None, with_values=False)
        has = ~torch.isnan(r.timestep)
        out: dict[int, float] = {}
        for step, t in zip(r.step[has].tolist(), r.timestep[has].tolist(), strict=True):
            if out.setdefault(step, t) != t:
                raise ValueError(
                    f"step {step} at {point!r} in {self.path} has rows at several timesteps ({out[step]}, "
                    f"{t}, ...); read them per row with store.rows({point!r}).timestep"
                )
        return dict(sorted(out.items()))

    def generated(self) -> torch.Tensor:
        """The generated latents ``[n_examples, *latent]`` of a ``mode="generate"`` capture with a
        diffusion decoder, by example index (a view: its examples).

        Raises:
            ValueError: the store holds none (not a generate capture, ``save_latents=False``, or
                generated tokens, which are in each example's ``meta["generated"]``).
        """
        missing = [i for i in sorted(self._records) if "generated" not in self._records[i]]
        if not self._records or missing:
            raise ValueError(
                f"{self.path} holds no generated latents (shards without them: {missing[:5] or 'all'}); "
                "they are stored by capture_dataset(mode='generate') for models with a diffusion decoder "
                "unless save_latents=False; generated image tokens are in "
                "store.examples[i]['meta']['generated']"
            )
        parts = []
        for index in sorted(self._records):
            with self._open_shard(index) as f:
                parts.append(f.get_tensor(GENERATED_KEY))
        out = torch.cat(parts)
        return out if self._kept is None else out[torch.tensor(self._kept, dtype=torch.long)]

    def matrix(
        self,
        point: str,
        role: str | list[str] | None = None,
        reduce: str | int = "last",
        step: int | Iterable[int] | None = None,
        branch: str | int | None = "cond",
        *,
        timestep: float | Iterable[float] | None = None,
    ) -> Matrix:
        """One row per example at ``point``, with the examples' labels.

        Each example's rows with the selected role(s), step(s), branch and timestep(s) (see
        :meth:`rows`) are ordered by position
        (ties by step) and reduced: ``"last"``, ``"first"``, ``"mean"`` (accumulated in float32, or
        float64 for float64 stores, returned in the store's dtype), or an int ``k``: the k-th of them
        (negative from the end). Examples without such rows (or with fewer than needed for ``k``)
        are dropped; :attr:`Matrix.example` says which were kept.

        Returns:
            :class:`Matrix` with ``values`` ``[n_kept, *feature]``, ``example`` ``[n_kept]``, ``labels``.
        """
        if not (reduce in REDUCTIONS or (isinstance(reduce, int) and not isinstance(reduce, bool))):
            raise ValueError(f"reduce must be 'last', 'first', 'mean' or an int position, got {reduce!r}")
        r = self._select(point, role, step, branch, timestep=timestep)
        if len(r) == 0:
            message = self._no_rows_message(point, role, step, branch)
            if timestep is not None:
                message += f" (and timestep {timestep!r}: timesteps per step here {self.timesteps(point)})"
            raise ValueError(message)
        example, values = reduce_per_example(r, reduce, f"point {point!r}, role {role!r}")
        exs = self._ex
        labels = {k: [exs[e]["labels"].get(k) for e in example.tolist()] for k in self.label_keys}
        ids = [exs[e]["id"] for e in example.tolist()]
        return Matrix(values=values, example=example, labels=labels, ids=ids)


def _timestep_set(timestep: float | Iterable[float]) -> torch.Tensor:
    """Requested timesteps as float32 ``[k]`` (how the store keeps them)."""
    try:
        values = torch.as_tensor(timestep, dtype=torch.float32).flatten()
    except (TypeError, ValueError, RuntimeError):
        values = torch.empty(0)
    if values.numel() == 0 or isinstance(timestep, bool):
        raise ValueError(f"timestep must be a number or numbers (the model's units), got {timestep!r}")
    return values


def _timestep_in(column: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
    """``[n]`` bool: rows whose timestep equals one of ``wanted`` (float32 rounding; NaN never matches)."""
    return torch.isclose(column[:, None], wanted[None, :], rtol=1e-6, atol=0.0).any(dim=1)
