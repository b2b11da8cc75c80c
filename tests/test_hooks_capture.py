"""Tests for uniprobe.hooks.capture: dense values against the HF model, role / position selection, dtype and
device, hook removal (also on errors), and step / branch tagging during Janus image generation."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from uniprobe.experiments.tiny import build_tiny
from uniprobe.hooks.adapters import ModelInputs, Site, adapter_for
from uniprobe.hooks.adapters.base import Adapter
from uniprobe.hooks.capture import capture
from uniprobe.hooks.layout import ROLE_ID, TokenLayout
from uniprobe.hooks.points import UnknownHookPointError

N_LAYERS = 3
# right-padded batch: example 1 has 2 pad positions
EXAMPLES = [{"input_ids": [1, 5, 6, 7, 8]}, {"input_ids": [1, 9, 10]}]


def installed_hooks(model: nn.Module) -> dict[str, int]:
    """Modules of ``model`` carrying any forward hook or forward pre-hook → how many."""
    out = {}
    for name, mod in model.named_modules():
        n = len(mod._forward_hooks) + len(mod._forward_pre_hooks)
        if n:
            out[name] = n
    return out


@pytest.fixture(scope="module")
def llama() -> tuple[nn.Module, Adapter, ModelInputs]:
    model, _ = build_tiny("tiny-llama", layers=N_LAYERS)
    adapter = adapter_for(model)
    return model, adapter, adapter.prepare(model, EXAMPLES)


@pytest.fixture(scope="module")
def clean_llama() -> tuple[nn.Module, Adapter, ModelInputs]:
    """A model never run with ``output_hidden_states`` (transformers then adds hooks of its own)."""
    model, _ = build_tiny("tiny-llama", layers=N_LAYERS)
    assert installed_hooks(model) == {}
    adapter = adapter_for(model)
    return model, adapter, adapter.prepare(model, EXAMPLES)


@pytest.fixture(scope="module")
def llama_run(llama: tuple) -> tuple:
    """Every point captured on one forward, with HF's own ``output_hidden_states``."""
    model, adapter, inputs = llama
    with torch.no_grad(), capture(model, "*", adapter=adapter, layout=inputs.layout) as cap:
        out = model(**inputs.kwargs, output_hidden_states=True)
    return cap, out


@pytest.fixture(scope="module")
def janus() -> tuple[nn.Module, dict]:
    return build_tiny("tiny-janus")


# -- dense values -----------------------------------------------------------------------------


def test_capture_registers_one_row_table_per_point(llama: tuple, llama_run: tuple) -> None:
    model, adapter, inputs = llama
    cap, _ = llama_run
    assert cap.points == adapter.points(model)
    assert len(cap.points) == 3 + 4 * N_LAYERS
    assert cap.calls == [(0, 0, inputs.kwargs["input_ids"].shape[1])]
    for p in cap.points:
        assert cap[p].shape == (2, 5, 32), p
        assert not cap[p].requires_grad


def test_resid_points_equal_hf_hidden_states(llama_run: tuple) -> None:
    cap, out = llama_run
    hs = out.hidden_states
    assert len(hs) == N_LAYERS + 1
    for i in range(N_LAYERS):
        torch.testing.assert_close(cap[f"blocks.{i}.resid_pre"], hs[i], rtol=0, atol=0)
    for i in range(N_LAYERS - 1):
        torch.testing.assert_close(cap[f"blocks.{i}.resid_post"], hs[i + 1], rtol=0, atol=0)
    # transformers 5.x: the last hidden_states entry is taken after the final norm, so it is
    # final_norm, not the last block's output
    torch.testing.assert_close(cap["final_norm"], hs[-1], rtol=0, atol=0)
    last = cap[f"blocks.{N_LAYERS - 1}.resid_post"]
    assert (last - hs[-1]).abs().max() > 1e-2


def test_final_norm_is_the_norm_of_the_last_block(llama: tuple, llama_run: tuple) -> None:
    model, _, _ = llama
    cap, _ = llama_run
    with torch.no_grad():
        normed = model.model.norm(cap[f"blocks.{N_LAYERS - 1}.resid_post"])
    torch.testing.assert_close(cap["final_norm"], normed, rtol=0, atol=1e-6)


def test_resid_pre_is_previous_resid_post(llama_run: tuple) -> None:
    cap, _ = llama_run
    for i in range(1, N_LAYERS):
        torch.testing.assert_close(
            cap[f"blocks.{i}.resid_pre"], cap[f"blocks.{i - 1}.resid_post"], rtol=0, atol=0
        )


def test_resid_post_is_pre_plus_attn_plus_mlp(llama_run: tuple) -> None:
    cap, _ = llama_run
    for i in range(N_LAYERS):
        pre, attn, mlp = (cap[f"blocks.{i}.{k}"] for k in ("resid_pre", "attn_out", "mlp_out"))
        assert attn.abs().max() > 0 and mlp.abs().max() > 0
        torch.testing.assert_close(cap[f"blocks.{i}.resid_post"], pre + attn + mlp, rtol=0, atol=1e-5)


def test_lm_head_in_is_final_norm_and_embed_is_block0_input(llama: tuple, llama_run: tuple) -> None:
    model, _, inputs = llama
    cap, out = llama_run
    torch.testing.assert_close(cap["lm_head.in"], cap["final_norm"], rtol=0, atol=0)
    torch.testing.assert_close(cap["embed"], cap["blocks.0.resid_pre"], rtol=0, atol=0)
    torch.testing.assert_close(
        cap["embed"], model.model.embed_tokens(inputs.kwargs["input_ids"]), rtol=0, atol=0
    )
    with torch.no_grad():
        torch.testing.assert_close(model.lm_head(cap["lm_head.in"]), out.logits, rtol=0, atol=1e-6)


def test_capture_does_not_change_the_forward(llama: tuple, llama_run: tuple) -> None:
    model, _, inputs = llama
    _, out = llama_run
    with torch.no_grad():
        plain = model(**inputs.kwargs).logits
    torch.testing.assert_close(plain, out.logits, rtol=0, atol=0)


# -- selection --------------------------------------------------------------------------------


def test_role_selection_keeps_exactly_the_text_positions(llama: tuple, llama_run: tuple) -> None:
    model, adapter, inputs = llama
    dense, _ = llama_run
    with (
        torch.no_grad(),
        capture(model, "blocks.*.resid_post", adapter=adapter, layout=inputs.layout, roles=["text"]) as cap,
    ):
        model(**inputs.kwargs)
    mask = inputs.kwargs["attention_mask"]
    for p in cap.points:
        rows = cap.rows(p)
        assert len(rows) == int(mask.sum()) == 8  # 5 + 3, the 2 pad positions dropped
        assert rows.values.shape == (8, 32)
        assert sorted(zip(rows.example.tolist(), rows.pos.tolist(), strict=True)) == [
            tuple(x) for x in mask.nonzero().tolist()
        ]
        assert set(rows.role.tolist()) == {ROLE_ID["text"]}
        assert set(rows.step.tolist()) == {0} and set(rows.branch.tolist()) == {0}
        torch.testing.assert_close(rows.values, dense[p][rows.example, rows.pos], rtol=0, atol=0)
        with pytest.raises(ValueError, match="kept 8 of 10 positions"):
            cap.dense(p)


def test_role_selection_of_pad_only(llama: tuple) -> None:
    model, adapter, inputs = llama
    with (
        torch.no_grad(),
        capture(model, "final_norm", adapter=adapter, layout=inputs.layout, roles=["pad"]) as cap,
    ):
        model(**inputs.kwargs)
    rows = cap.rows("final_norm")
    assert rows.example.tolist() == [1, 1] and rows.pos.tolist() == [3, 4]
    assert set(rows.role.tolist()) == {ROLE_ID["pad"]}


def test_explicit_positions(llama: tuple, llama_run: tuple) -> None:
    model, adapter, inputs = llama
    dense, _ = llama_run
    with (
        torch.no_grad(),
        capture(model, "blocks.1.mlp_out,final_norm", adapter=adapter, positions=[0, 2]) as cap,
    ):
        model(**inputs.kwargs)
    for p in ("blocks.1.mlp_out", "final_norm"):
        rows = cap.rows(p)
        assert rows.example.tolist() == [0, 0, 1, 1]
        assert rows.pos.tolist() == [0, 2, 0, 2]
        torch.testing.assert_close(rows.values, dense[p][rows.example, rows.pos], rtol=0, atol=0)


def test_roles_and_positions_combine(llama: tuple) -> None:
    model, adapter, inputs = llama
    with (
        torch.no_grad(),
        capture(
            model, "final_norm", adapter=adapter, layout=inputs.layout, roles=["text"], positions=[2, 3, 4]
        ) as cap,
    ):
        model(**inputs.kwargs)
    rows = cap.rows("final_norm")
    # example 0 keeps 2, 3, 4; example 1 keeps 2 (3 and 4 are pad)
    assert list(zip(rows.example.tolist(), rows.pos.tolist(), strict=True)) == [
        (0, 2),
        (0, 3),
        (0, 4),
        (1, 2),
    ]


def test_selecting_roles_needs_a_layout(clean_llama: tuple) -> None:
    model, adapter, _ = clean_llama
    with pytest.raises(ValueError, match="needs a layout"):
        capture(model, "final_norm", adapter=adapter, roles=["text"])
    assert installed_hooks(model) == {}


def test_layout_of_another_batch_is_refused(clean_llama: tuple) -> None:
    model, adapter, inputs = clean_llama
    other = TokenLayout.uniform(3, 5)
    with pytest.raises(ValueError, match="layout has 3 examples but the model ran 2 rows"):
        with torch.no_grad(), capture(model, "final_norm", adapter=adapter, layout=other):
            model(**inputs.kwargs)
    assert installed_hooks(model) == {}


# -- dtype and device -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dtype_option(llama: tuple, llama_run: tuple, dtype: torch.dtype) -> None:
    model, adapter, inputs = llama
    dense, _ = llama_run
    with (
        torch.no_grad(),
        capture(model, "blocks.*.resid_post,final_norm", adapter=adapter, dtype=dtype) as cap,
    ):
        model(**inputs.kwargs)
    for p in cap.points:
        assert cap[p].dtype == dtype
        torch.testing.assert_close(cap[p], dense[p].to(dtype))  # cast of the float32 value
    assert next(model.parameters()).dtype == torch.float32  # the model itself is untouched


def test_device_option(llama: tuple) -> None:
    model, adapter, inputs = llama
    with torch.no_grad(), capture(model, "final_norm", adapter=adapter, device="meta") as cap:
        model(**inputs.kwargs)
    rows = cap.rows("final_norm")
    assert rows.values.device.type == "meta"
    assert rows.values.shape == (10, 32)
    with torch.no_grad(), capture(model, "final_norm", adapter=adapter, device=torch.device("cpu")) as cap:
        model(**inputs.kwargs)
    assert cap["final_norm"].device.type == "cpu"


# -- hook removal -----------------------------------------------------------------------------


def test_every_hook_is_removed_after_exit(clean_llama: tuple) -> None:
    model, adapter, inputs = clean_llama
    assert installed_hooks(model) == {}
    with torch.no_grad(), capture(model, "*", adapter=adapter) as cap:
        inside = installed_hooks(model)
        model(**inputs.kwargs)
    # one hook per point plus the call tracker on block 0
    assert sum(inside.values()) == len(cap.points) + 1
    assert installed_hooks(model) == {}


def test_hooks_removed_when_a_hooked_module_raises(
    clean_llama: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, adapter, inputs = clean_llama

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("mlp exploded")

    monkeypatch.setattr(model.model.layers[1].mlp, "forward", broken)
    with pytest.raises(RuntimeError, match="mlp exploded"):
        with torch.no_grad(), capture(model, "*", adapter=adapter, layout=inputs.layout) as cap:
            assert installed_hooks(model) != {}
            model(**inputs.kwargs)
    assert installed_hooks(model) == {}
    # what ran before the failure was captured, what came after was not
    assert len(cap.rows("blocks.0.resid_post")) == 10
    assert cap.records["blocks.1.mlp_out"] == [] and cap.records["final_norm"] == []


def test_hooks_removed_when_the_input_is_bad(clean_llama: tuple) -> None:
    model, adapter, inputs = clean_llama
    bad_ids = torch.tensor([[1, 5, 999]])  # out of the vocabulary
    with pytest.raises(IndexError):
        with torch.no_grad(), capture(model, "*", adapter=adapter):
            model(input_ids=bad_ids)
    assert installed_hooks(model) == {}
    # embeddings of the wrong width fail inside block 0, after the tracker and embed hooks ran
    with pytest.raises(RuntimeError):
        with torch.no_grad(), capture(model, "*", adapter=adapter) as cap:
            model(inputs_embeds=torch.randn(2, 5, 7))
    assert installed_hooks(model) == {}
    assert cap.calls == [(0, 0, 5)] and cap.rows("embed").values.shape == (10, 7)


def test_hooks_removed_when_a_site_is_invalid_at_enter(clean_llama: tuple) -> None:
    model, _, _ = clean_llama
    base = adapter_for(model)
    broken = Adapter(
        name="broken",
        model_classes=(),
        blocks=base.blocks,
        final_norm=base.final_norm,
        lm_head=base.lm_head,
        extra={"bogus": Site("model.no_such_module")},
    )
    # the block points and the tracker are registered before the bad site is reached
    cm = capture(model, "blocks.*.resid_post,bogus", adapter=broken)
    with pytest.raises(AttributeError, match="no_such_module"):
        with cm:
            pytest.fail("the body must not run")
    assert installed_hooks(model) == {}
    assert cm._handles == []


def test_unknown_point_fails_before_registering(clean_llama: tuple) -> None:
    model, adapter, _ = clean_llama
    with pytest.raises(UnknownHookPointError) as info:
        capture(model, "blocks.7.resid_post", adapter=adapter)
    assert f"model has {N_LAYERS} blocks" in str(info.value)
    with pytest.raises(UnknownHookPointError, match="nearest: final_norm"):
        capture(model, "final_nrom", adapter=adapter)
    with pytest.raises(UnknownHookPointError, match="'gen_head.in'"):  # a Janus point on a text LM
        capture(model, "gen_head.in", adapter=adapter)
    assert installed_hooks(model) == {}


def test_capture_finds_the_adapter_itself(clean_llama: tuple) -> None:
    model, _, inputs = clean_llama
    with torch.no_grad(), capture(model, "final_norm") as cap:
        model(**inputs.kwargs)
    assert cap["final_norm"].shape == (2, 5, 32)
    assert installed_hooks(model) == {}


def test_rows_of_a_point_never_called_or_never_captured(janus: tuple) -> None:
    model, info = janus
    adapter = adapter_for(model)
    inputs = adapter.prepare(model, [{"input_ids": [1, 5, 6]}])
    with (
        torch.no_grad(),
        capture(model, "final_norm,gen_head.in", adapter=adapter, layout=inputs.layout) as cap,
    ):
        model(**inputs.kwargs)
    assert cap["final_norm"].shape == (1, 3, 32)
    with pytest.raises(ValueError, match="nothing was captured at 'gen_head.in'.*generation"):
        cap.rows("gen_head.in")
    with pytest.raises(KeyError, match="'blocks.0.resid_post' was not captured"):
        cap.rows("blocks.0.resid_post")
    assert "gen_head.in" in cap and "blocks.0.resid_post" not in cap


# -- generation: steps and guidance branches --------------------------------------------------

GEN_PROMPTS = [{"input_ids": [1, 5, 6, 7, 4]}, {"input_ids": [1, 9, 4]}]  # 4 = boi
GUIDANCE = 2.0


@pytest.fixture(scope="module")
def janus_gen(janus: tuple) -> tuple:
    model, info = janus
    adapter = adapter_for(model)
    inputs = adapter.prepare(model, GEN_PROMPTS, mode="generation")
    points = "blocks.*.resid_post,final_norm,gen_head.in,gen_head.out"
    with capture(model, points, adapter=adapter, cfg_batch=len(GEN_PROMPTS), layout=inputs.layout) as cap:
        tokens = adapter.generate(model, inputs, guidance_scale=GUIDANCE)
    assert installed_hooks(model) == {}
    return model, info, adapter, inputs, cap, tokens


def test_generation_calls_are_prompt_pass_then_single_steps(janus_gen: tuple) -> None:
    _, info, _, inputs, cap, tokens = janus_gen
    n, prompt = info["num_gen_tokens"], inputs.kwargs["input_ids"].shape[1]
    assert tokens.shape == (2, n)
    assert cap.calls == [(0, 0, prompt)] + [(s, prompt + s - 1, 1) for s in range(1, n)]


def test_generation_rows_carry_steps_and_branches(janus_gen: tuple) -> None:
    _, info, _, inputs, cap, _ = janus_gen
    n, prompt, b = info["num_gen_tokens"], inputs.kwargs["input_ids"].shape[1], len(GEN_PROMPTS)
    rows = cap.rows("blocks.0.resid_post")
    assert len(rows) == 2 * b * prompt + 2 * b * (n - 1)
    assert sorted(set(rows.step.tolist())) == list(range(n))
    for s in range(n):
        at = cap.rows("blocks.0.resid_post", step=s)
        width = prompt if s == 0 else 1
        assert len(at) == 2 * b * width
        for branch, name in enumerate(("cond", "uncond")):
            part = cap.rows("blocks.0.resid_post", step=s, branch=name)
            assert len(part) == b * width
            assert set(part.branch.tolist()) == {branch}
            assert sorted(set(part.example.tolist())) == list(range(b))
            assert torch.equal(cap.rows("blocks.0.resid_post", step=s, branch=branch).values, part.values)
        if s:
            assert set(at.pos.tolist()) == {prompt + s - 1}


def test_generation_roles(janus_gen: tuple) -> None:
    _, _, _, inputs, cap, _ = janus_gen
    prompt = inputs.kwargs["input_ids"].shape[1]
    rows = cap.rows("final_norm")
    past = rows.pos >= prompt
    assert past.any()
    assert set(rows.role[past].tolist()) == {ROLE_ID["image_gen"]}
    # prompt positions keep the prompt layout on both branches (example 1 is left-padded)
    inside = ~past
    expected = inputs.layout.roles[rows.example[inside], rows.pos[inside]]
    assert torch.equal(rows.role[inside], expected)
    assert ROLE_ID["pad"] in rows.role[inside].tolist() and ROLE_ID["image_gen"] not in expected.tolist()


def test_gen_head_in_is_final_norm_at_the_last_position_of_each_call(janus_gen: tuple) -> None:
    _, info, _, inputs, cap, _ = janus_gen
    n, prompt, b = info["num_gen_tokens"], inputs.kwargs["input_ids"].shape[1], len(GEN_PROMPTS)
    head_in = cap.rows("gen_head.in")
    assert len(head_in) == n * 2 * b  # one row per call per (example, branch)
    normed = cap.rows("final_norm")
    for s in range(n):
        last = prompt + s - 1 if s else prompt - 1
        for branch in (0, 1):
            h = cap.rows("gen_head.in", step=s, branch=branch)
            assert h.pos.tolist() == [last] * b and h.example.tolist() == list(range(b))
            sel = (normed.step == s) & (normed.branch == branch) & (normed.pos == last)
            ref = normed.select(sel)
            assert ref.example.tolist() == list(range(b))
            torch.testing.assert_close(h.values, ref.values, rtol=0, atol=0)


def test_generated_tokens_are_argmax_of_guided_gen_head_logits(janus_gen: tuple) -> None:
    model, info, _, _, cap, tokens = janus_gen
    for s in range(info["num_gen_tokens"]):
        cond = cap.rows("gen_head.out", step=s, branch="cond")
        uncond = cap.rows("gen_head.out", step=s, branch="uncond")
        assert cond.values.shape == (len(GEN_PROMPTS), model.config.vq_config.num_embeddings)
        guided = uncond.values + GUIDANCE * (cond.values - uncond.values)
        assert torch.equal(guided.argmax(-1), tokens[:, s])
        # the head's output is the head applied to its captured input
        with torch.no_grad():
            head = model.model.generation_head(cap.rows("gen_head.in", step=s, branch="cond").values)
        torch.testing.assert_close(head, cond.values, rtol=0, atol=1e-6)


def test_generation_dense_joins_the_steps(janus_gen: tuple) -> None:
    _, info, _, inputs, cap, _ = janus_gen
    prompt = inputs.kwargs["input_ids"].shape[1]
    dense = cap["blocks.1.resid_post"]  # conditional branch
    assert dense.shape == (2, prompt + info["num_gen_tokens"] - 1, 32)
    assert not dense.isnan().any()


def test_capturing_does_not_change_generation(janus_gen: tuple) -> None:
    model, _, adapter, inputs, _, tokens = janus_gen
    assert torch.equal(adapter.generate(model, inputs, guidance_scale=GUIDANCE), tokens)


def test_generation_selecting_image_gen_role_keeps_only_generated_positions(janus_gen: tuple) -> None:
    model, info, adapter, inputs, full, _ = janus_gen
    prompt = inputs.kwargs["input_ids"].shape[1]
    with capture(
        model, "final_norm", adapter=adapter, cfg_batch=2, layout=inputs.layout, roles=["image_gen"]
    ) as cap:
        adapter.generate(model, inputs, guidance_scale=GUIDANCE)
    rows = cap.rows("final_norm")
    n = info["num_gen_tokens"]
    assert len(rows) == 2 * 2 * (n - 1)  # the prompt pass keeps nothing
    assert rows.step.min() == 1 and set(rows.role.tolist()) == {ROLE_ID["image_gen"]}
    assert set(rows.pos.tolist()) == set(range(prompt, prompt + n - 1))
    ref = full.rows("final_norm")
    ref = ref.select(ref.step > 0)
    torch.testing.assert_close(rows.values, ref.values, rtol=0, atol=0)
