"""Shared pieces of the family adapters: padding a batch of token ids, greedy image-token loops."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from uniprobe.hooks.layout import ROLE_ID, TokenLayout


def pad_ids(
    examples: Sequence[dict[str, Any]], pad_id: int = 0, side: str = "right"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack examples' ``input_ids`` → ``(input_ids [b, pos], attention_mask [b, pos])``.

    ``side="right"`` keeps every example's positions starting at 0 (analysis); ``"left"`` puts
    the last prompt token in the last column (generation).
    """
    if not examples:
        raise ValueError("empty batch: no examples to run")
    seqs = []
    for i, ex in enumerate(examples):
        if "input_ids" not in ex:
            raise KeyError(f"example {i} has no 'input_ids' (keys: {', '.join(ex)})")
        seqs.append(torch.as_tensor(ex["input_ids"], dtype=torch.long).flatten())
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        ids[i, sl] = s
        mask[i, sl] = 1
    return ids, mask


def roles_from_ids(
    ids: torch.Tensor,
    mask: torch.Tensor,
    image_ids: Sequence[int] = (),
    image_role: str = "image_und",
    examples: Sequence[dict[str, Any]] | None = None,
    tail_role: str | None = None,
) -> TokenLayout:
    """``text`` everywhere, ``image_role`` at ids in ``image_ids``, ``pad`` where the mask is 0.

    An example may override with ``"roles"``: a list of role names for its unpadded positions
    (to mark ``cot`` spans, for instance).
    """
    roles = torch.full(ids.shape, ROLE_ID["text"], dtype=torch.long)
    if len(image_ids):
        roles[torch.isin(ids, torch.tensor(list(image_ids), dtype=torch.long))] = ROLE_ID[image_role]
    for i, ex in enumerate(examples or []):
        if "roles" in ex:
            names = list(ex["roles"])
            cols = mask[i].nonzero().flatten()
            if len(names) != len(cols):
                raise ValueError(
                    f"example {i}: 'roles' has {len(names)} entries but the example has {len(cols)} tokens"
                )
            roles[i, cols] = torch.tensor([ROLE_ID[n] for n in names], dtype=torch.long)
    roles[mask == 0] = ROLE_ID["pad"]
    return TokenLayout(roles, tail_role)


@torch.no_grad()
def greedy_image_tokens(
    backbone: nn.Module,
    head: nn.Module,
    embed: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    allowed: torch.Tensor,
    n_tokens: int,
    forced: dict[int, int] | None = None,
) -> torch.Tensor:
    """Greedy decoding restricted to ``allowed`` ids, with a KV cache.

    Reads the head's logits directly (before any suppression the model's own forward applies).
    ``forced`` maps a step index to a token id emitted regardless (Emu3's end-of-line tokens).
    Returns ``[batch, n_tokens]``. Step 0 is the prompt pass; step ``s`` feeds token ``s-1``.
    """
    from transformers import DynamicCache
    from uniprobe.hooks.calls import cache_kwarg

    cache = DynamicCache()
    key = cache_kwarg(backbone)  # the keyword moved between transformers versions
    if key is None:
        raise TypeError(
            f"{type(backbone).__name__}.forward takes no key/value cache; cannot decode step by step"
        )
    mask = attention_mask.clone()
    # positions count real tokens only, so left-padded rows match their unpadded runs
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = backbone(
        inputs_embeds=embed(input_ids),
        attention_mask=mask,
        position_ids=pos,
        use_cache=True,
        **{key: cache},
    )
    tokens = []
    for step in range(n_tokens):
        logits = head(out.last_hidden_state[:, -1])
        if forced and step in forced:
            nxt = torch.full((input_ids.shape[0],), forced[step], dtype=torch.long)
        else:
            sub = logits[:, allowed]
            nxt = allowed[sub.argmax(-1)]
        tokens.append(nxt)
        if step == n_tokens - 1:
            break
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        pos = pos[:, -1:] + 1
        out = backbone(
            inputs_embeds=embed(nxt[:, None]),
            attention_mask=mask,
            position_ids=pos,
            use_cache=True,
            **{key: cache},
        )
    return torch.stack(tokens, dim=1)
