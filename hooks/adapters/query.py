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

A **diffusion decoder** (a diffusers ``PixArtTransformer2DModel`` / ``UNet2DConditionModel`` / ...,
one forward per denoising step, conditioned on the connector's output through
``encoder_hidden_states``) is declared with ``"diffusion": true`` and, optionally,
``"decoder_blocks"`` (path of its block ``ModuleList``: points ``decoder.blocks.{i}``, each block's
output ``[rows, tokens, d]``) and ``"decoder_cond"`` (the module whose output is the conditioning as
the blocks read it, e.g. PixArt's ``decoder.caption_projection``: point ``decoder.cond``
``[rows, N, d_dec]``, where the connector's output enters). Captures tag these points and
``decoder.out`` by denoising step and timestep (:mod:`uniprobe.hooks.capture`); sample with
:func:`uniprobe.hooks.diffusion.denoise`, measure with
:class:`uniprobe.probes.patching.denoising.DenoisingLoss`.

Such an adapter's ``generate(model, inputs, num_inference_steps=4, guidance_scale=1.0, seed=0)``
runs the backbone once, reads the connector's output and samples latents ``[batch, *latent_shape]``
with :func:`~uniprobe.hooks.diffusion.denoise`; the scheduler, the latent shape and extra decoder
keywords come from the model's ``scheduler``, ``latent_shape`` and ``decoder_kwargs`` attributes
(or ``scheduler=`` / ``latent_shape=`` / ``decoder_kwargs=`` keywords), so
``run_with_cache(mode="generate")`` and ``capture_dataset(mode="generate")`` work for it.
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
OPTIONAL = (
    "name",
    "model_classes",
    "decoder",
    "lm",
    "embed_method",
    "attn",
    "mlp",
    "pad_token_id",
    "notes",
    "diffusion",
    "decoder_blocks",
    "decoder_cond",
)


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
    diffusion = bool(spec.get("diffusion"))
    if (spec.get("decoder_blocks") or spec.get("decoder_cond")) and not (diffusion and spec.get("decoder")):
        raise ValueError(
            "query adapter spec: decoder_blocks / decoder_cond describe a diffusion decoder; "
            'also give "decoder" (its module path) and "diffusion": true'
        )
    if spec.get("decoder_cond"):
        extra["decoder.cond"] = Site(spec["decoder_cond"], "output")
    if spec.get("decoder") and not diffusion:
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
        decoder=spec["decoder"] if diffusion else None,
        generate=_diffusion_generate(spec["connector"], spec["decoder"]) if diffusion else None,
        generation_cfg=diffusion,  # with guidance the decoder runs [cond; uncond]: cfg_batch = batch
        model_points=_decoder_points(spec["decoder"], spec.get("decoder_blocks")) if diffusion else None,
        notes=spec.get("notes", "query-based: N learnable queries after the prompt → connector → decoder"),
    )


def _decoder_points(decoder: str, blocks: str | None) -> Any:
    """``model -> {point: Site}``: ``decoder.blocks.{i}`` per block of the decoder's ``ModuleList``
    (their number is the model's), then ``decoder.out`` — execution order within one step."""

    def points(model: nn.Module) -> dict[str, Site]:
        n = len(get_module(model, blocks)) if blocks else 0
        out = {f"decoder.blocks.{i}": Site(f"{blocks}.{i}", "output") for i in range(n)}
        return {**out, "decoder.out": Site(decoder, "output")}

    return points


def _forward_with_padded_queries(model: nn.Module, inputs: ModelInputs) -> Any:
    return model(**inputs.kwargs)


def _diffusion_generate(connector: str, decoder: str) -> Any:
    """The ``generate`` of a query model with a diffusion decoder (see the module docstring)."""

    def generate(
        model: nn.Module,
        inputs: ModelInputs,
        num_inference_steps: int = 4,
        guidance_scale: float = 1.0,
        seed: int = 0,
        scheduler: Any = None,
        latent_shape: Sequence[int] | None = None,
        decoder_kwargs: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """Latents ``[batch, *latent_shape]`` sampled from the connector's output ``[batch, N, d]``."""
        from uniprobe.hooks.diffusion import denoise
        from uniprobe.hooks.hookset import HookSet  # imported here: hookset imports the adapters package

        if (
            not isinstance(num_inference_steps, int)
            or isinstance(num_inference_steps, bool)
            or (num_inference_steps < 1)
        ):
            raise ValueError(f"num_inference_steps must be a whole number >= 1, got {num_inference_steps!r}")
        scheduler = scheduler if scheduler is not None else _model_attr(model, "scheduler")
        shape = tuple(latent_shape if latent_shape is not None else _model_attr(model, "latent_shape"))
        kwargs = decoder_kwargs if decoder_kwargs is not None else getattr(model, "decoder_kwargs", {})
        seen: list[torch.Tensor] = []
        with torch.no_grad(), HookSet() as hooks:
            hooks.read(model, Site(connector, "output"), seen.append)
            _forward_with_padded_queries(model, inputs)
        if not seen:
            raise RuntimeError(f"the model's forward did not call its connector {connector!r}")
        return denoise(
            get_module(model, decoder), scheduler, seen[-1], shape, steps=num_inference_steps,
            guidance_scale=guidance_scale, seed=seed, **kwargs,
        )  # fmt: skip

    return generate


def _model_attr(model: nn.Module, name: str) -> Any:
    value = getattr(model, name, None)
    if value is None:
        what = "a diffusers scheduler" if name == "scheduler" else "the latent shape (C, H, W)"
        raise ValueError(
            f"{type(model).__name__} has no {name!r} attribute, which generation with a diffusion "
            f"decoder reads ({what}); set model.{name} = ... or pass {name}= to generate"
        )
    return value


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


TINY_DIFFUSION_QUERY = query_adapter(
    {
        "name": "tiny-diffusion-query",
        "model_classes": ["TinyDiffusionQueryModel"],
        "blocks": "lm.model.layers",
        "final_norm": "lm.model.norm",
        "lm_head": "lm.lm_head",
        "queries": "queries",
        "connector": "connector",
        "decoder": "decoder",
        "diffusion": True,
        "decoder_blocks": "decoder.transformer_blocks",
        "decoder_cond": "decoder.caption_projection",
        "lm": "lm",
        "embed_method": "embed_inputs",
    }
)
