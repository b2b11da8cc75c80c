"""Attention internals: head geometry, per-head outputs, and interception of the attention function.

**Geometry and per-head outputs.** Every attention module of the families served (transformers
Llama, Qwen2 (GQA), Janus's LM, Emu3, Chameleon, the sandbox and query models' backbones) projects
``q/k/v``, applies its q/k norms and RoPE, updates the cache, calls the attention function, then
``o_proj``. ``z`` is the input of ``o_proj`` (``[batch, pos, n_heads·d_head]`` flat; :func:`split_heads`
gives ``[batch, pos, head, d_head]``) and each head's contribution to ``attn_out`` is
``head_out[b, p, h] = W_O[:, h·d:(h+1)·d] @ z[b, p, h]`` (:func:`head_outputs`); summed over heads
plus ``o_proj``'s bias it is ``attn_out``.

**Interception** (:class:`intercept_attention`): transformers' attention modules look their kernel
up by name, ``ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager)``. For
the chosen layers we give the module (not the shared config, which every layer reads) a config
*view* whose ``_attn_implementation`` is ``"uniprobe"``, a function registered once with
``transformers.AttentionInterface.register``. It hands the callbacks an :class:`AttnCall` (query
``[b, heads, q, d]``, key/value ``[b, kv_heads, k, d]`` after q/k norms, RoPE and the cache update,
the mask as the model built it) and then calls the model's ORIGINAL implementation (``sdpa``, or
the modeling module's own ``eager_attention_forward``) with the same arguments — so outputs are
bitwise those of the model when no callback changes anything. A callback may replace the mask (the
knockout) or q/k/v. On exit every intercepted module that ran must have dispatched through the
function; a model whose attention bypasses ``AttentionInterface`` raises :class:`AttentionDispatchError`
(naming the class and the transformers version) instead of returning no data.

**Patterns** are recomputed from the q and k the function received, exactly as eager attention does
(``softmax(q·kᵀ·scaling + mask)`` in float32, kv heads repeated for GQA), so they equal the eager
``output_attentions`` weights whatever kernel the model was loaded with (sdpa and flash kernels do
not return them). Mask forms: None (sdpa's causal fast path: the causal mask is rebuilt with the
cache offset ``k_len − q_len``), boolean 4-D (True = may attend), additive float 4-D.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from uniprobe.hooks.adapters.base import Adapter, Site, get_module
from uniprobe.hooks.calls import transformers_version
from uniprobe.hooks.errors import UniprobeError

IMPL_NAME = "uniprobe"
_REQUIRED = ("head_dim", "num_key_value_groups", "o_proj")


class AttentionDispatchError(UniprobeError, RuntimeError):
    """An attention module did not run through transformers' ``AttentionInterface`` as expected."""


# -- geometry and per-head outputs -----------------------------------------------------------------


@dataclass(frozen=True)
class AttnGeometry:
    """Head sizes of one attention module: ``n_heads`` query heads sharing ``n_kv_heads`` key/value
    heads (GQA: ``n_heads // n_kv_heads`` query heads per kv head), ``d_head``, ``d_model``."""

    n_heads: int
    n_kv_heads: int
    d_head: int
    d_model: int

    @property
    def groups(self) -> int:
        return self.n_heads // self.n_kv_heads


def attention_path(adapter: Adapter, layer: int) -> str:
    """Module path of block ``layer`` 's attention (``{blocks}.{layer}.{attn}``)."""
    return f"{adapter.blocks}.{layer}.{adapter.attn}"


def check_attention_module(module: nn.Module, where: str) -> None:
    """Raise unless ``module`` has the attributes this module relies on (transformers' layout)."""
    missing = [a for a in _REQUIRED if not hasattr(module, a)]
    if missing or not isinstance(getattr(module, "o_proj", None), nn.Linear):
        raise AttentionDispatchError(
            f"{where}: {type(module).__name__} (transformers {transformers_version()}) lacks "
            f"{', '.join(missing) or 'an nn.Linear o_proj'}; per-head attention needs a transformers-style "
            "attention module (q/k/v/o projections, head_dim, num_key_value_groups)"
        )


def attention_module(model: nn.Module, adapter: Adapter, layer: int) -> nn.Module:
    """The attention module of block ``layer``, checked (see :func:`check_attention_module`)."""
    n = adapter.n_layers(model)
    if not 0 <= layer < n:
        raise UniprobeError(f"no layer {layer}: the model has {n} blocks (0..{n - 1})")
    path = attention_path(adapter, layer)
    module = get_module(model, path)
    check_attention_module(module, path)
    return module


def attention_geometry(model: nn.Module, adapter: Adapter, layer: int = 0) -> AttnGeometry:
    """:class:`AttnGeometry` of block ``layer`` 's attention (from ``o_proj`` and ``head_dim``)."""
    module = attention_module(model, adapter, layer)
    d_head = int(module.head_dim)
    n_heads = module.o_proj.in_features // d_head
    return AttnGeometry(
        n_heads, n_heads // int(module.num_key_value_groups), d_head, module.o_proj.out_features
    )


def z_site(adapter: Adapter, layer: int) -> Site:
    """The site of ``blocks.{layer}.attn.z``: the input of the attention's ``o_proj``."""
    return Site(f"{attention_path(adapter, layer)}.o_proj", "input")


def split_heads(z: torch.Tensor, n_heads: int) -> torch.Tensor:
    """``[..., n_heads·d_head]`` → ``[..., n_heads, d_head]``."""
    if z.shape[-1] % n_heads:
        raise ValueError(f"last dim {z.shape[-1]} is not a multiple of n_heads={n_heads}")
    return z.reshape(*z.shape[:-1], n_heads, z.shape[-1] // n_heads)


def head_outputs(z: torch.Tensor, o_proj: nn.Linear, n_heads: int | None = None) -> torch.Tensor:
    """Each head's contribution to ``attn_out``: ``[..., head, d_model]``.

    ``z`` is ``[..., head, d_head]`` (or flat ``[..., head·d_head]`` with ``n_heads`` given).
    ``head_outputs(z).sum(-2) + o_proj.bias == o_proj(z_flat)`` (up to float rounding).
    """
    if n_heads is not None and z.shape[-1] == o_proj.in_features:
        z = split_heads(z, n_heads)
    h, d = z.shape[-2], z.shape[-1]
    if h * d != o_proj.in_features:
        raise ValueError(f"z has {h} heads × {d} dims but o_proj reads {o_proj.in_features} features")
    w = o_proj.weight.view(o_proj.out_features, h, d)
    return torch.einsum("...hd,mhd->...hm", z.to(w.dtype), w)
