"""Attention hook points (blocks.N.attn.*) and their capture, with role selection on both axes."""

from __future__ import annotations

import pytest
import torch
from test_attention_hooks import eager_copy, eager_weights
from uniprobe.experiments.tiny import build_tiny
from uniprobe.hooks.adapters import adapter_for
from uniprobe.hooks.attention import attention_module
from uniprobe.hooks.capture import capture
from uniprobe.hooks.errors import UsageError
from uniprobe.hooks.layout import TokenLayout
from uniprobe.hooks.points import UnknownHookPointError, canonical

ROLES = [
    ["pad", "pad", "text", "text", "cot", "cot", "image_gen", "image_gen"],
    ["text"] * 4 + ["cot"] * 2 + ["image_gen"] * 2,
]


@pytest.fixture(scope="module")
def llama():
    model, _ = build_tiny("tiny-llama")
    ids = torch.randint(5, 30, (2, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    return (
        model,
        adapter_for(model),
        {"input_ids": ids, "attention_mask": mask},
        TokenLayout.from_names(ROLES, "image_gen"),
    )


def test_attention_points_resolve_without_changing_stream_globs(llama) -> None:
    model, adapter, _, _ = llama
    assert adapter.expand(model, "blocks.*.attn.pattern") == [
        "blocks.0.attn.pattern",
        "blocks.1.attn.pattern",
    ]
    assert adapter.expand(model, "blocks.1.*") == [
        f"blocks.1.{p}" for p in ("resid_pre", "attn_out", "mlp_out", "resid_post")
    ]
    assert not any(
        ".attn." in p for p in adapter.points(model)
    )  # the point list callers iterate is unchanged
    assert canonical("blocks.0.attn.hook_pattern") == "blocks.0.attn.pattern"
    assert canonical("blocks.0.attn.hook_result") == "blocks.0.attn.head_out"
    assert adapter.site(model, "blocks.1.attn.z").module == "model.layers.1.self_attn.o_proj"
    with pytest.raises(UsageError, match="computed inside the attention function"):
        adapter.site(model, "blocks.1.attn.pattern")
    with pytest.raises(UnknownHookPointError, match="no hook point 'blocks.1.attn.patern'"):
        adapter.expand(model, "blocks.1.attn.patern")


def test_capture_pattern_q_k_z_head_out(llama) -> None:
    model, adapter, batch, layout = llama
    kinds = ("q", "k", "v", "z", "head_out")
    points = ["blocks.*.attn.pattern", "blocks.*.attn.scores", "blocks.1.attn_out"]
    points += [f"blocks.1.attn.{k}" for k in kinds]
    with torch.no_grad(), capture(model, points, layout=layout) as cap:
        out = model(**batch, use_cache=True)
    want, _ = eager_weights(eager_copy(model), adapter, [0, 1], lambda m: m(**batch))
    for i in (0, 1):  # [batch, q, head, k] rows, every key of the layout
        torch.testing.assert_close(
            cap[f"blocks.{i}.attn.pattern"], want[i][0].transpose(1, 2), atol=1e-6, rtol=1e-5
        )
        assert cap.key_columns[f"blocks.{i}.attn.pattern"] == [f"pos:{p}" for p in range(8)]
    scores = cap["blocks.1.attn.scores"]
    torch.testing.assert_close(scores.softmax(-1), want[1][0].transpose(1, 2), atol=1e-6, rtol=1e-5)
    keys = out.past_key_values.layers[1].keys  # [b, kv_heads, pos, d]: post-RoPE keys
    torch.testing.assert_close(cap["blocks.1.attn.k"], keys.transpose(1, 2))
    assert cap["blocks.1.attn.q"].shape == (2, 8, 4, 8) and cap["blocks.1.attn.v"].shape == (2, 8, 2, 8)
    o_proj = attention_module(model, adapter, 1).o_proj
    torch.testing.assert_close(o_proj(cap["blocks.1.attn.z"].flatten(2)), cap["blocks.1.attn_out"])
    bias = 0 if o_proj.bias is None else o_proj.bias
    torch.testing.assert_close(
        cap["blocks.1.attn.head_out"].sum(-2) + bias, cap["blocks.1.attn_out"], atol=1e-6, rtol=1e-5
    )


def test_role_selection_on_both_axes(llama) -> None:
    model, _, batch, layout = llama
    with torch.no_grad(), capture(model, "blocks.1.attn.pattern", layout=layout) as full:
        model(**batch)
    kw = dict(layout=layout, roles=["image_gen"])
    with torch.no_grad(), capture(model, "blocks.1.attn.pattern", key_roles=["text", "cot"], **kw) as mass:
        model(**batch)
    with torch.no_grad(), capture(model, "blocks.1.attn.pattern", key_positions=[4, 5, 9], **kw) as some:
        model(**batch)
    r = mass.rows("blocks.1.attn.pattern")  # only image_gen queries: 2 per example
    assert r.values.shape == (4, 4, 2) and r.pos.tolist() == [6, 7, 6, 7]
    assert mass.key_columns["blocks.1.attn.pattern"] == ["role:text", "role:cot"]
    dense = full["blocks.1.attn.pattern"]  # [b, q, h, k]
    text = layout.mask("text")
    for row in range(4):
        b, q = int(r.example[row]), int(r.pos[row])
        torch.testing.assert_close(r.values[row, :, 0], dense[b, q][:, text[b]].sum(-1))
        torch.testing.assert_close(r.values[row, :, 1], dense[b, q, :, 4:6].sum(-1))
    s = some.rows("blocks.1.attn.pattern").values  # position 9 does not exist: NaN
    torch.testing.assert_close(s[..., :2], dense[:, 6:8, :, 4:6].flatten(0, 1))
    assert torch.isnan(s[..., 2]).all()
    with pytest.raises(UsageError, match="scores take key_positions only"):
        with capture(model, "blocks.1.attn.scores", key_roles=["text"], **kw):
            pass


def test_capture_during_generation_per_step(llama) -> None:
    model, adapter, batch, layout = llama

    def run(m):
        return m.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=0)

    with (
        torch.no_grad(),
        capture(model, "blocks.1.attn.pattern", layout=layout, key_positions=range(11)) as cap,
    ):
        seq = run(model)
    want, seq_eager = eager_weights(eager_copy(model), adapter, [1], run)
    assert torch.equal(seq, seq_eager)
    for step in (1, 2):
        r = cap.rows("blocks.1.attn.pattern", step=step)
        assert r.pos.tolist() == [7 + step] * 2 and r.role.tolist() == [4, 4]  # image_gen: the tail role
        k = 8 + step
        torch.testing.assert_close(r.values[:, :, :k], want[1][step][:, :, 0], atol=1e-6, rtol=1e-5)
        assert torch.isnan(r.values[:, :, k:]).all()


def test_store_holds_attention_mass_per_key_role(tmp_path) -> None:
    from uniprobe.hooks.pipeline import capture_dataset

    model, _ = build_tiny("tiny-llama")
    adapter = adapter_for(model)
    examples = [{"input_ids": [1, 5, 6, 7][: 2 + i % 3], "labels": {"y": i % 2}} for i in range(6)]
    store = capture_dataset(
        model, examples, "blocks.1.attn.pattern", tmp_path / "s", adapter=adapter, batch_size=2,
        key_roles=["text", "pad"], progress=False,
    )  # fmt: skip
    rows = store.rows("blocks.1.attn.pattern")
    assert rows.values.shape[1:] == (4, 2)  # [head, key role] whatever each batch's length
    torch.testing.assert_close(rows.values.sum(-1), torch.ones(len(rows), 4))  # text + pad = every key
    assert store.identity["key_roles"] == ["text", "pad"]
    inputs = adapter.prepare(model, examples[4:6])
    with (
        torch.no_grad(),
        capture(model, "blocks.1.attn.pattern", layout=inputs.layout, key_roles=["text", "pad"]) as cap,
    ):
        adapter.run(model, inputs)
    last = rows.example >= 4
    torch.testing.assert_close(rows.values[last], cap.rows("blocks.1.attn.pattern").values)


@pytest.mark.parametrize(("name", "branches"), [("tiny-janus", [0, 1]), ("tiny-emu3", [0])])
def test_attention_mass_during_image_generation(name: str, branches: list[int]) -> None:
    from uniprobe.hooks.backends import run_capture

    model, _ = build_tiny(name)
    adapter = adapter_for(model)
    inputs = adapter.prepare(
        model, [{"input_ids": [1, 5, 6, 7]}, {"input_ids": [1, 8, 9, 10]}], mode="generation"
    )
    cap = run_capture(model, inputs, "blocks.1.attn.pattern", generate=True, key_roles=["text", "image_gen"])
    r = cap.rows("blocks.1.attn.pattern")
    assert r.branch.unique().tolist() == branches and r.step.max() >= 3  # every step, every guidance branch
    torch.testing.assert_close(r.values.sum(-1), torch.ones(len(r), 4))  # text + drawn = every key
    later = r.step > 1  # drawing steps attend to earlier drawn tokens too
    assert bool((r.values[later][..., 1] > 0).all()) and bool((r.values[r.step == 0][..., 1] == 0).all())


def test_janus_generation_patterns_equal_eager_weights_with_a_static_cache() -> None:
    """Janus draws with a static cache (20 slots, sdpa's maskless prefill): per step, the captured
    pattern equals an eager-loaded twin's weights, and the empty slots get nothing."""
    from uniprobe.hooks.backends import run_capture

    model, _ = build_tiny("tiny-janus")
    adapter = adapter_for(model)
    inputs = adapter.prepare(
        model, [{"input_ids": [1, 5, 6, 7]}, {"input_ids": [1, 8, 9, 10]}], mode="generation"
    )
    torch.manual_seed(0)
    cap = run_capture(model, inputs, "blocks.1.attn.pattern", generate=True, key_positions=range(8))
    torch.manual_seed(0)
    want, _ = eager_weights(eager_copy(model), adapter, [1], lambda m: adapter.generate(m, inputs))
    for step, w in enumerate(want[1]):  # [2B rows (cond, uncond), h, q, 20 slots]
        r = cap.rows("blocks.1.attn.pattern", step=step)
        got = r.values.view(w.shape[0], w.shape[2], 4, 8).transpose(1, 2)  # rows ordered by (row, pos)
        torch.testing.assert_close(got, w[..., :8], atol=1e-6, rtol=1e-5)
        assert float(w[..., 8:].abs().max()) == 0.0
