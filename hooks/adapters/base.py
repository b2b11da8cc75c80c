"""Adapters: how one model family maps onto the canonical hook points.

An adapter is mostly data — where the blocks, the final norm and the heads live, which
family points exist — plus a few small functions: how to build the :class:`TokenLayout` of a
batch, how to run understanding and generation, and (for TransformerLens) which plain causal
LM inside the model TransformerLens can wrap. Writing one for a new checkpoint means filling
in module paths; see ``hooks/adapters/query.py`` for the declarative query-based form.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from uniprobe.hooks.layout import TokenLayout
from uniprobe.hooks.points import BLOCK_POINTS, MODEL_POINTS, UnknownHookPointError, block_points, expand


@dataclass(frozen=True)
class Site:
    """Where a hook point lives: a module, its input or output, and which tuple element."""

    module: str
    io: str = "output"  # "input" (first positional arg or hidden_states kwarg) or "output"
    index: int | None = None  # element of a tuple output (attention returns (out, weights))


def get_module(model: nn.Module, path: str) -> nn.Module:
    """``model.get_submodule(path)`` with an error that names the missing part."""
    if path in ("", "."):
        return model
    try:
        return model.get_submodule(path)
    except AttributeError as err:
        parent = model
        for part in path.split("."):
            if not hasattr(parent, part):
                children = [n for n, _ in parent.named_children()]
                raise AttributeError(
                    f"module path {path!r}: {type(parent).__name__} has no child {part!r} "
                    f"(children: {', '.join(children) or 'none'}); fix the adapter's module paths"
                ) from err
            parent = getattr(parent, part)
        raise


@dataclass
class ModelInputs:
    """One prepared batch: keyword arguments for the model call and the positions' roles.

    Attributes:
        kwargs: passed to the model (``input_ids`` ``[batch, pos]``, ``attention_mask``, ...).
        layout: roles of the ``[batch, pos]`` positions the backbone sees.
        source: the examples the batch was built from (adapters that generate may need them).
    """

    kwargs: dict[str, Any]
    layout: TokenLayout
    source: list[dict[str, Any]] | None = None


@dataclass
class Adapter:
    """A model family: module paths and behaviour.

    Attributes:
        name: adapter name (``"llama"``, ``"janus"``, ...).
        model_classes: class names served (matched against ``type(model).__name__``).
        blocks: path of the decoder-layer ``ModuleList``.
        final_norm: path of the final norm; ``lm_head``: path of the text unembedding.
        attn, mlp: paths of the attention and MLP sub-modules inside one block.
        extra: family points → :class:`Site`.
        prepare: ``(model, examples, mode) -> ModelInputs``; examples are dicts with
            ``input_ids`` (and family keys such as ``pixel_values``).
        forward: ``(model, inputs) -> outputs``; default calls ``model(**inputs.kwargs)``.
        generate: ``(model, inputs, **kw) -> tokens [batch, n_gen]`` for image generation.
        tl_view: ``model -> nn.Module``: the transformers causal LM TransformerLens wraps.
        tl_embed: ``(model, inputs) -> inputs_embeds [batch, pos, d]`` when the backbone must be fed
            embeddings (image features merged, query tokens appended); None = feed ``input_ids``.
        teacher_forced: ``(inputs, image_tokens [batch, n] or [n]) -> ModelInputs``: generation-mode
            prompt inputs extended by target image tokens, for one teacher-forced forward (the layout
            grows by the fed-back ``image_gen`` positions); None when the family has none.
        image_forward: ``(model, teacher_forced_inputs) -> logits [batch, n, codebook]``: the
            teacher-forced image pass, row ``k`` predicting image token ``k``; pairs with ``teacher_forced``.
    """

    name: str
    model_classes: tuple[str, ...]
    blocks: str
    final_norm: str
    lm_head: str
    attn: str = "self_attn"
    mlp: str = "mlp"
    extra: dict[str, Site] = field(default_factory=dict)
    prepare: Callable[..., ModelInputs] | None = None
    forward: Callable[..., Any] | None = None
    generate: Callable[..., Any] | None = None
    tl_view: Callable[[nn.Module], nn.Module] | None = None
    tl_embed: Callable[..., torch.Tensor] | None = None
    generation_cfg: bool = False  # generate() doubles the batch for classifier-free guidance
    replay_generation: bool = False  # generate() returns (tokens, inputs to replay teacher-forced)
    teacher_forced: Callable[..., ModelInputs] | None = None
    image_forward: Callable[..., torch.Tensor] | None = None
    notes: str = ""
    # a diffusion decoder (module path) whose every forward is one denoising step: captures tag the
    # points inside it by denoising step and timestep (uniprobe.hooks.calls.track_decoder_steps)
    decoder: str | None = None
    # a flow backbone's timestep module (BAGEL: time_embedder): captures tag each backbone call with
    # its denoising step, timestep and CFG pass (uniprobe.hooks.calls.track_timesteps)
    timestep_module: str | None = None
    # family points that depend on the model's size (a decoder's blocks): model -> {point: Site}
    model_points: Callable[[nn.Module], dict[str, Site]] | None = None

    # -- points ---------------------------------------------------------------------------
    def n_layers(self, model: nn.Module) -> int:
        return len(get_module(model, self.blocks))

    def points(self, model: nn.Module) -> list[str]:
        """Every hook point of ``model``, in execution order."""
        return (
            ["embed"]
            + block_points(self.n_layers(model))
            + ["final_norm", "lm_head.in"]
            + [p for p in self.extra_points(model) if p not in MODEL_POINTS]
        )

    def extra_points(self, model: nn.Module) -> dict[str, Site]:
        """The family points: ``extra`` plus the model-dependent ``model_points``."""
        return {**self.extra, **(self.model_points(model) if self.model_points else {})}

    def decoder_points(self, model: nn.Module) -> set[str]:
        """The points inside the diffusion ``decoder`` (tagged by denoising step), empty without one."""
        if not self.decoder:
            return set()
        inside = (self.decoder, f"{self.decoder}.")
        return {
            p
            for p, s in self.extra_points(model).items()
            if s.module == inside[0] or s.module.startswith(inside[1])
        }

    def expand(self, model: nn.Module, patterns: Any) -> list[str]:
        """Resolve globs / aliases to this model's points (execution order), attention points
        (``blocks.*.attn.pattern``, ...) included where a pattern names them."""
        from uniprobe.hooks.attn_capture import attention_points  # it imports this module

        return expand(patterns, self.points(model), attention_points(self.n_layers(model)))

    def site(self, model: nn.Module, point: str) -> Site:
        """The module site of a canonical point."""
        if ".attn." in point:  # z / head_out: the o_proj input; pattern, q, ...: intercepted (raises)
            from uniprobe.hooks.attn_capture import attention_site

            return attention_site(model, self, point)
        extra = self.extra_points(model)
        if point in extra:
            return extra[point]
        if point == "embed":
            return Site(f"{self.blocks}.0", "input")
        if point == "final_norm":
            return Site(self.final_norm, "output")
        if point == "lm_head.in":
            return Site(self.lm_head, "input")
        parts = point.split(".")
        if len(parts) == 3 and parts[0] == "blocks" and parts[1].isdigit() and parts[2] in BLOCK_POINTS:
            i, kind = int(parts[1]), parts[2]
            if i >= self.n_layers(model):
                expand([point], self.points(model))  # raises with the explanation
            block = f"{self.blocks}.{i}"
            return {
                "resid_pre": Site(block, "input"),
                "resid_post": Site(block, "output", 0),
                "attn_out": Site(f"{block}.{self.attn}", "output", 0),
                "mlp_out": Site(f"{block}.{self.mlp}", "output", 0),
            }[kind]
        expand([point], self.points(model))
        raise UnknownHookPointError(f"no hook point {point!r}")

    # -- running --------------------------------------------------------------------------
    def run(self, model: nn.Module, inputs: ModelInputs) -> Any:
        """One forward pass on prepared inputs."""
        if self.forward is not None:
            return self.forward(model, inputs)
        return model(**inputs.kwargs)
