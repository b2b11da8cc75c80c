"""Plain causal LMs (Llama, Qwen2, Mistral, Gemma, ...): the text-only case."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn
from uniprobe.hooks.adapters.base import Adapter, ModelInputs
from uniprobe.hooks.adapters.common import pad_ids, roles_from_ids


def _pad_id(model: nn.Module) -> int:
    pad = getattr(model.config, "pad_token_id", None)
    return 0 if pad is None else int(pad)


def prepare_text(
    model: nn.Module, examples: Sequence[dict[str, Any]], mode: str = "understanding"
) -> ModelInputs:
    """Right-padded ``input_ids`` and ``attention_mask``; every real position is ``text``."""
    ids, mask = pad_ids(examples, _pad_id(model))
    return ModelInputs(
        {"input_ids": ids, "attention_mask": mask}, roles_from_ids(ids, mask, examples=examples)
    )


CAUSAL_LM = Adapter(
    name="causal_lm",
    model_classes=(
        "LlamaForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
        "MistralForCausalLM",
        "GemmaForCausalLM",
        "Gemma2ForCausalLM",
        "PhiForCausalLM",
        "Phi3ForCausalLM",
        "OlmoForCausalLM",
    ),
    blocks="model.layers",
    final_norm="model.norm",
    lm_head="lm_head",
    prepare=prepare_text,
    tl_view=lambda model: model,
    notes="text-only decoder; every position is 'text'",
)
