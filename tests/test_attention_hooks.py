"""hooks/attention.py: geometry, per-head outputs, and interception of the attention function."""

from __future__ import annotations

import pytest
import torch
from uniprobe.experiments.tiny import build_tiny
from uniprobe.hooks.adapters import adapter_for
from uniprobe.hooks.attention import (
    attention_geometry,
    attention_module,
    head_outputs,
    split_heads,
    z_site,
)
from uniprobe.hooks.errors import UniprobeError
from uniprobe.hooks.hookset import HookSet

LM_FAMILIES = ["tiny-llama", "tiny-qwen2", "tiny-emu3", "tiny-chameleon"]


@pytest.mark.parametrize("name", LM_FAMILIES)
def test_head_outputs_sum_to_attn_out(name: str) -> None:
    model, _ = build_tiny(name)
    adapter = adapter_for(model)
    geo = attention_geometry(model, adapter, 1)
    assert (geo.n_heads, geo.n_kv_heads, geo.d_head, geo.d_model) == (4, 2, 8, 32)
    seen: dict[str, torch.Tensor] = {}
    with HookSet() as hooks:
        hooks.read(model, z_site(adapter, 1), lambda t: seen.__setitem__("z", t))
        hooks.read(model, adapter.site(model, "blocks.1.attn_out"), lambda t: seen.__setitem__("out", t))
        with torch.no_grad():
            model(input_ids=torch.randint(3, 30, (2, 7)))
    o_proj = attention_module(model, adapter, 1).o_proj
    per_head = head_outputs(split_heads(seen["z"], geo.n_heads), o_proj)
    assert per_head.shape == (2, 7, 4, 32)
    bias = 0 if o_proj.bias is None else o_proj.bias
    torch.testing.assert_close(per_head.sum(-2) + bias, seen["out"], atol=1e-6, rtol=1e-5)


def test_attention_module_errors_name_the_layer() -> None:
    model, _ = build_tiny("tiny-llama")
    with pytest.raises(UniprobeError, match="no layer 5: the model has 2 blocks"):
        attention_module(model, adapter_for(model), 5)
