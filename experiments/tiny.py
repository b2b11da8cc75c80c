"""Tiny models of the real classes, built from configs offline (for tests, the CLI and notebooks).

Each builder returns ``(model, info)`` where ``info`` carries what an analysis needs to talk
to the model (special token ids, image-token ids, sizes). Weights are random but seeded.
The configs follow the pitfalls written down in DESIGN.md (Janus projection sizes, Emu3 and
Chameleon vocabulary maps).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

HIDDEN = 32


def _seed(seed: int) -> None:
    torch.manual_seed(seed)


def tiny_llama(
    seed: int = 0, layers: int = 2, hidden: int = HIDDEN, vocab: int = 64
) -> tuple[nn.Module, dict]:
    """A tiny ``LlamaForCausalLM``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(cfg).eval(), {"vocab_size": vocab, "pad_token_id": 0, "bos_token_id": 1}


def tiny_qwen2(
    seed: int = 0, layers: int = 2, hidden: int = HIDDEN, vocab: int = 64
) -> tuple[nn.Module, dict]:
    """A tiny ``Qwen2ForCausalLM``."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    _seed(seed)
    cfg = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return Qwen2ForCausalLM(cfg).eval(), {"vocab_size": vocab, "pad_token_id": 0, "bos_token_id": 1}


def tiny_janus(seed: int = 0, layers: int = 2, hidden: int = HIDDEN) -> tuple[nn.Module, dict]:
    """A tiny ``JanusForConditionalGeneration`` (~0.4M params).

    Understanding reads 4 image tokens (image 32×32, patch 16); generation writes
    ``num_patches² = 4`` image tokens.
    """
    from transformers import JanusConfig, JanusForConditionalGeneration, LlamaConfig
    from transformers.models.janus.configuration_janus import JanusVisionConfig, JanusVQVAEConfig

    _seed(seed)
    vocab = 64
    text = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    vision = JanusVisionConfig(
        hidden_size=hidden,
        num_hidden_layers=1,
        num_attention_heads=4,
        image_size=32,
        patch_size=16,
        projection_dim=hidden,
        num_image_tokens=4,
        depth=1,
    )
    vq = JanusVQVAEConfig(
        embed_dim=8,
        num_embeddings=16,
        latent_channels=32,
        base_channels=32,
        channel_multiplier=[1, 1],
        num_res_blocks=1,
        num_patches=2,
        projection_dim=hidden,
        image_token_embed_dim=hidden,
        num_hidden_layers=1,
    )
    cfg = JanusConfig(text_config=text, vision_config=vision, vq_config=vq, image_token_id=3)
    model = JanusForConditionalGeneration(cfg).eval()
    info = {
        "vocab_size": vocab,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "image_token_id": 3,
        "boi_token_id": 4,
        "num_image_tokens": 4,
        "image_size": 32,
        "num_gen_tokens": 4,
    }
    return model, info


def _visual_names_emu3(n: int) -> dict[str, int]:
    return {f"<|visual token{i:06d}|>": 40 + i for i in range(n)}


def tiny_emu3(seed: int = 0, layers: int = 2, hidden: int = HIDDEN) -> tuple[nn.Module, dict]:
    """A tiny ``Emu3ForConditionalGeneration``: text ids 0..39, visual tokens 40..55, extras after."""
    from transformers import Emu3Config, Emu3ForConditionalGeneration
    from transformers.models.emu3.configuration_emu3 import Emu3TextConfig, Emu3VQVAEConfig

    _seed(seed)
    n_visual = 16
    vocab_map = {f"t{i}": i for i in range(40)}
    vocab_map.update(_visual_names_emu3(n_visual))
    specials = {"<image>": 56, "<|extra_200|>": 57, "<|image start|>": 58, "<|image end|>": 59}
    vocab_map.update(specials)
    vocab = 64
    text = Emu3TextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        attention_dropout=0.0,
    )
    vq = Emu3VQVAEConfig(
        codebook_size=n_visual,
        embed_dim=4,
        latent_channels=4,
        base_channels=32,
        channel_multiplier=[1, 1],
        num_res_blocks=1,
        attn_resolutions=[],
        hidden_size=32,
        num_attention_heads=1,
        temporal_downsample_factor=1,
    )
    cfg = Emu3Config(text_config=text, vq_config=vq, vocabulary_map=vocab_map)
    model = Emu3ForConditionalGeneration(cfg).eval()
    info = {
        "vocab_size": vocab,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "image_token_ids": list(range(40, 40 + n_visual)),
        "image_placeholder_id": 56,
        "eol_token_id": 57,
        "boi_token_id": 58,
        "eoi_token_id": 59,
    }
    return model, info


def tiny_chameleon(seed: int = 0, layers: int = 2, hidden: int = HIDDEN) -> tuple[nn.Module, dict]:
    """A tiny ``ChameleonForConditionalGeneration``: image tokens ``IMGIMG…Z`` at ids 40..55."""
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration
    from transformers.models.chameleon.configuration_chameleon import ChameleonVQVAEConfig

    _seed(seed)
    n_visual = 16
    letters = "ABCDEFGHIJ"
    vocab_map = {f"t{i}": i for i in range(40)}
    for i in range(n_visual):
        vocab_map["IMGIMG" + "".join(letters[int(c)] for c in str(i)) + "Z"] = 40 + i
    vocab_map.update({"<image>": 56, "<racm3:break>": 57, "<eoss>": 58})
    vocab = 64
    vq = ChameleonVQVAEConfig(
        embed_dim=8,
        num_embeddings=n_visual,
        latent_channels=8,
        resolution=32,
        base_channels=32,
        channel_multiplier=[1, 1],
        num_res_blocks=1,
        attn_resolutions=[],
    )
    cfg = ChameleonConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        vq_config=vq,
        vocabulary_map=vocab_map,
    )
    model = ChameleonForConditionalGeneration(cfg).eval()
    info = {
        "vocab_size": vocab,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "image_token_ids": list(range(40, 40 + n_visual)),
        "image_placeholder_id": 56,
        "boi_token_id": 57,
        "eoi_token_id": 58,
    }
    return model, info


def tiny_glm_image(seed: int = 0, layers: int = 2, hidden: int = HIDDEN) -> tuple[nn.Module, dict]:
    """A tiny ``GlmImageForConditionalGeneration``: codebook ids 0..31, ``image_start`` 32, ``image_end``
    33 (the vision vocabulary is 40), text ids 40..95 with the image placeholder 90 and pad 95; the
    vision tower reads 4×4 patches. transformers' class needs transformers >= 5.23."""
    from uniprobe.hooks.adapters.glm_image import require_glm_image

    model_cls = require_glm_image()
    from transformers import GlmImageConfig

    _seed(seed)
    cfg = GlmImageConfig(
        text_config={
            "vocab_size": 96,
            "vision_vocab_size": 40,
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 256,
            "pad_token_id": 95,
            "eos_token_id": 33,
            # (temporal, height, width) sections of the rotary half-dim (head_dim 8 → 4)
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
        },
        vision_config={
            "depth": 1,
            "hidden_size": hidden,
            "num_heads": 2,
            "intermediate_size": 2 * hidden,
            "image_size": 16,
            "patch_size": 4,
        },
        vq_config={"embed_dim": 16, "num_embeddings": 32, "latent_channels": hidden},
        image_token_id=90,
        image_start_token_id=32,
        image_end_token_id=33,
    )
    info = {
        "vocab_size": 96,
        "pad_token_id": 95,
        "image_token_ids": list(range(32)),
        "image_placeholder_id": 90,
        "boi_token_id": 32,
        "eoi_token_id": 33,
        "text_token_ids": list(range(40, 90)),
        "patch_dim": 3 * 4 * 4,
    }
    return model_cls(cfg).eval(), info


class TinyQueryModel(nn.Module):
    """A MetaQuery-style model: a Qwen2 backbone, N learnable queries, an MLP connector, a grid decoder.

    ``forward(input_ids, attention_mask)`` appends the queries after the prompt and returns
    ``(text_logits [b, pos, vocab], image_logits [b, n_queries, codebook])``.
    """

    def __init__(self, lm: nn.Module, n_queries: int = 4, codebook: int = 16) -> None:
        super().__init__()
        d = lm.config.hidden_size
        self.lm = lm
        self.queries = nn.Parameter(torch.randn(n_queries, d) * 0.02)
        self.connector = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.decoder = nn.Linear(d, codebook)

    @property
    def n_queries(self) -> int:
        return self.queries.shape[0]

    def embed_inputs(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[b, pos]`` ids → ``[b, pos + n_queries, d]`` embeddings with the queries appended."""
        text = self.lm.model.embed_tokens(input_ids)
        q = self.queries.unsqueeze(0).expand(input_ids.shape[0], -1, -1)
        return torch.cat([text, q.to(text.dtype)], dim=1)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        embeds = self.embed_inputs(input_ids)
        if attention_mask is not None:
            ones = attention_mask.new_ones(attention_mask.shape[0], self.n_queries)
            attention_mask = torch.cat([attention_mask, ones], dim=1)
        hidden = self.lm.model(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
        text_logits = self.lm.lm_head(hidden)
        image_logits = self.decoder(self.connector(hidden[:, -self.n_queries :]))
        return text_logits, image_logits


def tiny_query(seed: int = 0, layers: int = 2, hidden: int = HIDDEN) -> tuple[nn.Module, dict]:
    """A tiny query-based model on a transformers Qwen2 backbone."""
    lm, info = tiny_qwen2(seed=seed, layers=layers, hidden=hidden)
    _seed(seed + 1)
    model = TinyQueryModel(lm).eval()
    return model, {**info, "n_queries": model.n_queries, "codebook": 16}


def tiny_diffusion_query(**kwargs: Any) -> tuple[nn.Module, dict]:
    """A tiny query model whose decoder is a diffusers DiT (needs the ``diffusion`` extra; built in
    :mod:`uniprobe.experiments.tiny_diffusion`, imported only when asked for)."""
    from uniprobe.experiments.tiny_diffusion import tiny_diffusion_query as build

    return build(**kwargs)


TINY_BUILDERS: dict[str, Callable[..., tuple[nn.Module, dict[str, Any]]]] = {
    "tiny-llama": tiny_llama,
    "tiny-qwen2": tiny_qwen2,
    "tiny-janus": tiny_janus,
    "tiny-emu3": tiny_emu3,
    "tiny-chameleon": tiny_chameleon,
    "tiny-glm-image": tiny_glm_image,
    "tiny-query": tiny_query,
    "tiny-diffusion-query": tiny_diffusion_query,
}


def build_tiny(name: str, **kwargs: Any) -> tuple[nn.Module, dict]:
    """Build a tiny model by name (see :data:`TINY_BUILDERS`)."""
    if name not in TINY_BUILDERS:
        raise ValueError(f"no built-in tiny model {name!r}; choose one of {', '.join(TINY_BUILDERS)}")
    return TINY_BUILDERS[name](**kwargs)
