"""Emu3 and Chameleon: image tokens are ordinary vocabulary ids in one stream.

Understanding reads image tokens already in ``input_ids`` (from the model's VQ tokenizer, or
teacher-forced); ``mode="generation"`` marks the image tokens of a prompt as ``image_gen``
(teacher-forced generation). Free generation is a greedy loop restricted to image-token ids
that reads the unembedding directly — Chameleon's own forward suppresses image-token logits,
so its ``generate`` never emits them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from uniprobe.hooks.adapters.base import Adapter, ModelInputs
from uniprobe.hooks.adapters.common import greedy_image_tokens, pad_ids, roles_from_ids


def image_token_ids(model: nn.Module) -> list[int]:
    """Vocabulary ids of image tokens (Emu3: visual tokens and end-of-line; Chameleon: ``IMGIMG…``)."""
    mapping = model.model.vocabulary_mapping
    ids = list(mapping.image_tokens)
    eol = getattr(mapping, "eol_token_id", None)
    return ids + ([eol] if eol is not None else [])


def _text_config(model: nn.Module) -> Any:
    return getattr(model.config, "text_config", model.config)


def prepare(model: nn.Module, examples: Sequence[dict[str, Any]], mode: str = "understanding") -> ModelInputs:
    """Ids with image tokens marked ``image_und`` (understanding) or ``image_gen`` (generation)."""
    pad = getattr(_text_config(model), "pad_token_id", None) or 0
    side = "left" if mode == "generation" else "right"
    ids, mask = pad_ids(examples, int(pad), side=side)
    role = "image_gen" if mode == "generation" else "image_und"
    layout = roles_from_ids(ids, mask, image_token_ids(model), role, examples, tail_role="image_gen")
    kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
    if any("image_sizes" in ex for ex in examples):
        kwargs["image_sizes"] = torch.stack([torch.as_tensor(ex["image_sizes"]) for ex in examples])
    return ModelInputs(kwargs, layout)


def _backbone(model: nn.Module) -> nn.Module:
    return model.model.text_model if hasattr(model.model, "text_model") else model.model


def generate(model: nn.Module, inputs: ModelInputs, *, height: int = 2, width: int = 2) -> torch.Tensor:
    """Greedy image tokens ``[batch, n]``: ``height × width`` tiles (Emu3 adds an end-of-line per row)."""
    mapping = model.model.vocabulary_mapping
    allowed = torch.tensor(sorted(mapping.image_tokens), dtype=torch.long)
    eol = getattr(mapping, "eol_token_id", None)
    row = width + (1 if eol is not None else 0)
    forced = {r * row + width: eol for r in range(height)} if eol is not None else None
    backbone = _backbone(model)
    return greedy_image_tokens(
        backbone,
        model.lm_head,
        backbone.get_input_embeddings(),
        inputs.kwargs["input_ids"],
        inputs.kwargs["attention_mask"],
        allowed,
        height * row,
        forced,
    )


EMU3 = Adapter(
    name="emu3",
    model_classes=("Emu3ForConditionalGeneration",),
    blocks="model.text_model.layers",
    final_norm="model.text_model.norm",
    lm_head="lm_head",
    prepare=prepare,
    generate=generate,
    tl_view=lambda model: model,
    notes="image tokens '<|visual tokenNNNNNN|>' in the shared vocabulary; '<|extra_200|>' ends a row",
)

CHAMELEON = Adapter(
    name="chameleon",
    model_classes=("ChameleonForConditionalGeneration",),
    blocks="model.layers",
    final_norm="model.norm",
    lm_head="lm_head",
    prepare=prepare,
    generate=generate,
    notes="image tokens 'IMGIMG…Z' in the shared vocabulary; no TransformerLens adapter",
)
