"""TransformerLens backend: a ``TransformerBridge`` on the adapter's causal-LM view.

The bridge is booted with ``TransformerBridge.boot_transformers(dir, hf_model=view,
tokenizer=...)`` where ``dir`` holds the view's config and a word-level tokenizer written
here (nothing is downloaded), inside :func:`uniprobe.hooks.guard.no_runtime_installs`, because a
multimodal boot may otherwise ``pip install torchvision``. Families whose backbone must be fed
embeddings (Janus image features, query tokens) pass ``inputs_embeds`` built by the adapter.

Note: booting a bridge wraps the view's modules in place (TransformerLens adds its bridge
components and hooks to the same ``nn.Module`` objects; no weights are copied). Outputs are
unchanged — the torch and nnsight backends still agree within 1e-6 afterwards — but hand
TransformerLens a ``copy.deepcopy`` of the model if you need the module tree untouched.
"""

from __future__ import annotations

import tempfile
from typing import Any

import torch
from torch import nn
from uniprobe.hooks.adapters import Adapter, ModelInputs
from uniprobe.hooks.guard import no_runtime_installs
from uniprobe.hooks.points import to_transformer_lens

_SPECIALS = {"pad_token": "t0", "bos_token": "t1", "eos_token": "t2", "unk_token": "t0"}
_BRIDGES: dict[int, tuple[nn.Module, Any]] = {}


def word_level_tokenizer(vocab_size: int, directory: str) -> Any:
    """Save and reload a ``t0 … t{V-1}`` word-level tokenizer (TransformerLens needs one on disk)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # single_word: special tokens must not match inside words ("t1" inside "t11")
    special = {name: AddedToken(word, single_word=True) for name, word in _SPECIALS.items()}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **special)
    fast.save_pretrained(directory)
    return PreTrainedTokenizerFast.from_pretrained(directory)


def bridge_for(model: nn.Module, adapter: Adapter, tokenizer: Any = None) -> Any:
    """Boot (once per model) the ``TransformerBridge`` of the adapter's causal-LM view."""
    if adapter.tl_view is None:
        raise ValueError(
            f"the {adapter.name!r} adapter has no TransformerLens view (TransformerLens adapts Llama, "
            "Qwen2, Emu3 and backbones of those); use backend='torch' or 'nnsight'"
        )
    key = id(model)
    if key in _BRIDGES and _BRIDGES[key][0] is model:
        return _BRIDGES[key][1]
    from transformer_lens.model_bridge import TransformerBridge

    view = adapter.tl_view(model)
    if not getattr(view.config, "architectures", None):
        # TransformerLens picks its architecture adapter from this field (harmless metadata)
        view.config.architectures = [type(view).__name__]
    config = view.config
    with tempfile.TemporaryDirectory() as d, no_runtime_installs():
        config.save_pretrained(d)
        tok = tokenizer or word_level_tokenizer(_vocab_size(config), d)
        bridge = TransformerBridge.boot_transformers(d, hf_model=view, tokenizer=tok, device="cpu")
    bridge.train(model.training)  # a hand-built view starts in training mode; follow the model
    _BRIDGES[key] = (model, bridge)
    return bridge


def _vocab_size(config: Any) -> int:
    text = getattr(config, "text_config", None)
    return int(getattr(text, "vocab_size", None) or config.vocab_size)


@torch.no_grad()
def transformer_lens_dense(
    model: nn.Module, adapter: Adapter, inputs: ModelInputs, points: list[str]
) -> dict[str, torch.Tensor]:
    """``{point: [b, pos, d]}`` from ``bridge.run_with_cache`` with a names filter."""
    names = {}
    for p in points:
        try:
            names[p] = to_transformer_lens(p)
        except KeyError as err:
            raise ValueError(
                f"hook point {p!r} is outside the TransformerLens view of {adapter.name!r}; "
                "capture it with backend='torch' or 'nnsight'"
            ) from err
    bridge = bridge_for(model, adapter)
    x = adapter.tl_embed(model, inputs) if adapter.tl_embed is not None else inputs.kwargs["input_ids"]
    mask = inputs.kwargs.get("attention_mask")
    if mask is not None and x.shape[1] != mask.shape[1]:  # query tokens appended after the prompt
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], x.shape[1] - mask.shape[1])], dim=1)
    wanted = set(names.values())
    _, cache = bridge.run_with_cache(x, attention_mask=mask, names_filter=lambda n: n in wanted)
    return {p: cache[n] for p, n in names.items()}
