"""Declarative adapter for mixture-of-transformers models that generate by flow (BAGEL).

BAGEL (``ByteDance-Seed/Bagel``, ``modeling/bagel``) is a Qwen2 language model whose decoder layers
hold understanding weights and generation twins named by one rule — the understanding module's
name plus ``_moe_gen`` (``self_attn.q_proj`` / ``self_attn.q_proj_moe_gen``, ``mlp`` /
``mlp_moe_gen``, ``input_layernorm`` / ``input_layernorm_moe_gen``, ``model.norm`` /
``model.norm_moe_gen``) — with one self-attention over the packed sequence, and a rectified-flow
generation side (``vae2llm``, ``llm2vae``, ``time_embedder``, ``latent_pos_embed``). A spec names
the module paths; everything else follows from the twin rule::

    {"name": "bagel", "model_classes": ["Bagel"],
     "blocks": "language_model.model.layers", "final_norm": "language_model.model.norm",
     "lm_head": "language_model.lm_head", "attn": "self_attn", "mlp": "mlp",
     "twin_suffix": "_moe_gen", "projections": {"q": "q_proj", "k": "k_proj", "v": "v_proj", "out": "o_proj"},
     "time_embedder": "time_embedder", "vae2llm": "vae2llm", "llm2vae": "llm2vae"}

Points, per block ``i``: the canonical four (``blocks.{i}.attn_out`` is the attention's joined
output, both experts; ``blocks.{i}.mlp_out`` both experts where the spec names a joined MLP site,
``mlp_joined``), and per expert ``blocks.{i}.mlp_und.out`` / ``blocks.{i}.mlp_gen.out`` and
``blocks.{i}.attn_und.{q,k,v,out}`` / ``blocks.{i}.attn_gen.{q,k,v,out}``; model points
``final_norm_gen`` (``norm_moe_gen``), ``vae2llm.out`` (latents into the stream), ``llm2vae.in`` /
``llm2vae.out`` (the latents' final states and the velocity).

Roles from BAGEL's packed index tensors (:func:`packed_roles`): ``packed_text_indexes`` →
``text`` (``cot`` where a CoT span is given), ``packed_vit_token_indexes`` → ``image_und``,
``packed_vae_token_indexes`` → ``image_gen``; tokens in no list are ``pad``.

Capture during flow sampling: ``time_embedder`` is the spec's timestep module, so each backbone
call is tagged with its denoising step, timestep (``cap.timesteps``) and CFG pass (``cond``,
``uncond_text``, ``uncond_image``) — :meth:`uniprobe.hooks.calls.CallLog.note_timestep`.

The hooked tensors must be batched ``[b, pos, ...]`` (the toolkit's capture and patching read rows
by position): the sandbox's ``sandbox-mot`` runs that layout and tests it equal to its packed one.
A real BAGEL checkout runs packed ``[tokens, d]``; serve it through a loader that wraps the model
in a batched forward (see the README, "Serving BAGEL").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from uniprobe.hooks.adapters.base import Adapter, Site
from uniprobe.hooks.layout import ROLE_ID, TokenLayout

REQUIRED = ("blocks", "final_norm", "lm_head", "time_embedder", "vae2llm", "llm2vae")
OPTIONAL = (
    "name", "model_classes", "attn", "mlp", "mlp_joined", "twin_suffix", "projections", "final_norm_gen",
    "notes",
)  # fmt: skip
PROJECTIONS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "out": "o_proj"}
EXPERTS = ("und", "gen")


def twin(path: str, suffix: str = "_moe_gen") -> str:
    """The generation twin of an understanding module path: ``...mlp`` → ``...mlp_moe_gen``."""
    return path + suffix


def expert_points(spec: dict[str, Any], n_layers: int) -> dict[str, Site]:
    """Per-expert points of every block: ``blocks.{i}.mlp_{und,gen}.out`` and
    ``blocks.{i}.attn_{und,gen}.{q,k,v,out}`` (the twin's path: the understanding path + suffix)."""
    suffix = spec.get("twin_suffix", "_moe_gen")
    attn, mlp = spec.get("attn", "self_attn"), spec.get("mlp", "mlp")
    proj = {**PROJECTIONS, **spec.get("projections", {})}
    out: dict[str, Site] = {}
    for i in range(n_layers):
        block = f"{spec['blocks']}.{i}"
        for expert in EXPERTS:
            name = (lambda p: p) if expert == "und" else (lambda p: twin(p, suffix))
            for short, module in proj.items():
                out[f"blocks.{i}.attn_{expert}.{short}"] = Site(f"{block}.{attn}.{name(module)}", "output")
            out[f"blocks.{i}.mlp_{expert}.out"] = Site(f"{block}.{name(mlp)}", "output")
    return out


def packed_roles(
    sample_lens: Sequence[int],
    packed_text_indexes: torch.Tensor,
    packed_vit_token_indexes: torch.Tensor | None = None,
    packed_vae_token_indexes: torch.Tensor | None = None,
    packed_cot_indexes: torch.Tensor | None = None,
    side: str = "left",
) -> TokenLayout:
    """BAGEL's packed index tensors (``N = sum(sample_lens)`` tokens) → a :class:`TokenLayout`
    ``[b, max(sample_lens)]`` of the batched view, padded on ``side`` with ``pad``.

    Text → ``text`` (``cot`` at ``packed_cot_indexes``), ViT tokens → ``image_und``, VAE latents →
    ``image_gen``; every token must be in exactly one of text / ViT / VAE."""
    n = int(sum(sample_lens))
    flat = torch.full((n,), -1, dtype=torch.long)
    for role, idx in (
        ("text", packed_text_indexes),
        ("image_und", packed_vit_token_indexes),
        ("image_gen", packed_vae_token_indexes),
    ):
        if idx is None or not idx.numel():
            continue
        if bool((flat[idx] != -1).any()):
            raise ValueError(f"packed {role} indexes overlap another role's; each token has one role")
        flat[idx] = ROLE_ID[role]
    if packed_cot_indexes is not None and packed_cot_indexes.numel():
        flat[packed_cot_indexes] = ROLE_ID["cot"]
    if bool((flat == -1).any()):
        raise ValueError(
            f"{int((flat == -1).sum())} packed tokens are in no index tensor (text, ViT or VAE); "
            "pass every index tensor of the packed sequence"
        )
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    width = max(sample_lens)
    roles = torch.full((len(sample_lens), width), ROLE_ID["pad"], dtype=torch.long)
    start = 0
    for i, length in enumerate(sample_lens):
        cols = slice(width - length, width) if side == "left" else slice(0, length)
        roles[i, cols] = flat[start : start + length]
        start += length
    return TokenLayout(roles, tail_role=None)


def bagel_adapter(
    spec: dict[str, Any],
    prepare: Callable[..., Any] | None = None,
    forward: Callable[..., Any] | None = None,
    generate: Callable[..., Any] | None = None,
) -> Adapter:
    """Build an :class:`Adapter` from a BAGEL-style spec (module docstring) and the model's own
    ``prepare`` / ``forward`` / ``generate`` (the batched-layout functions of the model or its loader)."""
    missing = [k for k in REQUIRED if k not in spec]
    unknown = [k for k in spec if k not in REQUIRED + OPTIONAL]
    if missing or unknown:
        raise ValueError(
            f"bagel adapter spec: missing keys {missing or 'none'}, unknown keys {unknown or 'none'}; "
            f"required: {', '.join(REQUIRED)}; optional: {', '.join(OPTIONAL)}"
        )
    bad = [k for k in spec.get("projections", {}) if k not in PROJECTIONS]
    if bad:
        raise ValueError(f"bagel adapter spec: projections {bad} unknown; name some of {list(PROJECTIONS)}")
    suffix = spec.get("twin_suffix", "_moe_gen")
    extra = {
        "final_norm_gen": Site(spec.get("final_norm_gen", twin(spec["final_norm"], suffix)), "output"),
        "vae2llm.out": Site(spec["vae2llm"], "output"),
        "llm2vae.in": Site(spec["llm2vae"], "input"),
        "llm2vae.out": Site(spec["llm2vae"], "output"),
    }

    def model_points(model: nn.Module) -> dict[str, Site]:
        from uniprobe.hooks.adapters.base import get_module

        return expert_points(spec, len(get_module(model, spec["blocks"])))

    return Adapter(
        name=spec.get("name", "bagel"),
        model_classes=tuple(spec.get("model_classes", ())),
        blocks=spec["blocks"],
        final_norm=spec["final_norm"],
        lm_head=spec["lm_head"],
        attn=spec.get("attn", "self_attn"),
        # blocks.{i}.mlp_out reads the joined site when there is one, else the understanding MLP
        mlp=spec.get("mlp_joined") or spec.get("mlp", "mlp"),
        extra=extra,
        model_points=model_points,
        prepare=prepare,
        forward=forward,
        generate=generate,
        timestep_module=spec["time_embedder"],
        notes=spec.get(
            "notes", "mixture-of-transformers (BAGEL): *_moe_gen twins at image latents, rectified flow"
        ),
    )


BAGEL_SPEC: dict[str, Any] = {
    "name": "bagel",
    "model_classes": ["Bagel"],
    "blocks": "language_model.model.layers",
    "final_norm": "language_model.model.norm",
    "lm_head": "language_model.lm_head",
    "attn": "self_attn",
    "mlp": "mlp",
    "twin_suffix": "_moe_gen",
    "time_embedder": "time_embedder",
    "vae2llm": "vae2llm",
    "llm2vae": "llm2vae",
}  # BAGEL's own module paths (modeling/bagel/bagel.py, qwen2_navit.py)
