"""The mixture-of-transformers decoder layer of ``sandbox-mot``, with BAGEL's module names.

Every layer holds understanding weights and ``*_moe_gen`` twins (``self_attn.{q,k,v,o}_proj`` and
``..._moe_gen``, ``mlp`` / ``mlp_moe_gen``, ``input_layernorm`` / ``post_attention_layernorm`` and
``..._moe_gen``); one self-attention runs over the whole sequence. Which weights a position takes
is decided by a :class:`Routing`, in one of two layouts (tested equal):

- :class:`BatchedRouting`: ``[b, pos, d]`` with a ``gen_mask [b, pos]`` — the layout the toolkit's
  hooks read. Each expert runs on every position and ``torch.where`` keeps its own positions, so an
  expert module's output is a full ``[b, pos, d]`` tensor (the other expert's positions hold what
  it would have computed there; read them through roles).
- :class:`PackedRouting`: BAGEL's packed ``[tokens, d]`` without a batch axis; index tensors
  (``packed_und_token_indexes`` / ``packed_gen_token_indexes``) send each token to one expert, and
  attention runs on a padded view built from ``sample_lens`` (no compute on padding, each expert
  only on its own tokens — the training path).

Written by hand because transformers has no MoT layer (BAGEL's own code is not a dependency);
the pieces inside (``Qwen2MLP``, ``Qwen2RMSNorm``, rotary embedding) are transformers'.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2MLP,
    Qwen2RMSNorm,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

Fn = Callable[[torch.Tensor], torch.Tensor]


class BatchedRouting:
    """``[b, pos, ...]`` tensors; ``gen_mask [b, pos]`` True where the generation expert runs."""

    def __init__(self, gen_mask: torch.Tensor) -> None:
        self.gen_mask = gen_mask

    def apply(self, und: Fn, gen: Fn, x: torch.Tensor) -> torch.Tensor:
        return torch.where(self.gen_mask.unsqueeze(-1), gen(x), und(x))

    def to_batch(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def from_batch(self, x: torch.Tensor) -> torch.Tensor:
        return x


class PackedRouting:
    """Packed ``[N, ...]`` tensors of several samples.

    Args:
        und_index, gen_index: ``[N_und]`` / ``[N_gen]`` token indexes of each expert (a partition of 0..N−1).
        sample_lens: tokens per sample, in packing order (samples are contiguous).
    """

    def __init__(self, und_index: torch.Tensor, gen_index: torch.Tensor, sample_lens: list[int]) -> None:
        n = sum(sample_lens)
        if und_index.numel() + gen_index.numel() != n:
            raise ValueError(
                f"packed indexes cover {und_index.numel()} + {gen_index.numel()} tokens, sample_lens {n}"
            )
        self.und_index, self.gen_index = und_index, gen_index
        self.b, self.length = len(sample_lens), max(sample_lens)
        sample = torch.repeat_interleave(torch.arange(self.b), torch.tensor(sample_lens))
        starts = torch.tensor([0, *sample_lens[:-1]]).cumsum(0)
        self.sample, self.offset = sample, torch.arange(n) - starts[sample]
        self.valid = torch.zeros(self.b, self.length, dtype=torch.bool)
        self.valid[self.sample, self.offset] = True

    def apply(self, und: Fn, gen: Fn, x: torch.Tensor) -> torch.Tensor:
        a = und(x[self.und_index])
        g = gen(x[self.gen_index])
        out = a.new_empty(x.shape[0], *a.shape[1:])
        out[self.und_index] = a
        out[self.gen_index] = g.to(a.dtype)
        return out

    def to_batch(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, ...] → [b, L, ...]`` (right-padded with zeros)."""
        out = x.new_zeros(self.b, self.length, *x.shape[1:])
        out[self.sample, self.offset] = x
        return out

    def from_batch(self, x: torch.Tensor) -> torch.Tensor:
        return x[self.sample, self.offset]


def attention_bias(
    visible: torch.Tensor, gen_mask: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Additive mask ``[b, 1, pos, pos]``: query ``i`` sees key ``j`` if ``j`` is visible and ``j ≤ i``,
    or both are generation latents (the latents of a drawing attend to each other in both
    directions, as in BAGEL). A finite minimum, not −inf, so fully masked rows (pads) stay finite."""
    n = visible.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool, device=visible.device).tril()
    both_gen = gen_mask[:, :, None] & gen_mask[:, None, :]
    allowed = (causal[None] | both_gen) & visible[:, None, :].bool()
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


class PackedAttentionMoT(nn.Module):
    """One self-attention over the sequence; ``q/k/v/o_proj`` for understanding positions and
    ``..._moe_gen`` twins for generation latents (Qwen2: q/k/v with bias, o without; no q/k norms).

    The attention kernel is looked up as transformers' attention modules do
    (``ALL_ATTENTION_FUNCTIONS`` by ``config._attn_implementation``, default the Qwen2 eager one), so
    the toolkit's attention interception (patterns, knockout) sees it like any transformers model's."""

    def __init__(self, config) -> None:  # noqa: ANN001 - a transformers Qwen2Config
        super().__init__()
        d, n_heads, n_kv_heads = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        self.config = config
        self.n_heads, self.n_kv, self.head_dim = n_heads, n_kv_heads, d // n_heads
        self.num_key_value_groups = n_heads // n_kv_heads
        self.scaling, self.is_causal, self.attention_dropout = self.head_dim**-0.5, True, 0.0
        for suffix in ("", "_moe_gen"):
            setattr(self, f"q_proj{suffix}", nn.Linear(d, n_heads * self.head_dim, bias=True))
            setattr(self, f"k_proj{suffix}", nn.Linear(d, n_kv_heads * self.head_dim, bias=True))
            setattr(self, f"v_proj{suffix}", nn.Linear(d, n_kv_heads * self.head_dim, bias=True))
            setattr(self, f"o_proj{suffix}", nn.Linear(n_heads * self.head_dim, d, bias=False))

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor,
        route=None,  # noqa: ANN001 - a BatchedRouting or PackedRouting
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``hidden_states`` in the routing's layout; ``position_embeddings`` = ``cos, sin [b, L, head_dim]``
        and ``attention_mask`` (additive ``[b, 1, L, L]``) on the batch view → ``(attention output in
        the routing's layout, weights [b, heads, L, L] or None)``, as transformers' attention modules."""
        x, (cos, sin), bias = hidden_states, position_embeddings, attention_mask
        q = route.apply(self.q_proj, self.q_proj_moe_gen, x)
        k = route.apply(self.k_proj, self.k_proj_moe_gen, x)
        v = route.apply(self.v_proj, self.v_proj_moe_gen, x)
        q, k, v = (route.to_batch(t) for t in (q, k, v))
        b, length = q.shape[:2]
        q = q.view(b, length, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, length, self.n_kv, self.head_dim).transpose(1, 2)
        v = v.view(b, length, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        z, weights = attend(self, q, k, v, bias, dropout=0.0, scaling=self.scaling)
        z = z.reshape(b, length, -1)
        return route.apply(self.o_proj, self.o_proj_moe_gen, route.from_batch(z)), weights


class Qwen2MoTDecoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``+ mlp(norm(·))``, each norm and MLP per expert.

    ``mlp_out`` is a parameter-free marker (``nn.Identity``) on the two experts' joined MLP output,
    so the hook point ``blocks.{i}.mlp_out`` covers both experts (BAGEL itself has no such module).
    """

    def __init__(self, config) -> None:  # noqa: ANN001 - a transformers Qwen2Config
        super().__init__()
        d = config.hidden_size
        self.self_attn = PackedAttentionMoT(config)
        self.mlp, self.mlp_moe_gen = Qwen2MLP(config), Qwen2MLP(config)
        eps = config.rms_norm_eps
        self.input_layernorm, self.input_layernorm_moe_gen = Qwen2RMSNorm(d, eps), Qwen2RMSNorm(d, eps)
        self.post_attention_layernorm = Qwen2RMSNorm(d, eps)
        self.post_attention_layernorm_moe_gen = Qwen2RMSNorm(d, eps)
        self.mlp_out = nn.Identity()

    def forward(self, x: torch.Tensor, route, cos, sin, bias) -> torch.Tensor:
        """``route``: the batched layout's ``gen_mask [b, pos]`` (a tensor, so code that runs a block
        on a subset of rows slices it with the others) or a :class:`PackedRouting`."""
        route = BatchedRouting(route) if isinstance(route, torch.Tensor) else route
        h = route.apply(self.input_layernorm, self.input_layernorm_moe_gen, x)
        x = x + self.self_attn(h, position_embeddings=(cos, sin), attention_mask=bias, route=route)[0]
        h = route.apply(self.post_attention_layernorm, self.post_attention_layernorm_moe_gen, x)
        return x + self.mlp_out(route.apply(self.mlp, self.mlp_moe_gen, h))


class TimestepEmbedder(nn.Module):
    """Scalar flow time ``t ∈ [0, 1]`` → ``[n, d]``: sinusoidal features of ``1000·t``, then an MLP
    (the DiT recipe BAGEL uses; a few lines, written here)."""

    def __init__(self, d: int, freq_dim: int = 64) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, d), nn.SiLU(), nn.Linear(d, d))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half).to(t.device)
        args = 1000.0 * t.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], -1).to(self.mlp[0].weight.dtype))
