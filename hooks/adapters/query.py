"""Declarative adapter for query-based unified models (MetaQuery, BLIP3-o, OpenUni).

Such a model appends N learnable query tokens after the prompt; their final hidden states go
through a connector into an image decoder. A user serves a checkpoint by filling in a spec —
module paths only — in Python or in a JSON/YAML file::

    {"name": "my-metaquery", "model_classes": ["MetaQueryModel"],
     "blocks": "lm.model.layers", "final_norm": "lm.model.norm", "lm_head": "lm.lm_head",
     "queries": "queries", "connector": "connector", "decoder": "decoder",
     "lm": "lm", "embed_method": "embed_inputs"}

``queries`` names the ``[N, d]`` query parameter; the model's forward must take
``input_ids`` / ``attention_mask`` and append the queries itself. ``lm`` (the transformers
causal LM inside) and ``embed_method`` (``input_ids → inputs_embeds`` with the queries
appended) let TransformerLens and nnsight run the same backbone.

Points: ``queries`` (connector input: the query tokens' final hidden states ``[b, N, d]``),
``connector.out`` ``[b, N, d_dec]``, ``decoder.out``; the query positions have role ``query``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from uniprobe.hooks.adapters.base import Adapter, ModelInputs, Site, get_module
from uniprobe.hooks.adapters.common import pad_ids, roles_from_ids

REQUIRED = ("blocks", "final_norm", "lm_head", "queries", "connector")
OPTIONAL = ("name", "model_classes", "decoder", "lm", "embed_method", "attn", "mlp", "pad_token_id", "notes")


def query_adapter(spec: dict[str, Any]) -> Adapter:
    """Build an :class:`Adapter` from a query-based model spec (see the module docstring)."""
    missing = [k for k in REQUIRED if k not in spec]
    unknown = [k for k in spec if k not in REQUIRED + OPTIONAL]
    if missing or unknown:
        raise ValueError(
            f"query adapter spec: missing keys {missing or 'none'}, unknown keys {unknown or 'none'}; "
            f"required: {', '.join(REQUIRED)}; optional: {', '.join(OPTIONAL)}"
        )

    def n_queries(model: nn.Module) -> int:
        return int(_param(model, spec["queries"]).shape[0])

    def prepare(
        model: nn.Module, examples: Sequence[dict[str, Any]], mode: str = "understanding"
    ) -> ModelInputs:
        ids, mask = pad_ids(examples, int(spec.get("pad_token_id", 0)), side="left")
        layout = roles_from_ids(ids, mask, examples=examples).extend(n_queries(model), "query")
        return ModelInputs({"input_ids": ids, "attention_mask": mask}, layout)

    def embed(model: nn.Module, inputs: ModelInputs) -> torch.Tensor:
        return getattr(model, spec.get("embed_method", "embed_inputs"))(inputs.kwargs["input_ids"])

    extra = {"queries": Site(spec["connector"], "input"), "connector.out": Site(spec["connector"], "output")}
    if spec.get("decoder"):
        extra["decoder.out"] = Site(spec["decoder"], "output")
    lm_path = spec.get("lm")
    return Adapter(
        name=spec.get("name", "query"),
        model_classes=tuple(spec.get("model_classes", ())),
        blocks=spec["blocks"],
        final_norm=spec["final_norm"],
        lm_head=spec["lm_head"],
        attn=spec.get("attn", "self_attn"),
        mlp=spec.get("mlp", "mlp"),
        extra=extra,
        prepare=prepare,
        forward=_forward_with_padded_queries,
        tl_view=(lambda model: get_module(model, lm_path)) if lm_path else None,
        tl_embed=embed if lm_path else None,
        notes=spec.get("notes", "query-based: N learnable queries after the prompt → connector → decoder"),
    )


def _forward_with_padded_queries(model: nn.Module, inputs: ModelInputs) -> Any:
    return model(**inputs.kwargs)


def _param(model: nn.Module, path: str) -> torch.Tensor:
    owner, _, name = path.rpartition(".")
    return getattr(get_module(model, owner), name)


def load_adapter_file(path: str | Path) -> Adapter:
    """Read a query-based adapter spec from JSON or YAML."""
    import json

    text = Path(path).read_text()
    if str(path).endswith((".yaml", ".yml")):
        import yaml

        spec = yaml.safe_load(text)
    else:
        spec = json.loads(text)
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: an adapter spec must be a mapping of keys to module paths")
    return query_adapter(spec)


TINY_QUERY = query_adapter(
    {
        "name": "tiny-query",
        "model_classes": ["TinyQueryModel"],
        "blocks": "lm.model.layers",
        "final_norm": "lm.model.norm",
        "lm_head": "lm.lm_head",
        "queries": "queries",
        "connector": "connector",
        "decoder": "decoder",
        "lm": "lm",
        "embed_method": "embed_inputs",
    }
)
