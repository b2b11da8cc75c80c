"""Adapters of the sandbox models: Janus-style AR (:class:`SandboxAR`), MetaQuery-style
(:class:`SandboxQuery`) and BAGEL-style MoT (:class:`SandboxMoT`, the declarative ``bagel`` adapter),
registered with :func:`uniprobe.hooks.adapters.register_adapter` when this
package is imported (``uniprobe.experiments.sandbox`` imports this module, and every sandbox model
class lives in that package, so a sandbox model never exists without its adapter registered).

Both keep a transformers causal LM at ``lm`` and feed it ``inputs_embeds`` built by
``embed_inputs``, so every canonical point is a hook on ``lm.model``. Examples are dicts with a
``prompt`` (text with ``<image>`` markers, or a task ``Prompt`` carrying its images) and, for
teacher-forced drawing (``mode="generation"``), an optional ``target`` (tile codes). The model
itself builds the batch and the role of every position (``model.prompt_layout``), so this adapter
is data plus three short functions. It lives with the sandbox, not in ``uniprobe.hooks``, because
it is sandbox knowledge: ``hooks`` never imports ``experiments``.

Generation (``mode="generate"``): the sandbox models draw by re-running the whole stream at each
step (no KV cache), so the drawing is made first and then replayed in one teacher-forced forward
on the model's own tiles — the states at every position equal those of the incremental run.
The MoT model draws by flow: its generation is captured as it runs, every denoising pass tagged
with its step, timestep and CFG branch (``generate_flow``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from uniprobe.hooks.adapters import register_adapter
from uniprobe.hooks.adapters.bagel import BAGEL_SPEC, bagel_adapter
from uniprobe.hooks.adapters.base import Adapter, ModelInputs, Site
from uniprobe.hooks.layout import TokenLayout, role_ids

_MODES = {"understanding": "understand", "generation": "generate"}


def _prompts(examples: Sequence[dict[str, Any]]) -> list[Any]:
    out = []
    for i, ex in enumerate(examples):
        if "prompt" not in ex:
            raise KeyError(f"sandbox example {i} has no 'prompt' (keys: {', '.join(ex)})")
        out.append(ex["prompt"])
    return out


def batch_to_inputs(batch: Any) -> ModelInputs:
    """A sandbox ``Batch`` → :class:`ModelInputs` (kwargs of ``forward`` and the layout)."""
    roles = torch.tensor([role_ids(r) for r in batch.roles], dtype=torch.long)
    return ModelInputs(batch.model_inputs(), TokenLayout(roles, tail_role="image_gen"))


def prepare(model: nn.Module, examples: Sequence[dict[str, Any]], mode: str = "understanding") -> ModelInputs:
    """Build the batch with the model's own ``prompt_layout`` (left-padded, roles per position)."""
    if mode not in _MODES:
        raise ValueError(f"sandbox mode {mode!r}: choose one of {', '.join(_MODES)}")
    targets = None
    if mode == "generation" and any("target" in ex for ex in examples):
        if not all("target" in ex for ex in examples):
            raise ValueError(
                "teacher-forced drawing: give a 'target' for every example of the batch, or none"
            )
        targets = [list(ex["target"]) for ex in examples]
    if targets is not None and getattr(model, "arch", "") != "ar":
        targets = None  # the query model draws in parallel from its query tokens
    batch = model.prompt_layout(_prompts(examples), mode=_MODES[mode], targets=targets)
    inputs = batch_to_inputs(batch)
    inputs.source = list(examples)
    return inputs


def forward(model: nn.Module, inputs: ModelInputs) -> Any:
    return model(**inputs.kwargs)


@torch.no_grad()
def generate(model: nn.Module, inputs: ModelInputs) -> Any:
    """Draw greedily from the prepared prompts and return ``(tiles [b, cells], replay ModelInputs)``."""
    if inputs.source is None:
        raise ValueError("sandbox generation needs the examples: build the inputs with adapter.prepare(...)")
    prompts = _prompts(inputs.source)
    grids, batches = model.generate_image(list(prompts), cot=False, return_batch=True)
    tiles = torch.tensor([g.reshape(-1).tolist() for g in grids], dtype=torch.long)
    if getattr(model, "arch", "") == "ar":
        replay = batch_to_inputs(model.prompt_layout(list(prompts), mode="generate", targets=tiles.tolist()))
    else:
        replay = batch_to_inputs(batches[0]) if len(batches) == 1 else inputs
    return tiles, replay


@torch.no_grad()
def generate_flow(model: nn.Module, inputs: ModelInputs) -> torch.Tensor:
    """Draw by flow sampling from the prepared prompts → tiles ``[b, cells]`` (the sampling's passes
    run here, so a capture around this call sees every denoising step)."""
    if inputs.source is None:
        raise ValueError("sandbox generation needs the examples: build the inputs with adapter.prepare(...)")
    prompts = list(_prompts(inputs.source))  # one batch: the rows of the prepared layout
    grids = model.generate_image(prompts, cot=False, batch_size=max(1, len(prompts)))
    return torch.tensor([g.reshape(-1).tolist() for g in grids], dtype=torch.long)


def _lm(model: nn.Module) -> nn.Module:
    return model.lm


def _embed(model: nn.Module, inputs: ModelInputs) -> torch.Tensor:
    kw = inputs.kwargs
    return model.embed_inputs(kw["input_ids"], kw["image_tokens"], kw["image_mask"])


_COMMON = dict(
    blocks="lm.model.layers",
    final_norm="lm.model.norm",
    lm_head="lm.lm_head",
    prepare=prepare,
    forward=forward,
    generate=generate,
    tl_view=_lm,
    tl_embed=_embed,
    replay_generation=True,
)

SANDBOX_AR = Adapter(
    name="sandbox-ar",
    model_classes=("SandboxAR",),
    extra={"gen_head.in": Site("gen_head", "input"), "gen_head.out": Site("gen_head", "output")},
    notes="Janus-style sandbox: Llama backbone, own tile embedding and generation head",
    **_COMMON,
)

SANDBOX_QUERY = Adapter(
    name="sandbox-query",
    model_classes=("SandboxQuery",),
    extra={
        "queries": Site("connector", "input"),
        "connector.out": Site("connector", "output"),
    },
    notes="MetaQuery-style sandbox: Qwen2 backbone, N learnable queries → connector → grid decoder",
    **_COMMON,
)

# the declarative bagel adapter with BAGEL's module paths, on the sandbox's batched functions;
# mlp_joined: the sandbox's parameter-free marker on the two experts' joined MLP output
SANDBOX_MOT = bagel_adapter(
    {
        **BAGEL_SPEC,
        "name": "sandbox-mot",
        "model_classes": ["SandboxMoT"],
        "mlp_joined": "mlp_out",
        "notes": "BAGEL-style sandbox: Qwen2 MoT (*_moe_gen twins at image latents), rectified flow",
    },
    prepare=prepare,
    forward=forward,
    generate=generate_flow,
)

# found by class name through the registry (adapter_for), like the built-in families
register_adapter(SANDBOX_AR)
register_adapter(SANDBOX_QUERY)
register_adapter(SANDBOX_MOT)
