"""GLM-Image (``transformers`` ``GlmImageForConditionalGeneration``): AR image tokens, then a DiT.

The autoregressive part is one GLM text decoder over a stream of text ids and image-codebook ids
(ids ``0 .. num_embeddings-1`` of the shared embedding, with ``image_start`` / ``image_end`` right
after them); its ``lm_head`` scores the vision vocabulary only. A source image (image-to-image) is
encoded by the vision tower and VQ-quantised into codebook ids that replace the ``image_token_id``
placeholders of the prompt; the model then writes the target image's codebook ids after the final
``image_start`` with 2-D (M)RoPE positions over the target grid. Those tokens condition GLM-Image's
DiT decoder, which lives in diffusers (``GlmImageTransformer2DModel`` / ``GlmImagePipeline``), not
in this class.

Examples: ``{"input_ids": [...]}`` (ending in ``image_start`` to generate), optionally
``"pixel_values"`` (packed patches ``[patches, C·p·p]`` of the source images, as GLM-Image's image
processor makes them) with ``"image_grid_thw"`` (``[[1, h, w], ...]`` per source image), and
``"target_grid": [h, w]`` (default ``[2, 2]``, a tiny target). Roles: ``text``, ``image_und`` at
the source-image placeholders, ``pad``; generated tokens are ``image_gen``. Prepared inputs keep
images batch-first (so the patching engine can stack a batch row by row); the adapter's ``forward``
packs them as the model takes them (:func:`model_kwargs`). Teacher forcing (:func:`teacher_forced`,
:func:`image_forward`) runs the prompt, the target tokens and ``image_end`` in one forward: a
complete image gets the same 2-D positions as during generation, so its logits are generation's.

Needs transformers >= 5.23 (``GlmImageForConditionalGeneration``); checked at run time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from uniprobe.hooks.adapters.base import Adapter, ModelInputs
from uniprobe.hooks.adapters.common import pad_ids, roles_from_ids
from uniprobe.hooks.calls import transformers_version
from uniprobe.hooks.errors import MissingDependencyError, UniprobeError, UsageError

DEFAULT_TARGET = (2, 2)


def require_glm_image() -> Any:
    """transformers' ``GlmImageForConditionalGeneration`` class, or an error naming the version needed."""
    try:
        from transformers import GlmImageForConditionalGeneration
    except ImportError as err:
        raise MissingDependencyError(
            f"transformers {transformers_version()} has no GlmImageForConditionalGeneration; GLM-Image needs "
            "transformers>=5.23 (pip install -c constraints.txt -e .)"
        ) from err
    return GlmImageForConditionalGeneration


def codebook_size(model: nn.Module) -> int:
    """How many image-codebook ids the model writes (``vq_config.num_embeddings``)."""
    return int(model.config.vq_config.num_embeddings)


def prepare(model: nn.Module, examples: Sequence[dict[str, Any]], mode: str = "understanding") -> ModelInputs:
    """Ids (left-padded for generation) and every sample's images, batch-first so that batches can
    be stacked row by row (the patching engine repeats ``[B, ...]`` tensors):
    ``input_ids / attention_mask [b, pos]``, ``grids [b, max_grids, 3]`` (its source grids, then its
    target grid; zero rows pad), ``images_per_sample [b]``, and with source images
    ``pixel_values [b, max_patches, C·p·p]`` (zero rows pad) and ``patches [b]``.
    :func:`model_kwargs` packs them the way the model takes them."""
    cfg = model.config
    side = "left" if mode == "generation" else "right"
    ids, mask = pad_ids(examples, int(cfg.text_config.pad_token_id), side=side)
    layout = roles_from_ids(
        ids, mask, [int(cfg.image_token_id)], "image_und", examples, tail_role="image_gen"
    )
    grids, pixels = [], []
    for i, ex in enumerate(examples):
        source = [list(map(int, g)) for g in ex.get("image_grid_thw", [])]
        n_placeholders = int((torch.as_tensor(ex["input_ids"]) == cfg.image_token_id).sum())
        n_patches = sum(t * h * w for t, h, w in source)
        if n_placeholders != n_patches:
            raise UsageError(
                f"example {i}: {n_placeholders} image placeholders (id {cfg.image_token_id}) but "
                f"image_grid_thw {source} has {n_patches} patches; give one placeholder per patch"
            )
        if source and "pixel_values" not in ex:
            raise UsageError(f"example {i}: image_grid_thw {source} without pixel_values")
        h, w = ex.get("target_grid", DEFAULT_TARGET)
        grids.append(torch.tensor(source + [[1, int(h), int(w)]], dtype=torch.long))
        pixels.append(torch.as_tensor(ex.get("pixel_values", torch.zeros(0, 0)), dtype=torch.float32))
    kwargs: dict[str, Any] = {
        "input_ids": ids,
        "attention_mask": mask,
        "grids": _stack_padded(grids),
        "images_per_sample": torch.tensor([len(g) for g in grids], dtype=torch.long),
    }
    if any(len(p) for p in pixels):
        width = max(p.shape[-1] for p in pixels if len(p))
        kwargs["pixel_values"] = _stack_padded([p if len(p) else torch.zeros(0, width) for p in pixels])
        kwargs["patches"] = torch.tensor([len(p) for p in pixels], dtype=torch.long)
    return ModelInputs(kwargs, layout)


def _stack_padded(rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[n_i, *f]`` tensors → ``[len, max n_i, *f]``, zero-padded."""
    out = rows[0].new_zeros(len(rows), max(len(r) for r in rows), *rows[0].shape[1:])
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def model_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The batch-first kwargs of :func:`prepare` (possibly stacked ``m`` times) packed as
    ``GlmImageForConditionalGeneration`` takes them: ``image_grid_thw [n_grids, 3]`` and
    ``pixel_values [n_patches, C·p·p]`` concatenated over rows, ``images_per_sample [rows]``.
    Teacher-forced inputs (``image_tokens``) are left out (see :func:`forward`)."""
    per = kwargs["images_per_sample"]
    out = {k: v for k, v in kwargs.items() if k not in ("grids", "pixel_values", "patches", "image_tokens")}
    out["image_grid_thw"] = torch.cat([g[: int(n)] for g, n in zip(kwargs["grids"], per, strict=True)])
    if "pixel_values" in kwargs:
        rows = zip(kwargs["pixel_values"], kwargs["patches"], strict=True)
        out["pixel_values"] = torch.cat([p[: int(n)] for p, n in rows])
    return out


def forward(model: nn.Module, inputs: ModelInputs) -> Any:
    """The model's forward on prepared inputs; teacher-forced inputs run the prompt, the target
    image tokens and ``image_end`` (a complete image, so its positions are the 2-D ones of generation)."""
    kw = model_kwargs(inputs.kwargs)
    if "image_tokens" in inputs.kwargs:
        img = inputs.kwargs["image_tokens"]
        end = img.new_full((img.shape[0], 1), int(model.config.image_end_token_id))
        kw["input_ids"] = torch.cat([kw["input_ids"], img, end], dim=1)
        kw["attention_mask"] = torch.cat(
            [kw["attention_mask"], torch.ones_like(img), torch.ones_like(end)], dim=1
        )
    return model(**kw)


def teacher_forced(inputs: ModelInputs, image_tokens: torch.Tensor | Sequence[int]) -> ModelInputs:
    """Generation-mode prompt inputs (ending in ``image_start``) plus target image tokens ``[B, n]``
    or ``[n]``: the layout grows by ``n + 1`` ``image_gen`` positions (the tokens and ``image_end``)."""
    ids = inputs.kwargs["input_ids"]
    img = torch.as_tensor(image_tokens, dtype=torch.long)
    img = img.expand(ids.shape[0], -1) if img.dim() == 1 else img
    if img.shape[1] != target_tokens(inputs):
        raise UsageError(f"{img.shape[1]} image tokens for a target grid of {target_tokens(inputs)} tokens")
    layout = inputs.layout.extend(img.shape[1] + 1, "image_gen")
    return ModelInputs({**inputs.kwargs, "image_tokens": img.clone()}, layout)


def image_forward(model: nn.Module, inputs: ModelInputs) -> torch.Tensor:
    """Teacher-forced image pass → codebook logits ``[b, n, codebook]``: row ``k`` predicts image
    token ``k`` (from the position before it, as during generation)."""
    n, start = inputs.kwargs["image_tokens"].shape[1], inputs.kwargs["input_ids"].shape[1] - 1
    return forward(model, inputs).logits[:, start : start + n, : codebook_size(model)]


def target_tokens(inputs: ModelInputs) -> int:
    """Image tokens to generate: ``h · w`` of the target grid, the same for every sample."""
    grids, per = inputs.kwargs["grids"], inputs.kwargs["images_per_sample"]
    targets = {tuple(g[int(n) - 1].tolist()) for g, n in zip(grids, per, strict=True)}
    if len(targets) != 1:
        raise UsageError(f"one batch must share one target grid, got {sorted(targets)}; batch them apart")
    t, h, w = targets.pop()
    return t * h * w


def generate(model: nn.Module, inputs: ModelInputs) -> torch.Tensor:
    """Greedy image tokens ``[batch, h·w]`` through the model's own ``generate`` (its 2-D decode
    positions over the target grid), restricted to codebook ids (start/end and unused ids suppressed)."""
    n = target_tokens(inputs)
    vocab = int(model.config.text_config.vision_vocab_size)
    out = model.generate(
        **model_kwargs(inputs.kwargs),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        suppress_tokens=list(range(codebook_size(model), vocab)),
        pad_token_id=int(model.config.text_config.pad_token_id),
    )
    new = out[:, inputs.kwargs["input_ids"].shape[1] :]
    if new.shape[1] != n or bool((new >= codebook_size(model)).any()):
        raise UniprobeError(  # generate's keywords or output layout moved (a transformers change)
            f"GlmImageForConditionalGeneration.generate (transformers {transformers_version()}) returned "
            f"{new.shape[1]} new tokens, ids {sorted(set(new.flatten().tolist()))[:8]}; "
            f"expected {n} codebook ids < {codebook_size(model)}"
        )
    return new


GLM_IMAGE = Adapter(
    name="glm_image",
    model_classes=("GlmImageForConditionalGeneration",),
    blocks="model.language_model.layers",
    final_norm="model.language_model.norm",
    lm_head="lm_head",
    prepare=prepare,
    forward=forward,
    generate=generate,
    teacher_forced=teacher_forced,
    image_forward=image_forward,
    notes="AR image-codebook tokens (lm_head scores the vision vocabulary), then a diffusers DiT decoder",
)
