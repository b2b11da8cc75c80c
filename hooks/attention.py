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
not return them). Mask forms: None (sdpa's causal fast path when ``q > 1``: causal, upper-left aligned
as torch's ``is_causal`` — an empty static cache's slots past ``q`` get nothing; with one query, or under
eager, None means every key), boolean 4-D (True = may attend), additive float 4-D. Tested equal to
eager weights with left/right padding, during cached generation (dynamic and Janus's static cache) and
on every family above.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from uniprobe.hooks.adapters.base import Adapter, Site, get_module
from uniprobe.hooks.calls import transformers_version
from uniprobe.hooks.errors import UniprobeError
from uniprobe.hooks.hookset import HookSet

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


# -- interception of the attention function -------------------------------------------------------


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``[b, kv_heads, k, d]`` → ``[b, kv_heads·groups, k, d]`` (GQA: each kv head serves ``groups``
    query heads), written as transformers' own ``repeat_kv`` so the recomputed patterns match eager."""
    if groups == 1:
        return x
    b, h, k, d = x.shape
    return x[:, :, None].expand(b, h, groups, k, d).reshape(b, h * groups, k, d)


@dataclass
class AttnCall:
    """One call of the attention function, as the model made it.

    Attributes:
        module: the attention module; ``layer``: its block index; ``impl``: the model's own
            implementation name (``"sdpa"``, ``"eager"``, ...).
        query: ``[b, heads, q, d_head]``; key, value: ``[b, kv_heads, k, d_head]`` (after q/k norms,
            RoPE and the cache update, so ``k`` counts the cached positions too).
        attention_mask: what the model passed (None, bool ``[b|1, 1, q, k]`` True = may attend, or an
            additive float mask). Callbacks may replace it, or query/key/value, before the kernel runs.
        scaling: the softmax scale.
    """

    module: nn.Module
    layer: int
    impl: str
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    attention_mask: torch.Tensor | None
    scaling: float

    @property
    def offset(self) -> int:
        """Stream position of the first query: keys cover ``0 .. k-1``, queries the last ``q`` of them —
        except sdpa's causal fast path (no mask, ``q > 1``), which aligns queries with the first keys (an
        empty static cache's prefill; its unused slots follow). A static cache's decoding steps are not
        told apart (their keys include the unused slots, masked by the model)."""
        if self._sdpa_causal():
            return 0
        return self.key.shape[-2] - self.query.shape[-2]

    def _sdpa_causal(self) -> bool:
        """Whether the kernel applies its own causal mask (transformers' sdpa: no mask, ``q > 1``)."""
        return (
            self.attention_mask is None
            and self.impl == "sdpa"
            and self.query.shape[-2] > 1
            and bool(getattr(self.module, "is_causal", True))
        )

    def query_positions(self) -> torch.Tensor:
        """``[q]`` absolute stream positions of the queries."""
        return torch.arange(self.offset, self.key.shape[-2], device=self.query.device)

    def allowed(self) -> torch.Tensor:
        """Bool ``[b|1, 1|heads, q, k]``: True where the model's mask lets a query attend a key."""
        q, k = self.query.shape[-2], self.key.shape[-2]
        mask = self.attention_mask
        if mask is None:
            if not self._sdpa_causal():  # no mask at all: every key (eager, or sdpa with one query)
                return torch.ones(1, 1, q, k, dtype=torch.bool, device=self.query.device)
            # sdpa's causal fast path, upper-left aligned as torch's is_causal (transformers drops the
            # keys past q, an empty static cache's slots)
            keys = torch.arange(k, device=self.query.device)
            return (keys[None, :] <= torch.arange(q, device=keys.device)[:, None])[None, None]
        mask = mask[..., :k]
        if mask.dtype == torch.bool:
            return mask
        return mask > torch.finfo(mask.dtype).min / 2

    def additive_mask(self) -> torch.Tensor:
        """The mask as eager attention adds it: float ``[b|1, 1|heads, q, k]`` (0 or the dtype's min)."""
        mask = self.attention_mask
        if mask is not None and mask.dtype != torch.bool:
            return mask[..., : self.key.shape[-2]]
        zero = torch.zeros((), dtype=self.query.dtype, device=self.query.device)
        return torch.where(self.allowed(), zero, torch.finfo(self.query.dtype).min)

    def scores(self) -> torch.Tensor:
        """``[b, heads, q, k]`` pre-softmax scores with the mask added (eager's ``attn_weights`` before
        its softmax; the same operations in the same order)."""
        keys = repeat_kv(self.key, self.query.shape[1] // self.key.shape[1])
        return torch.matmul(self.query, keys.transpose(2, 3)) * self.scaling + self.additive_mask()

    def pattern(self) -> torch.Tensor:
        """``[b, heads, q, k]`` attention weights, computed as eager does (softmax in float32)."""
        return nn.functional.softmax(self.scores(), dim=-1, dtype=torch.float32).to(self.query.dtype)

    def remove_edges(self, edges: torch.Tensor) -> None:
        """Forbid the ``edges`` (bool ``[rows|1, 1|heads, q, k]``, True = remove) in this call's mask,
        keeping the mask's form (bool for sdpa, additive float for eager). ``rows`` may exceed the
        call's batch (a staggered forward computes a prefix of the rows): the first ``b`` are used."""
        b = self.query.shape[0]
        edges = edges[:b].to(self.query.device)
        mask = self.attention_mask
        if mask is not None and mask.dtype != torch.bool:
            self.attention_mask = mask[..., : self.key.shape[-2]].masked_fill(
                edges, torch.finfo(mask.dtype).min
            )
        elif self.impl == "eager":
            self.attention_mask = self.additive_mask().masked_fill(edges, torch.finfo(self.query.dtype).min)
        else:
            self.attention_mask = self.allowed() & ~edges


Callback = Callable[[AttnCall], None]


class _State:
    """What the dispatcher needs for one module: its real config, implementation and callbacks."""

    def __init__(self, module: nn.Module, layer: int, config: Any) -> None:
        self.module, self.layer, self.config = module, layer, config
        self.impl = getattr(config, "_attn_implementation", None) or "eager"
        self.callbacks: list[Callback] = []
        self.dispatched = 0

    def original(self) -> Callable[..., Any]:
        if self.impl == "eager":  # transformers' default: the modeling module's own function
            fn = getattr(sys.modules[type(self.module).__module__], "eager_attention_forward", None)
            if fn is None:
                raise AttentionDispatchError(
                    f"{type(self.module).__name__} (transformers {transformers_version()}): its module "
                    f"{type(self.module).__module__} has no eager_attention_forward to fall back to"
                )
            return fn
        from transformers import AttentionInterface

        return AttentionInterface().get_interface(self.impl, None)


class ConfigView:
    """A module's config as it was, except ``_attn_implementation == "uniprobe"`` (the real config is
    shared by every layer and never changed)."""

    def __init__(self, state: _State) -> None:
        object.__setattr__(self, "_uniprobe_state", state)
        object.__setattr__(self, "_attn_implementation", IMPL_NAME)

    def __getattr__(self, name: str) -> Any:
        return getattr(object.__getattribute__(self, "_uniprobe_state").config, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._uniprobe_state.config, name, value)


def _dispatch(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, *args: Any, **kwargs: Any) -> Any:  # fmt: skip
    """The registered attention function: callbacks see (and may change) the call, then the model's
    own implementation runs."""
    view = module.config
    if not isinstance(view, ConfigView):
        raise AttentionDispatchError(
            f"{type(module).__name__} asked for the {IMPL_NAME!r} attention outside an interception"
        )
    state = view._uniprobe_state
    state.dispatched += 1
    scaling = float(kwargs.get("scaling", getattr(module, "scaling", query.shape[-1] ** -0.5)))
    call = AttnCall(module, state.layer, state.impl, query, key, value, attention_mask, scaling)
    for fn in state.callbacks:
        fn(call)
    return state.original()(module, call.query, call.key, call.value, call.attention_mask, *args, **kwargs)


_REGISTERED = False


def _register() -> None:
    global _REGISTERED
    if not _REGISTERED:
        from transformers import AttentionInterface

        AttentionInterface.register(IMPL_NAME, _dispatch)
        _REGISTERED = True


class intercept_attention(HookSet):  # noqa: N801 — a context manager, like capture
    """For blocks ``layers``, route the attention function through ``callback(call: AttnCall)``.

    Nested interceptions of one module share its view (callbacks run in installation order). On a
    clean exit every intercepted module that ran must have dispatched once per call, else
    :class:`AttentionDispatchError`.
    """

    def __init__(self, model: nn.Module, adapter: Adapter, layers: Iterable[int], callback: Callback) -> None:
        super().__init__()
        self.model, self.adapter, self.callback = model, adapter, callback
        self.layers = sorted(set(int(i) for i in layers))
        self._views: list[tuple[nn.Module, _State]] = []
        self._calls: dict[int, int] = {}
        self._dispatched0: dict[int, int] = {}

    def install(self) -> None:
        _register()
        for layer in self.layers:
            module = attention_module(self.model, self.adapter, layer)
            if not hasattr(module, "config"):
                raise AttentionDispatchError(
                    f"{type(module).__name__} (transformers {transformers_version()}) has no config; its "
                    "attention function cannot be intercepted"
                )
            view = module.config
            if not isinstance(view, ConfigView):
                state = _State(module, layer, view)
                if state.impl.startswith("flash") or state.impl == "flex_attention":
                    raise AttentionDispatchError(
                        f"layer {layer}: attention implementation {state.impl!r} takes no explicit mask and "
                        "returns no weights; load the model with attn_implementation='sdpa' or 'eager'"
                    )
                module.config = ConfigView(state)
            state = module.config._uniprobe_state
            state.callbacks.append(self.callback)
            self._views.append((module, state))
            self._calls[layer] = 0
            self._dispatched0[layer] = state.dispatched
            self.pre(module, self._counter(layer))

    def _counter(self, layer: int) -> Callable[..., None]:
        def count(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            self._calls[layer] += 1

        return count

    def remove(self) -> None:
        for module, state in reversed(self._views):
            if self.callback in state.callbacks:
                state.callbacks.remove(self.callback)
            if not state.callbacks and isinstance(module.config, ConfigView):
                module.config = state.config
        self._views.clear()
        super().remove()

    def check(self) -> None:
        """Raise unless every intercepted module that ran called the attention function each time."""
        for module, state in self._views:
            calls = self._calls[state.layer]
            got = state.dispatched - self._dispatched0[state.layer]
            if calls and got < calls:
                raise AttentionDispatchError(
                    f"layer {state.layer}: {type(module).__name__} ran {calls} time(s) but called the "
                    f"attention function {got} time(s) (transformers {transformers_version()}): "
                    "this model's attention does not dispatch through transformers' AttentionInterface, "
                    "so patterns/knockout cannot be applied; report the model class and transformers version"
                )

    def __exit__(self, exc_type: object, *exc: object) -> None:
        try:
            if exc_type is None:
                self.check()
        finally:
            self.remove()
