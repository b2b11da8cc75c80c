"""Patching on the generation side.

Autoregressive models (Janus, Emu3, Chameleon, sandbox AR):

- **Teacher-forced** (:func:`teacher_forced` + :func:`image_forward`, the adapter's capabilities;
  for Janus also :func:`janus_teacher_forced` + :func:`janus_image_forward`): one forward over
  ``prompt <boi> img_0 .. img_{n-2}`` returning the generation head's logits ``[b, n, codebook]``
  for every image position; with :class:`~uniprobe.probes.patching.metrics.SequenceLogProb` this is the
  log-probability of a target image, and it runs through the batched exact engine like any run.
- **Free generation** (:func:`patched_generation`): the adapter's own generation loop with
  :class:`StepPatch` es applied at chosen steps. Step 0 is the prompt pass (all prompt positions),
  step ``s ≥ 1`` the pass that feeds the ``s``-th generated token (one position,
  ``prompt_len + s - 1``). With classifier-free guidance only the conditional rows are patched
  unless ``rows`` says otherwise. :func:`generation_effect` judges whole generations.

Query-based models draw in one forward (queries → connector → decoder), so "patching during
generation" is ordinary exact patching of the query positions (role ``query``) or of
``connector.out`` (:func:`query_sites`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from uniprobe.hooks.adapters import adapter_for
from uniprobe.hooks.adapters.base import Adapter, ModelInputs
from uniprobe.hooks.adapters.janus import JANUS
from uniprobe.hooks.calls import Call, CallLog, track_calls, track_timesteps
from uniprobe.hooks.hookset import HookSet
from uniprobe.hooks.layout import TokenLayout
from uniprobe.probes.patching.cross_prompt import Alignment
from uniprobe.probes.patching.metrics import JudgeRate
from uniprobe.probes.patching.results import normalise
from uniprobe.probes.patching.sites import PatchSite, SiteGrid, point_sites, role_sites

# -- teacher forcing (an adapter capability) -----------------------------------------------------


def teacher_forced(
    model: nn.Module,
    inputs: ModelInputs,
    image_tokens: torch.Tensor | Sequence[int],
    *,
    adapter: Adapter | None = None,
) -> ModelInputs:
    """Prompt inputs extended by target ``image_tokens`` ``[B, n]`` / ``[n]`` (the adapter's
    ``teacher_forced``); run them with :func:`image_forward`."""
    return _capability(model, adapter, "teacher_forced")(inputs, image_tokens)


def image_forward(model: nn.Module, inputs: ModelInputs, *, adapter: Adapter | None = None) -> torch.Tensor:
    """The adapter's teacher-forced image pass → logits ``[b, n, codebook]`` (row ``k``: token ``k``)."""
    return _capability(model, adapter, "image_forward")(model, inputs)


def _capability(model: nn.Module, adapter: Adapter | None, name: str) -> Callable[..., Any]:
    adapter = adapter or adapter_for(model)
    fn = getattr(adapter, name)
    if fn is None:
        raise ValueError(f"the {adapter.name!r} adapter has no {name} (teacher-forced image generation)")
    return fn


def janus_teacher_forced(inputs: ModelInputs, image_tokens: torch.Tensor | Sequence[int]) -> ModelInputs:
    """Janus's ``teacher_forced`` (kept by name; the knowledge lives in the Janus adapter)."""
    return JANUS.teacher_forced(inputs, image_tokens)


def janus_image_forward(model: nn.Module, inputs: ModelInputs) -> torch.Tensor:
    """Janus's ``image_forward`` → generation-head logits ``[b, n, codebook]`` (kept by name)."""
    return JANUS.image_forward(model, inputs)


# -- patching free generation ---------------------------------------------------------------------


@dataclass
class StepPatch:
    """At generation ``step``, overwrite ``positions`` (absolute stream positions) at ``point``.

    For a flow model (an adapter with a ``timestep_module``) ``step`` is a denoising step and the
    patch writes its ``cond`` pass only.

    Attributes:
        values: ``[k, *feat]`` (same for every patched row) or ``[rows, k, *feat]``.
        rows: batch rows to patch; ``None`` = all rows of the conditional branch.
    """

    point: str
    step: int
    positions: Sequence[int]
    values: torch.Tensor
    rows: Sequence[int] | None = None
    applied: int = 0


class _StepPatcher(HookSet):
    """Hooks that track the generation step and apply :class:`StepPatch` es (removed on exit)."""

    def __init__(
        self,
        model: nn.Module,
        adapter: Adapter,
        patches: Sequence[StepPatch],
        cond_rows: int | None,
        expect: str = "generation",
    ):
        super().__init__()
        self.model, self.adapter, self.patches, self.cond_rows = model, adapter, list(patches), cond_rows
        self.log = CallLog(model, expect)

    @property
    def calls(self) -> list[Call]:
        return self.log.calls

    def install(self) -> None:
        track_calls(self, self.model, self.adapter.blocks, self.log)
        if self.adapter.timestep_module:  # a flow backbone: steps are denoising steps
            track_timesteps(self, self.model, self.adapter.timestep_module, self.log)
        for point in dict.fromkeys(p.point for p in self.patches):
            todo = [p for p in self.patches if p.point == point]
            self.write(self.model, self.adapter.site(self.model, point), self._applier(todo))

    def _applier(self, patches: list[StepPatch]) -> Callable[[torch.Tensor], torch.Tensor]:
        """``t -> t`` patched by those of ``patches`` due at the current step (a closure per point)."""
        return lambda t: self._apply(t, patches)

    def _apply(self, t: torch.Tensor, patches: list[StepPatch]) -> torch.Tensor:
        call = self.log.last
        step, offset = (call.step, call.offset) if call else (-1, 0)
        todo = [p for p in patches if p.step == step]
        if self.log.branch:  # a flow model's unconditional pass: patches write the conditional one
            todo = []
        if not todo:
            return t
        out = t.clone()
        for p in todo:
            local = [q - offset for q in p.positions]
            if any(not 0 <= q < t.shape[1] for q in local):
                raise ValueError(
                    f"patch at {p.point!r} step {p.step}: positions {list(p.positions)} are outside this "
                    f"step's positions {offset}..{offset + t.shape[1] - 1}"
                )
            rows = list(p.rows) if p.rows is not None else list(range(self.cond_rows or t.shape[0]))
            vals = p.values.to(out.dtype)
            vals = vals.expand(len(rows), *vals.shape) if vals.dim() == out.dim() - 1 else vals
            out[torch.tensor(rows)[:, None], torch.tensor(local)[None, :]] = vals
            p.applied += 1
        return out


@torch.no_grad()
def patched_generation(
    model: nn.Module,
    inputs: ModelInputs,
    patches: Sequence[StepPatch],
    *,
    adapter: Adapter | None = None,
    generate: Callable[..., torch.Tensor] | None = None,
    **generate_kwargs: Any,
) -> torch.Tensor:
    """Generate with ``patches`` applied at their steps → tokens ``[batch, n]``.

    ``generate(model, inputs, **generate_kwargs)`` defaults to the adapter's image generation.
    Raises when a patch never applied (its step did not happen or its point never ran).
    """
    adapter = adapter or adapter_for(model)
    gen = generate or adapter.generate
    if gen is None:
        raise ValueError(f"the {adapter.name!r} adapter has no generation; pass generate=...")
    for p in patches:
        p.applied = 0
    cond = inputs.kwargs["input_ids"].shape[0] if adapter.generation_cfg else None
    # the adapter's own loop is one prompt pass then single steps; a custom one is only checked
    # for continuity
    expect = "generation" if generate is None else "any"
    with _StepPatcher(model, adapter, patches, cond, expect) as patcher:
        tokens = gen(model, inputs, **generate_kwargs)
    missed = [p for p in patches if p.applied == 0]
    if missed:
        steps = sorted({s for s, _, _ in patcher.calls})
        raise RuntimeError(
            f"{len(missed)} patch(es) never applied (e.g. {missed[0].point!r} at step {missed[0].step}); "
            f"the generation ran steps {steps[0] if steps else '-'}..{steps[-1] if steps else '-'}"
        )
    return tokens


def step_patches(
    states: dict[str, torch.Tensor], align: Alignment, points: Sequence[str], step: int = 0
) -> list[StepPatch]:
    """:class:`StepPatch` es writing source ``states[point] [B, pos_src, d]`` at aligned positions."""
    tgt = [t for t, _ in align.pairs]
    src = [s for _, s in align.pairs]
    return [StepPatch(p, step, tgt, states[p][:, src]) for p in points]


@dataclass
class GenerationEffect:
    """Judged generations: rates of the clean, corrupted and patched runs, and the normalised effect."""

    clean: float
    corrupted: float
    patched: float
    tokens: torch.Tensor

    @property
    def normalised(self) -> float:
        return float(normalise(torch.tensor([self.patched]), self.clean, self.corrupted)[0])


def generation_effect(
    model: nn.Module,
    clean: ModelInputs,
    corrupted: ModelInputs,
    patches: Sequence[StepPatch],
    judge: Callable[[torch.Tensor], bool],
    *,
    adapter: Adapter | None = None,
    generate: Callable[..., torch.Tensor] | None = None,
    **generate_kwargs: Any,
) -> GenerationEffect:
    """Does the patched corrupted run now draw the right thing? ``judge(tokens [n]) → bool`` per example."""
    adapter = adapter or adapter_for(model)
    gen = generate or adapter.generate
    rate = JudgeRate(judge)
    with torch.no_grad():
        clean_t = gen(model, clean, **generate_kwargs)
        corr_t = gen(model, corrupted, **generate_kwargs)
    patched = patched_generation(model, corrupted, patches, adapter=adapter, generate=gen, **generate_kwargs)
    return GenerationEffect(
        clean=float(rate(clean_t).mean()),
        corrupted=float(rate(corr_t).mean()),
        patched=float(rate(patched).mean()),
        tokens=patched,
    )


# -- query-based models ---------------------------------------------------------------------------


def query_sites(
    model: nn.Module,
    layout: TokenLayout,
    kinds: Sequence[str] = ("resid_pre",),
    *,
    adapter: Adapter | None = None,
    per_query: bool = True,
) -> tuple[SiteGrid, list[PatchSite]]:
    """Sites of a query-based model: ``kind × layer`` over the ``query`` positions (all together),
    and ``connector.out`` per query (``per_query``) or all at once."""
    adapter = adapter or adapter_for(model)
    grid = role_sites(adapter.n_layers(model), layout, ["query"], kinds)
    n = len(layout.positions(0, "query"))
    conn = point_sites("connector.out", list(range(n))) if per_query else point_sites("connector.out", n=n)
    return grid, conn
