"""Tiny models with diffusion decoders, built from configs offline (needs the ``diffusion`` extra).

``tiny-diffusion-query``: the tiny query model (Qwen2 backbone, N learnable queries, MLP connector)
whose decoder is a real diffusers ``PixArtTransformer2DModel`` (a DiT with cross-attention to the
connector output through ``caption_projection``) under a ``DDPMScheduler`` (epsilon prediction) —
how MetaQuery / BLIP3-o / OpenUni are really built, at toy size (~20k decoder parameters, 8×8×4
latents, 16 latent tokens).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from uniprobe.experiments.tiny import TinyQueryModel, tiny_qwen2
from uniprobe.hooks.diffusion import require_diffusers

LATENT_SHAPE = (4, 8, 8)  # [channels, height, width]


class TinyDiffusionQueryModel(TinyQueryModel):
    """A query model with a diffusion decoder.

    ``forward(input_ids, attention_mask)`` returns ``(text_logits [b, pos, vocab], conditioning
    [b, n_queries, d])`` — the connector's output, which the decoder reads as ``encoder_hidden_states``.
    The decoder does not run in ``forward``: one decoder call is one denoising step, run by
    :func:`uniprobe.hooks.diffusion.denoise` (sampling) or
    :class:`uniprobe.probes.patching.denoising.DenoisingLoss` (the metric). ``scheduler`` (a diffusers
    scheduler), ``latent_shape`` and ``decoder_kwargs`` (extra keywords the decoder needs) ride along.
    """

    def __init__(
        self,
        lm: nn.Module,
        decoder: nn.Module,
        scheduler: Any,
        latent_shape: tuple[int, ...],
        n_queries: int = 4,
    ) -> None:
        super().__init__(lm, n_queries=n_queries)
        self.decoder = decoder
        self.scheduler = scheduler
        self.latent_shape = tuple(latent_shape)
        # PixArt's micro-conditions (resolution, aspect ratio) are off at this size
        self.decoder_kwargs: dict[str, Any] = {
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}
        }

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        embeds = self.embed_inputs(input_ids)
        if attention_mask is not None:
            ones = attention_mask.new_ones(attention_mask.shape[0], self.n_queries)
            attention_mask = torch.cat([attention_mask, ones], dim=1)
        hidden = self.lm.model(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
        return self.lm.lm_head(hidden), self.connector(hidden[:, -self.n_queries :])


def tiny_diffusion_query(
    seed: int = 0, layers: int = 2, hidden: int = 32, decoder_layers: int = 2, n_train_timesteps: int = 100
) -> tuple[nn.Module, dict]:
    """A tiny query model whose decoder is a diffusers ``PixArtTransformer2DModel`` (see the module doc)."""
    diffusers = require_diffusers()
    lm, info = tiny_qwen2(seed=seed, layers=layers, hidden=hidden)
    torch.manual_seed(seed + 2)
    channels, size, _ = LATENT_SHAPE
    decoder = diffusers.PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=channels,
        out_channels=channels,
        num_layers=decoder_layers,
        sample_size=size,
        patch_size=2,
        cross_attention_dim=16,
        caption_channels=hidden,
        norm_num_groups=1,
        use_additional_conditions=False,
    )
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=n_train_timesteps)
    torch.manual_seed(seed + 1)
    model = TinyDiffusionQueryModel(lm, decoder.eval(), scheduler, LATENT_SHAPE).eval()
    return model, {**info, "n_queries": model.n_queries, "latent_shape": list(LATENT_SHAPE)}


def glm_prior_token_ids(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """GLM-Image's AR image tokens ``[b, h·w]`` → the DiT's prior ids ``[b, 2h·2w]``: each token
    repeated over a 2×2 block of latent patches (nearest 2× upsampling, as diffusers' GlmImagePipeline
    does; written out because that helper is private — tests compare the two)."""
    grid = tokens.view(-1, height, width)
    return grid.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2).flatten(1)


def tiny_glm_image_dit(seed: int = 0, codebook: int = 32, glyph_dim: int = 16) -> tuple[nn.Module, Any, dict]:
    """A tiny diffusers ``GlmImageTransformer2DModel`` (GLM-Image's DiT decoder) and its
    ``FlowMatchEulerDiscreteScheduler`` (rectified flow), from configs: 8×8×4 latents in 16 patches,
    conditioned on ``prior_token_id`` (the AR tokens of :func:`uniprobe.experiments.tiny.tiny_glm_image`,
    codebook ``codebook``, upsampled by :func:`glm_prior_token_ids`) and glyph embeddings
    ``encoder_hidden_states [b, n, glyph_dim]``. Returns ``(dit, scheduler, info)``."""
    diffusers = require_diffusers()
    torch.manual_seed(seed)
    dit = diffusers.GlmImageTransformer2DModel(
        patch_size=2,
        in_channels=LATENT_SHAPE[0],
        out_channels=LATENT_SHAPE[0],
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        text_embed_dim=glyph_dim,
        time_embed_dim=16,
        condition_dim=8,
        prior_vq_quantizer_codebook_size=codebook,
    ).eval()
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    return dit, scheduler, {"latent_shape": list(LATENT_SHAPE), "glyph_dim": glyph_dim, "prior_grid": [4, 4]}
