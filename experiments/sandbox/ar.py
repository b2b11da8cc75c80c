"""SandboxAR: a tiny Janus-style autoregressive unified model on a transformers ``LlamaForCausalLM``.

One residual stream over text and image tokens. Text positions are embedded by
``lm.model.embed_tokens``, image positions (read for understanding or generated) by ``img_embed``
over tile codes. The final hidden states go to ``lm.lm_head`` (next word) and ``gen_head`` (next
tile). Drawing is autoregressive: after ``<boi>`` the model emits ``n_cells`` tiles, one per step.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional
from transformers import LlamaConfig, LlamaForCausalLM
from uniprobe.experiments.sandbox.base import SandboxModel, SandboxOutput
from uniprobe.experiments.sandbox.sequences import Batch, Segment
from uniprobe.experiments.tasks import world
from uniprobe.experiments.tasks.vocab import WordTokenizer

DEFAULT_BACKBONE: dict = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}


def backbone_config(cls, tokenizer: WordTokenizer, overrides: dict | None):
    """A backbone config with the tokenizer's vocabulary and special ids; eager attention."""
    kw = {**DEFAULT_BACKBONE, **(overrides or {})}
    for key in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id"):
        kw.pop(key, None)
    cfg = cls(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer["<bos>"],
        eos_token_id=tokenizer["<eos>"],
        pad_token_id=tokenizer.pad_id,
        **{k: v for k, v in kw.items() if not k.startswith("_")},
    )
    cfg._attn_implementation = "eager"  # finite masks under left padding; hook-friendly
    return cfg


class SandboxAR(SandboxModel):
    """Janus-style AR model. Attributes: ``lm`` (LlamaForCausalLM), ``img_embed``, ``gen_head``."""

    arch = "ar"

    def __init__(
        self,
        tokenizer: WordTokenizer | None = None,
        backbone: dict | None = None,
        grid: int = world.GRID,
        n_tiles: int = world.N_TILES,
    ) -> None:
        tokenizer = tokenizer or WordTokenizer()
        super().__init__(tokenizer, grid, n_tiles)
        cfg = backbone_config(LlamaConfig, tokenizer, backbone)
        self.lm = LlamaForCausalLM(cfg)
        d = cfg.hidden_size
        self.img_embed = nn.Embedding(n_tiles, d)
        self.gen_head = nn.Linear(d, n_tiles)
        nn.init.normal_(self.img_embed.weight, std=cfg.initializer_range)

    def embed_inputs(
        self, input_ids: torch.Tensor, image_tokens: torch.Tensor, image_mask: torch.Tensor
    ) -> torch.Tensor:
        """``[b, pos]`` ids, tile codes and image mask → ``inputs_embeds [b, pos, d]``."""
        text = self.lm.model.embed_tokens(input_ids)
        img = self.img_embed(image_tokens)
        return torch.where(image_mask.unsqueeze(-1), img, text)

    def forward(
        self, input_ids, image_tokens, image_mask, attention_mask, position_ids=None
    ) -> SandboxOutput:
        """All ``[b, pos]`` → text logits ``[b, pos, vocab]`` and next-tile logits ``[b, pos, n_tiles]``."""
        emb = self.embed_inputs(input_ids, image_tokens, image_mask)
        h = self.lm.model(
            inputs_embeds=emb, attention_mask=attention_mask, position_ids=position_ids
        ).last_hidden_state
        return SandboxOutput(self.lm.lm_head(h), self.gen_head(h), h)

    def _draw_segments(self, target: Sequence[int] | None, loss: bool = False) -> list[Segment]:
        return [Segment("image_gen", list(target), loss=loss)] if target is not None else []

    @torch.no_grad()
    def _draw(self, streams: list[list[Segment]]) -> list[np.ndarray]:
        tiles: list[list[int]] = [[] for _ in streams]
        for _ in range(self.n_cells):
            logits = self.run(self._collate(streams)).image_logits[:, -1]
            for i, t in enumerate(logits.argmax(-1).tolist()):
                tiles[i].append(t)
                streams[i].append(Segment("image_gen", [t]))
        return [world.decode(t) for t in tiles]

    def _image_loss(self, out: SandboxOutput, batch: Batch) -> tuple[torch.Tensor, int]:
        it = batch.image_targets.to(self.device)
        s = functional.cross_entropy(
            out.image_logits.flatten(0, 1), it.flatten(), ignore_index=-100, reduction="sum"
        )
        return s, int((it != -100).sum())
