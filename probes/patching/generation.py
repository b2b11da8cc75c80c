"""Patching on the generation side.

Autoregressive models (Janus, Emu3, Chameleon, sandbox AR):

- **Teacher-forced** (:func:`janus_teacher_forced` + :func:`janus_image_forward`): one forward over
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
from uniprobe.hooks.adapters.base import Adapter, ModelInputs, get_module
from uniprobe.hooks.calls import Call, CallLog, track_calls
from uniprobe.hooks.capture import input_tensor, pick
from uniprobe.hooks.layout import TokenLayout
from uniprobe.probes.patching.cross_prompt import Alignment
from uniprobe.probes.patching.hooking import replace_input, replace_output
from uniprobe.probes.patching.metrics import JudgeRate
from uniprobe.probes.patching.results import normalise
from uniprobe.probes.patching.sites import PatchSite, SiteGrid, point_sites, role_sites

# -- teacher forcing (Janus) ----------------------------------------------------------------------


def janus_teacher_forced(inputs: ModelInputs, image_tokens: torch.Tensor | Sequence[int]) -> ModelInputs:
    """Generation-mode prompt inputs (ending in ``<boi>``) plus target image tokens ``[B, n]`` or ``[n]``.

    The layout grows by ``n - 1`` ``image_gen`` positions (the fed-back tokens).
    """
    ids = inputs.kwargs["input_ids"]
    img = torch.as_tensor(image_tokens, dtype=torch.long)
    img = img.expand(ids.shape[0], -1) if img.dim() == 1 else img
    layout = inputs.layout.extend(img.shape[1] - 1, "image_gen")
    return ModelInputs({**inputs.kwargs, "image_tokens": img.clone()}, layout)


def janus_image_forward(model: nn.Module, inputs: ModelInputs) -> torch.Tensor:
    """Teacher-forced Janus image pass → generation-head logits ``[b, n, codebook]``.

    Row ``k`` predicts ``image_tokens[:, k]`` (from the hidden state one position earlier).
    Positions count real tokens only (left padding), as in the adapter's generation.
    """
    kw = inputs.kwargs
    ids, mask, img = kw["input_ids"], kw["attention_mask"], kw["image_tokens"]
    text = model.get_input_embeddings()(ids)
    gen = model.prepare_embeddings_for_image_generation(img[:, :-1])
    embeds = torch.cat([text, gen.to(text.dtype)], dim=1)
    mask = torch.cat([mask, mask.new_ones(mask.shape[0], img.shape[1] - 1)], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    hidden = model.model.language_model(
        inputs_embeds=embeds, attention_mask=mask, position_ids=positions
    ).last_hidden_state
    return model.model.generation_head(hidden[:, ids.shape[1] - 1 :])


# -- patching free generation ---------------------------------------------------------------------


@dataclass
class StepPatch:
    """At generation ``step``, overwrite ``positions`` (absolute stream positions) at ``point``.

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


class _StepPatcher:
    """Hooks that track the generation step and apply :class:`StepPatch` es (removed on exit)."""

    def __init__(
        self,
        model: nn.Module,
        adapter: Adapter,
        patches: Sequence[StepPatch],
        cond_rows: int | None,
        expect: str = "generation",
    ):
        self.model, self.adapter, self.patches, self.cond_rows = model, adapter, list(patches), cond_rows
        self.log = CallLog(model, expect)
        self._handles: list[Any] = []

    @property
    def calls(self) -> list[Call]:
        return self.log.calls

    def __enter__(self) -> _StepPatcher:
        try:
            self._handles.append(track_calls(self.model, self.adapter.blocks, self.log))
            for point in dict.fromkeys(p.point for p in self.patches):
                self._register(point, [p for p in self.patches if p.point == point])
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _apply(self, t: torch.Tensor, patches: list[StepPatch]) -> torch.Tensor:
        call = self.log.last
        step, offset = (call.step, call.offset) if call else (-1, 0)
        todo = [p for p in patches if p.step == step]
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

    def _register(self, point: str, patches: list[StepPatch]) -> None:
        site = self.adapter.site(self.model, point)
        module = get_module(self.model, site.module)
        if site.io == "input":

            def pre(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
                return replace_input(args, kwargs, self._apply(input_tensor(args, kwargs), patches))

            self._handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        else:

            def post(mod: nn.Module, args: tuple, output: Any) -> Any:
                return replace_output(output, site.index, self._apply(pick(output, site.index), patches))

            self._handles.append(module.register_forward_hook(post))


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
