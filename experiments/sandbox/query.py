"""SandboxQuery: a tiny MetaQuery-style unified model on a transformers ``Qwen2ForCausalLM``.

Understanding is plain text generation (images are read through ``img_embed``). For drawing,
``queries`` (N learnable tokens) are appended after ``prompt <boi>``; their final hidden states go
through ``connector`` (MLP d→d) into ``decoder``, a parallel grid decoder that maps the N vectors to
logits for every cell at once (it stands in for a diffusion decoder).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional
from transformers import Qwen2Config, Qwen2ForCausalLM
from uniprobe.experiments.sandbox.ar import backbone_config
from uniprobe.experiments.sandbox.base import SandboxModel, SandboxOutput
from uniprobe.experiments.sandbox.sequences import Batch, Segment
from uniprobe.experiments.tasks import world
from uniprobe.experiments.tasks.vocab import WordTokenizer


class GridDecoder(nn.Module):
    """``[b, N, d]`` connector outputs → ``[b, cells, n_tiles]`` logits in one shot."""

    def __init__(self, n_queries: int, d: int, hidden: int, cells: int, n_tiles: int) -> None:
        super().__init__()
        self.cells, self.n_tiles = cells, n_tiles
        self.net = nn.Sequential(
            nn.Linear(n_queries * d, hidden), nn.GELU(), nn.Linear(hidden, cells * n_tiles)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1)).view(x.shape[0], self.cells, self.n_tiles)


class SandboxQuery(SandboxModel):
    """MetaQuery-style model. Attributes: ``lm`` (Qwen2ForCausalLM), ``img_embed``, ``queries [N, d]``,
    ``connector``, ``decoder``."""

    arch = "query"

    def __init__(
        self,
        tokenizer: WordTokenizer | None = None,
        backbone: dict | None = None,
        grid: int = world.GRID,
        n_tiles: int = world.N_TILES,
        n_queries: int = 8,
        decoder_hidden: int = 256,
    ) -> None:
        tokenizer = tokenizer or WordTokenizer()
        super().__init__(tokenizer, grid, n_tiles)
        cfg = backbone_config(Qwen2Config, tokenizer, backbone)
        self.lm = Qwen2ForCausalLM(cfg)
        d = cfg.hidden_size
        self.n_queries, self.decoder_hidden = n_queries, decoder_hidden
        self.img_embed = nn.Embedding(n_tiles, d)
        self.queries = nn.Parameter(torch.randn(n_queries, d) * cfg.initializer_range)
        self.connector = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))
        self.decoder = GridDecoder(n_queries, d, decoder_hidden, self.n_cells, n_tiles)
        nn.init.normal_(self.img_embed.weight, std=cfg.initializer_range)

    def query_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[b, pos]`` bool, True at query positions (each row has 0 or N of them)."""
        return input_ids == self.tokenizer["<query>"]

    def embed_inputs(
        self, input_ids: torch.Tensor, image_tokens: torch.Tensor, image_mask: torch.Tensor
    ) -> torch.Tensor:
        """``[b, pos]`` → ``inputs_embeds [b, pos, d]``: words, tiles at images, ``queries`` at queries."""
        emb = torch.where(
            image_mask.unsqueeze(-1), self.img_embed(image_tokens), self.lm.model.embed_tokens(input_ids)
        )
        qmask = self.query_mask(input_ids)
        n_rows = int(qmask.any(-1).sum())
        if n_rows:
            q = torch.zeros_like(emb)
            q[qmask] = self.queries.to(emb.dtype).repeat(n_rows, 1)
            emb = torch.where(qmask.unsqueeze(-1), q, emb)
        return emb

    def forward(
        self, input_ids, image_tokens, image_mask, attention_mask, position_ids=None
    ) -> SandboxOutput:
        """All ``[b, pos]`` → text logits ``[b, pos, vocab]``, grid logits ``[b, cells, n_tiles]``."""
        emb = self.embed_inputs(input_ids, image_tokens, image_mask)
        h = self.lm.model(
            inputs_embeds=emb, attention_mask=attention_mask, position_ids=position_ids
        ).last_hidden_state
        b = input_ids.shape[0]
        grid_logits = h.new_zeros(b, self.n_cells, self.n_tiles)
        qmask = self.query_mask(input_ids)
        rows = qmask.any(-1)
        if rows.any():
            hq = h[qmask].view(-1, self.n_queries, h.shape[-1])
            grid_logits = grid_logits.index_put(
                (rows.nonzero().squeeze(-1),), self.decoder(self.connector(hq))
            )
        return SandboxOutput(self.lm.lm_head(h), grid_logits, h)

    def _draw_segments(self, target: Sequence[int] | None, loss: bool = False) -> list[Segment]:
        return [Segment("query", [self.tokenizer["<query>"]] * self.n_queries)]

    @torch.no_grad()
    def _draw(self, streams: list[list[Segment]]) -> list[np.ndarray]:
        for s in streams:
            s += self._draw_segments(None)
        logits = self.run(self._collate(streams)).image_logits
        return [world.decode(t) for t in logits.argmax(-1).tolist()]

    def _image_loss(self, out: SandboxOutput, batch: Batch) -> tuple[torch.Tensor, int]:
        if batch.grid_targets is None:
            return out.image_logits.sum() * 0, 0
        gt = batch.grid_targets.to(self.device)
        s = functional.cross_entropy(
            out.image_logits.flatten(0, 1), gt.flatten(), ignore_index=-100, reduction="sum"
        )
        return s, int((gt != -100).sum())
