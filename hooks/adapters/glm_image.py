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
the source-image placeholders, ``pad``; generated tokens are ``image_gen``.

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
    """Ids (left-padded for generation), source images packed, and every sample's grids
    (its source grids, then its target grid): ``input_ids / attention_mask [b, pos]``,
    ``pixel_values [patches, C·p·p]``, ``image_grid_thw [n_grids, 3]``, ``images_per_sample [b]``."""
    cfg = model.config
    ids, mask = pad_ids(
        examples, int(cfg.text_config.pad_token_id), side="left" if mode == "generation" else "right"
    )
    layout = roles_from_ids(
        ids, mask, [int(cfg.image_token_id)], "image_und", examples, tail_role="image_gen"
    )
    grids, pixels, per_sample = [], [], []
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
        if "pixel_values" in ex:
            pixels.append(torch.as_tensor(ex["pixel_values"], dtype=torch.float32))
        h, w = ex.get("target_grid", DEFAULT_TARGET)
        grids += source + [[1, int(h), int(w)]]
        per_sample.append(len(source) + 1)
    kwargs: dict[str, Any] = {
        "input_ids": ids,
        "attention_mask": mask,
        "image_grid_thw": torch.tensor(grids, dtype=torch.long),
        "images_per_sample": torch.tensor(per_sample, dtype=torch.long),
    }
    if pixels:
        kwargs["pixel_values"] = torch.cat(pixels)
    return ModelInputs(kwargs, layout)


def target_tokens(inputs: ModelInputs) -> int:
    """Image tokens to generate: ``h · w`` of the target grid, the same for every sample."""
    grids, per = inputs.kwargs["image_grid_thw"], inputs.kwargs["images_per_sample"]
    targets = {tuple(grids[int(end) - 1].tolist()) for end in per.cumsum(0)}
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
        **inputs.kwargs,
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
    generate=generate,
    notes="AR image-codebook tokens (lm_head scores the vision vocabulary), then a diffusers DiT decoder",
)
