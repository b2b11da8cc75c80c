"""hooks/attention.py: geometry, per-head outputs, and interception of the attention function."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import PreTrainedModel
from uniprobe.experiments.sandbox import load_sandbox
from uniprobe.experiments.sandbox.checkpoint import SHIPPED
from uniprobe.experiments.tasks import Suite
from uniprobe.experiments.tiny import build_tiny
from uniprobe.hooks.adapters import adapter_for
from uniprobe.hooks.attention import (
    AttentionDispatchError,
    attention_geometry,
    attention_module,
    head_outputs,
    intercept_attention,
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


# -- interception: patterns equal eager weights, outputs unchanged ------------------------------------

FAMILIES = [*LM_FAMILIES, "tiny-janus", "tiny-query"]


def eager_copy(model: torch.nn.Module, impl: str = "eager") -> torch.nn.Module:
    """The same weights with ``impl`` attention (the transformers model inside a custom wrapper too)."""
    twin = copy.deepcopy(model)
    for module in twin.modules():
        if isinstance(module, PreTrainedModel):
            module.set_attn_implementation(impl)
            break
    return twin


def padded_batch(side: str) -> dict[str, torch.Tensor]:
    ids = torch.randint(5, 30, (3, 8), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if side == "left":
        mask[0, :3] = 0
        mask[1, :1] = 0
    elif side == "right":
        mask[0, -3:] = 0
        mask[2, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def intercepted_patterns(model, adapter, layers, run) -> tuple[dict[int, list[torch.Tensor]], object]:
    seen: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    with (
        torch.no_grad(),
        intercept_attention(model, adapter, layers, lambda c: seen[c.layer].append(c.pattern())),
    ):
        out = run(model)
    return seen, out


def eager_weights(model, adapter, layers, run) -> tuple[dict[int, list[torch.Tensor]], object]:
    seen: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    with torch.no_grad(), HookSet() as hooks:
        for i in layers:
            hooks.post(attention_module(model, adapter, i), lambda m, a, o, i=i: seen[i].append(o[1]))
        out = run(model)
    return seen, out


@pytest.mark.parametrize("side", ["none", "left", "right"])
@pytest.mark.parametrize("name", FAMILIES)
def test_patterns_equal_eager_weights_and_outputs_unchanged(name: str, side: str) -> None:
    model, _ = build_tiny(name)
    adapter = adapter_for(model)
    eager = eager_copy(model)
    batch = padded_batch(side)

    def run(m):
        return m(**batch)

    layers = range(adapter.n_layers(model))
    want, _ = eager_weights(eager, adapter, layers, run)
    for m in (model, eager):  # sdpa-loaded and eager-loaded: the same patterns
        got, out = intercepted_patterns(m, adapter, layers, run)
        for i in layers:
            assert len(got[i]) == len(want[i]) == 1
            torch.testing.assert_close(got[i][0], want[i][0], atol=1e-6, rtol=1e-5)
        with torch.no_grad():
            plain = run(m)
        for a, b in zip(_tensors(out), _tensors(plain), strict=True):
            assert torch.equal(a, b)  # bitwise: the model's own kernel ran on the same arguments


def _tensors(out) -> list[torch.Tensor]:
    values = out.values() if isinstance(out, dict) else out
    return [v for v in values if isinstance(v, torch.Tensor)]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_patterns_during_generation_with_cache(name: str) -> None:
    model, _ = build_tiny(name)
    adapter = adapter_for(model)
    batch = padded_batch("left")

    def run(m):
        return m.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=0)

    want, seq_eager = eager_weights(eager_copy(model), adapter, [0, 1], run)
    got, seq = intercepted_patterns(model, adapter, [0, 1], run)
    assert torch.equal(seq, seq_eager)
    assert [p.shape[-2:] for p in got[1]] == [(8, 8), (1, 9), (1, 10)]  # prompt, then one query per step
    for g, w in zip(got[1], want[1], strict=True):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)


def test_a_model_that_bypasses_the_attention_interface_raises(monkeypatch) -> None:
    import transformers.models.llama.modeling_llama as llama
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    model, _ = build_tiny("tiny-llama")
    adapter = adapter_for(model)
    bypass = type("Bypass", (), {"get_interface": staticmethod(lambda name, default: sdpa_attention_forward)})
    monkeypatch.setattr(llama, "ALL_ATTENTION_FUNCTIONS", bypass)
    with pytest.raises(
        AttentionDispatchError, match=r"LlamaAttention ran 1 time\(s\) but called the attention function 0"
    ):
        with torch.no_grad(), intercept_attention(model, adapter, [0, 1], lambda c: None):
            model(input_ids=torch.randint(3, 30, (1, 5)))
    assert attention_module(model, adapter, 0).config is model.config  # restored after the error


def test_interception_restores_configs_and_nests() -> None:
    model, _ = build_tiny("tiny-llama")
    adapter = adapter_for(model)
    attn = attention_module(model, adapter, 1)
    hits: list[str] = []
    with intercept_attention(model, adapter, [1], lambda c: hits.append("outer")):
        with intercept_attention(model, adapter, [1], lambda c: hits.append("inner")):
            assert attn.config._attn_implementation == "uniprobe"
            assert attn.config.hidden_size == model.config.hidden_size  # other fields forwarded
            with torch.no_grad():
                model(input_ids=torch.randint(3, 30, (1, 5)))
        assert attn.config._attn_implementation == "uniprobe"
    assert attn.config is model.config and model.config._attn_implementation == "sdpa"
    assert hits == ["outer", "inner"]


@pytest.mark.parametrize("name", list(SHIPPED))
def test_sandbox_patterns_equal_eager_weights_under_sdpa_too(name: str) -> None:
    model = load_sandbox(name)  # left-padded prompts; the query model appends its queries
    adapter = adapter_for(model)
    suite = Suite(0)
    items = [it for it in suite.items if it.category == "direct"][:2] + [
        it for it in suite.items if it.category == "arithmetic"
    ][:2]
    inputs = adapter.prepare(model, [{"prompt": it.draw_prompt} for it in items], "generation")
    assert inputs.layout.counts()["pad"] > 0

    def run(m):
        return adapter.run(m, inputs)

    layers = range(adapter.n_layers(model))
    want, _ = eager_weights(model, adapter, layers, run)
    for m in (model, eager_copy(model, "sdpa")):
        got, _ = intercepted_patterns(m, adapter, layers, run)
        for i in layers:
            torch.testing.assert_close(got[i][0], want[i][0], atol=1e-6, rtol=1e-5)
