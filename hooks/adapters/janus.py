"""Janus / Janus-Pro (transformers ``JanusForConditionalGeneration``).

One Llama residual stream over text and image tokens. Understanding: ``image_token_id``
placeholders in ``input_ids`` are replaced by SigLIP features (role ``image_und``).
Generation: the model's own ``generate(generation_mode="image")`` with classifier-free
guidance (batch doubled: conditional rows first); image tokens enter through
``generation_embeddings`` → ``generation_aligner`` and leave through ``generation_head``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from uniprobe.hooks.adapters.base import Adapter, ModelInputs, Site
from uniprobe.hooks.adapters.common import pad_ids, roles_from_ids


def _pad(model: nn.Module) -> int:
    pad = getattr(model.config.text_config, "pad_token_id", None)
    return 0 if pad is None else int(pad)


def prepare(model: nn.Module, examples: Sequence[dict[str, Any]], mode: str = "understanding") -> ModelInputs:
    """Understanding: right-padded ids (+ ``pixel_values [b, 3, H, W]``); generation: left-padded prompts."""
    if mode == "generation":
        ids, mask = pad_ids(examples, _pad(model), side="left")
        layout = roles_from_ids(ids, mask, examples=examples, tail_role="image_gen")
        return ModelInputs({"input_ids": ids, "attention_mask": mask}, layout)
    ids, mask = pad_ids(examples, _pad(model))
    kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
    if any("pixel_values" in ex for ex in examples):
        kwargs["pixel_values"] = torch.stack([torch.as_tensor(ex["pixel_values"]) for ex in examples])
    layout = roles_from_ids(ids, mask, [model.config.image_token_id], "image_und", examples)
    return ModelInputs(kwargs, layout)


@torch.no_grad()
def generate(
    model: nn.Module,
    inputs: ModelInputs,
    *,
    guidance_scale: float = 2.0,
    boi_token_id: int | None = None,
    bos_token_id: int | None = None,
    do_sample: bool = False,
) -> torch.Tensor:
    """Image tokens ``[batch, num_image_tokens]`` from the model's own image generation.

    Capture during this call with ``cfg_batch=batch`` to tag conditional/unconditional rows.
    """
    from transformers import GenerationConfig

    text_cfg = model.config.text_config
    bos = bos_token_id if bos_token_id is not None else text_cfg.bos_token_id
    boi = boi_token_id if boi_token_id is not None else int(inputs.kwargs["input_ids"][0, -1])
    gen_cfg = GenerationConfig(
        bos_token_id=bos,
        pad_token_id=_pad(model),
        guidance_scale=guidance_scale,
        do_sample=do_sample,
        generation_kwargs={"boi_token_id": boi},
    )
    return model.generate(
        inputs.kwargs["input_ids"],
        attention_mask=inputs.kwargs["attention_mask"],
        generation_config=gen_cfg,
        generation_mode="image",
    )


def teacher_forced(inputs: ModelInputs, image_tokens: torch.Tensor | Sequence[int]) -> ModelInputs:
    """Generation-mode prompt inputs (ending in ``<boi>``) plus target image tokens ``[B, n]`` or ``[n]``.

    The layout grows by ``n - 1`` ``image_gen`` positions (the fed-back tokens).
    """
    ids = inputs.kwargs["input_ids"]
    img = torch.as_tensor(image_tokens, dtype=torch.long)
    img = img.expand(ids.shape[0], -1) if img.dim() == 1 else img
    layout = inputs.layout.extend(img.shape[1] - 1, "image_gen")
    return ModelInputs({**inputs.kwargs, "image_tokens": img.clone()}, layout)


def image_forward(model: nn.Module, inputs: ModelInputs) -> torch.Tensor:
    """Teacher-forced image pass → generation-head logits ``[b, n, codebook]``.

    Row ``k`` predicts ``image_tokens[:, k]`` (from the hidden state one position earlier).
    Positions count real tokens only (left padding), as in the model's own generation.
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


def _lm_view(model: nn.Module) -> nn.Module:
    """A ``LlamaForCausalLM`` sharing Janus's language model and text head (no copy)."""
    from transformers import LlamaForCausalLM

    view = LlamaForCausalLM.__new__(LlamaForCausalLM)
    nn.Module.__init__(view)
    view.config = model.config.text_config
    view.model = model.model.language_model
    view.lm_head = model.lm_head
    view.generation_config = model.generation_config
    return view


def _embed(model: nn.Module, inputs: ModelInputs) -> torch.Tensor:
    """``inputs_embeds [b, pos, d]`` with image features merged, as Janus's forward builds them."""
    kw = inputs.kwargs
    embeds = model.get_input_embeddings()(kw["input_ids"])
    if "pixel_values" in kw:
        feats = model.model.get_image_features(kw["pixel_values"]).pooler_output
        mask = (kw["input_ids"] == model.config.image_token_id).unsqueeze(-1)
        embeds = embeds.masked_scatter(mask, feats.to(embeds.dtype))
    return embeds


JANUS = Adapter(
    name="janus",
    model_classes=("JanusForConditionalGeneration",),
    blocks="model.language_model.layers",
    final_norm="model.language_model.norm",
    lm_head="lm_head",
    extra={
        "gen_head.in": Site("model.generation_head", "input"),
        "gen_head.out": Site("model.generation_head", "output"),
    },
    prepare=prepare,
    generate=generate,
    tl_view=_lm_view,
    tl_embed=_embed,
    generation_cfg=True,
    teacher_forced=teacher_forced,
    image_forward=image_forward,
    notes="understanding: image_token_id placeholders; generation: generate(generation_mode='image'), CFG",
)
