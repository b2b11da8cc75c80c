"""capture: register hooks, collect only what was asked, always remove.

    with capture(model, "blocks.*.resid_post", adapter=adapter, layout=layout, roles=["query"]) as cap:
        model(**inputs)
    cap["blocks.3.resid_post"]        # [batch, pos, d] when every position was kept
    cap.rows("blocks.3.resid_post")   # Rows: values [n, d] + example / pos / role / step / branch / timestep

Protocol. On enter, one forward pre-hook goes on the first block (the *call tracker*,
:mod:`uniprobe.hooks.calls`): each backbone call reports its column offset (the length of the
``transformers.Cache`` it was handed, found by type, 0 for a fresh sequence) and its length, and
counts as generation step 0 when the offset is 0, else the next step; calls that break the
expected pattern (``expect="generation"``: one prompt pass, then single continuing steps) raise
:class:`uniprobe.hooks.calls.CallPatternError` instead of mislabelling rows. Then
one hook per requested point; each hook turns its tensor into :class:`Rows`, keeping only the
positions whose role (from the layout) was asked for, detached and moved to the requested
dtype/device at once, so memory holds only the selection. With classifier-free guidance the
batch is doubled (``cfg_batch`` = conditional batch size): row ``r`` is example ``r % B`` on
branch ``r // B`` (0 conditional, 1 unconditional). On exit — also when the forward raised —
every handle is removed.

Diffusion decoders. When the adapter names a ``decoder`` (a diffusers denoiser, one forward per
denoising step), a second tracker on that module logs each of its calls as a
:class:`~uniprobe.hooks.calls.DecoderStep` (step, timestep, rows). Points inside the decoder (its
blocks, its conditioning input, ``decoder.out``) are tagged with that *denoising* step
(``cap.timesteps[step]`` is its timestep, and every row carries it in ``Rows.timestep``), the CFG
branch as above (a pipeline that runs the
branches as separate calls at one timestep, as GLM-Image's does, gets one step with branches 0, 1 by
call order), role ``image_gen`` and the
decoder's own token positions (0..k-1; a 4-D ``[rows, C, H, W]`` output is one position).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn
from uniprobe.hooks.adapters.base import Adapter
from uniprobe.hooks.attn_capture import install_attention_capture
from uniprobe.hooks.calls import Call, CallLog, DecoderStep, track_calls, track_decoder_steps, track_timesteps
from uniprobe.hooks.hookset import HookSet
from uniprobe.hooks.layout import ROLE_ID, TokenLayout, role_ids
from uniprobe.hooks.rows import BRANCH_IDS, Rows


class Captured:
    """What a capture collected: per point, a list of row tables (one per model call)."""

    def __init__(
        self,
        points: Sequence[str],
        layout: TokenLayout | None = None,
        roles: Iterable[str] | None = None,
        positions: Iterable[int] | None = None,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        cfg_batch: int | None = None,
        log: CallLog | None = None,
    ) -> None:
        self.points = list(points)
        self.layout = layout
        self.roles = None if roles is None else torch.tensor(role_ids(roles), dtype=torch.long)
        if self.roles is not None and layout is None:
            raise ValueError("selecting roles needs a layout (TokenLayout) for the batch")
        self.positions = None if positions is None else torch.as_tensor(list(positions), dtype=torch.long)
        self.dtype = dtype
        self.device = torch.device(device)
        self.cfg_batch = cfg_batch
        self.records: dict[str, list[Rows]] = {p: [] for p in self.points}
        self.log = log or CallLog()
        self.generated: torch.Tensor | None = None  # image tokens, when the capture ran a generation
        self.key_columns: dict[str, list[str]] = {}  # attn.pattern/scores columns (hooks.attn_capture)
        self.decoder_steps: list[DecoderStep] = []  # one per diffusion-decoder call (see the module doc)
        self.decoder_points: set[str] = set()  # points tagged by decoder step instead of backbone call

    # -- bookkeeping ------------------------------------------------------------------------
    @property
    def calls(self) -> list[Call]:
        """Every backbone call so far: ``(step, offset, length)``."""
        return self.log.calls

    def begin_call(self, offset: int, length: int) -> None:
        """Called once per backbone forward (by the tracker, or a backend that ran one call)."""
        self.log.begin(offset, length)

    @property
    def timesteps(self) -> dict[int, float]:
        """Denoising step → the timestep the decoder was given (empty without a diffusion decoder)."""
        return {s.step: s.timestep for s in [*self.decoder_steps, *self.log.flow_steps]}

    def _call(self) -> tuple[int, int, int | None]:
        return self.log.calls[-1] if self.log.calls else (0, 0, None)

    def add(self, point: str, tensor: torch.Tensor) -> None:
        """Record ``tensor`` (``[rows, k, *feature]``, or ``[rows, d]`` for one position) at ``point``.

        The ``k`` positions are the last ``k`` of the current call (heads may see only the
        final position during generation).
        """
        step, offset, length = self._call()
        first_branch = 0
        # the denoising timestep of this call: a flow backbone's pass (CallLog.note_timestep), else none
        timestep = self.log.flow_steps[-1].timestep if self.log.branch is not None else float("nan")
        t = tensor.detach()
        if point in self.decoder_points:  # the decoder's own positions, its denoising step
            if not self.decoder_steps:
                raise RuntimeError(f"{point!r} fired outside a decoder call (no denoising step to tag)")
            t = t[:, None] if t.dim() != 3 else t
            call = self.decoder_steps[-1]
            step, offset, length, first_branch = call.step, 0, t.shape[1], call.branch
            timestep = call.timestep
        elif t.dim() == 2:
            t = t[:, None]
        n_rows, k = t.shape[0], t.shape[1]
        length = k if length is None else length
        if k > length:  # the point saw more positions than the backbone call (e.g. no tracker)
            length, offset = k, 0
        pos = torch.arange(offset + length - k, offset + length)
        b = self.cfg_batch or n_rows
        example = torch.arange(n_rows) % b
        branch = torch.arange(n_rows) // b + first_branch
        if self.log.branch is not None and point not in self.decoder_points:  # a flow model's CFG pass
            branch = torch.full((n_rows,), self.log.branch, dtype=torch.long)
        if point in self.decoder_points:
            roles = torch.full((n_rows, k), ROLE_ID["image_gen"], dtype=torch.long)
        elif self.layout is not None:
            roles = self.layout.roles_at(int(pos[0]), k)
            if roles.shape[0] != b:
                raise ValueError(
                    f"layout has {roles.shape[0]} examples but the model ran {n_rows} rows "
                    f"(cfg_batch={self.cfg_batch}); pass the layout of this batch"
                )
            roles = roles[example]
        else:
            roles = torch.full((n_rows, k), ROLE_ID["text"], dtype=torch.long)
        keep = torch.ones(n_rows, k, dtype=torch.bool)
        if self.roles is not None:
            keep &= torch.isin(roles, self.roles)
        if self.positions is not None and point not in self.decoder_points:  # positions: the backbone's
            keep &= torch.isin(pos, self.positions)[None, :]
        r_idx, p_idx = keep.nonzero(as_tuple=True)
        values = t[r_idx.to(t.device), p_idx.to(t.device)].to(device=self.device, dtype=self.dtype or t.dtype)
        self.records[point].append(
            Rows(
                values=values,
                example=example[r_idx],
                pos=pos[p_idx],
                role=roles[r_idx, p_idx],
                step=torch.full_like(r_idx, step),
                branch=branch[r_idx],
                timestep=torch.full(r_idx.shape, timestep, dtype=torch.float32),
            )
        )

    # -- reading ----------------------------------------------------------------------------
    def rows(self, point: str, step: int | None = None, branch: str | int | None = None) -> Rows:
        """All rows captured at ``point`` (optionally one generation step / guidance branch)."""
        if point not in self.records:
            raise KeyError(f"point {point!r} was not captured; captured: {', '.join(self.points)}")
        parts = self.records[point]
        if not parts:
            raise ValueError(
                f"nothing was captured at {point!r}: its module was not called (did the model run inside "
                "the capture? generation-only points such as gen_head.in fire only during generation)"
            )
        out = Rows.cat(parts)
        keep = torch.ones(len(out), dtype=torch.bool)
        if step is not None:
            keep &= out.step == step
        if branch is not None:
            keep &= out.branch == (branch if isinstance(branch, int) else BRANCH_IDS[branch])
        return out.select(keep)

    def dense(self, point: str, branch: str | int = "cond") -> torch.Tensor:
        """``[batch, pos, *feature]``: rows placed at their (example, position), all steps joined.

        Raises when the selection left holes (use :meth:`rows` then).
        """
        r = self.rows(point, branch=branch)
        n_ex, n_pos = int(r.example.max()) + 1, int(r.pos.max()) + 1
        p0 = int(r.pos.min())
        out = torch.full((n_ex, n_pos - p0, *r.values.shape[1:]), float("nan"), dtype=r.values.dtype)
        filled = torch.zeros(n_ex, n_pos - p0, dtype=torch.bool)
        out[r.example, r.pos - p0] = r.values
        filled[r.example, r.pos - p0] = True
        if not bool(filled.all()):
            raise ValueError(
                f"the capture at {point!r} kept {int(filled.sum())} of {filled.numel()} positions "
                "(a role/position selection); read it with .rows(point)"
            )
        return out

    def __getitem__(self, point: str) -> torch.Tensor:
        return self.dense(point)

    def __contains__(self, point: str) -> bool:
        return point in self.records

    def __repr__(self) -> str:
        sizes = {p: sum(len(r) for r in rs) for p, rs in self.records.items()}
        return f"Captured({len(self.points)} points, {len(self.calls)} calls, rows={sizes})"


class capture(HookSet):  # noqa: N801 — used as a context manager, like torch.no_grad
    """Context manager: hook ``points`` of ``model`` and collect them into a :class:`Captured`.

    Args:
        model: the model (a transformers model, a sandbox model, any adapted module).
        points: names, globs or TransformerLens aliases (``"blocks.*.resid_post"``).
        adapter: the family adapter; found from the model's class when omitted.
        layout: roles of the batch's positions ``[batch, pos]`` (needed to select roles).
        roles: keep only positions with these roles; ``positions``: only these positions.
        dtype, device: where captured tensors go (default: same dtype, CPU).
        cfg_batch: conditional batch size when classifier-free guidance doubles the batch.
        expect: the pattern of backbone calls (``"any"``, or ``"generation"``: one prompt pass then
            single steps); a call that breaks it raises :class:`uniprobe.hooks.calls.CallPatternError`.
        key_roles / key_positions: the key columns of ``blocks.*.attn.pattern|scores`` (attention mass
            per key role, or per-key weights at those positions; see :mod:`uniprobe.hooks.attn_capture`).
    """

    def __init__(
        self,
        model: nn.Module,
        points: str | Iterable[str] = "blocks.*.resid_post",
        *,
        adapter: Adapter | None = None,
        layout: TokenLayout | None = None,
        roles: Iterable[str] | None = None,
        positions: Iterable[int] | None = None,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        cfg_batch: int | None = None,
        expect: str = "any",
        key_roles: Iterable[str] | None = None,
        key_positions: Iterable[int] | None = None,
    ) -> None:
        from uniprobe.hooks.adapters import adapter_for

        super().__init__()
        self.model = model
        self.adapter = adapter or adapter_for(model)
        self.points = self.adapter.expand(model, points)
        log = CallLog(model, expect)
        self.result = Captured(self.points, layout, roles, positions, dtype, device, cfg_batch, log)
        self.keys = (key_roles, key_positions)

    def install(self) -> None:
        result = self.result
        track_calls(self, self.model, self.adapter.blocks, result.log)
        if self.adapter.decoder:
            track_decoder_steps(self, self.model, self.adapter.decoder, result.decoder_steps)
            result.decoder_points = self.adapter.decoder_points(self.model) & set(self.points)
        if self.adapter.timestep_module:  # a flow backbone: its calls are denoising passes
            track_timesteps(self, self.model, self.adapter.timestep_module, result.log)
        attn = install_attention_capture(self, self.model, self.adapter, result, self.points, *self.keys)
        for point in self.points:
            if point not in attn:
                self.read(self.model, self.adapter.site(self.model, point), _adder(result, point))

    def __enter__(self) -> Captured:  # type: ignore[override] — the capture hands out its result
        super().__enter__()
        return self.result


def _adder(result: Captured, point: str) -> Callable[[torch.Tensor], None]:
    """``tensor -> None``: records one call's tensor at ``point`` (a closure per point)."""
    return lambda t: result.add(point, t)
