"""Tests for uniprobe.hooks.adapters: picking an adapter, family layouts, the declarative query adapter,
and the Emu3 / Chameleon greedy image-token generation."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from uniprobe.experiments.tiny import TINY_BUILDERS, build_tiny
from uniprobe.hooks.adapters import (
    ADAPTERS,
    Adapter,
    NoAdapterError,
    adapter_for,
    load_adapter_file,
    query_adapter,
    register_adapter,
    supported,
)
from uniprobe.hooks.adapters.query import TINY_QUERY
from uniprobe.hooks.adapters.unified_vocab import image_token_ids
from uniprobe.hooks.capture import capture
from uniprobe.hooks.layout import ROLE_ID

EXPECTED_ADAPTER = {
    "tiny-llama": "causal_lm",
    "tiny-qwen2": "causal_lm",
    "tiny-janus": "janus",
    "tiny-emu3": "emu3",
    "tiny-chameleon": "chameleon",
    "tiny-query": "tiny-query",
    "tiny-glm-image": "glm_image",
    "tiny-diffusion-query": "tiny-diffusion-query",
}

QUERY_SPEC = {
    "name": "my-metaquery",
    "model_classes": ["MyMetaQuery"],
    "blocks": "lm.model.layers",
    "final_norm": "lm.model.norm",
    "lm_head": "lm.lm_head",
    "queries": "queries",
    "connector": "connector",
    "decoder": "decoder",
    "lm": "lm",
    "embed_method": "embed_inputs",
}


@pytest.fixture(scope="module")
def tiny() -> dict[str, tuple[nn.Module, dict]]:
    return {name: build_tiny(name) for name in TINY_BUILDERS}


# -- picking an adapter -----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(EXPECTED_ADAPTER))
def test_adapter_for_picks_the_family(tiny: dict, name: str) -> None:
    model, _ = tiny[name]
    adapter = adapter_for(model)
    assert adapter.name == EXPECTED_ADAPTER[name]
    assert type(model).__name__ in adapter.model_classes
    points = adapter.points(model)
    assert points[0] == "embed" and "blocks.1.resid_post" in points and "final_norm" in points
    # every point's module exists
    for p in points:
        site = adapter.site(model, p)
        assert isinstance(model.get_submodule(site.module), nn.Module)


def test_family_points(tiny: dict) -> None:
    janus = adapter_for(tiny["tiny-janus"][0]).points(tiny["tiny-janus"][0])
    assert janus[-2:] == ["gen_head.in", "gen_head.out"]
    query = adapter_for(tiny["tiny-query"][0]).points(tiny["tiny-query"][0])
    assert query[-3:] == ["queries", "connector.out", "decoder.out"]
    llama = adapter_for(tiny["tiny-llama"][0]).points(tiny["tiny-llama"][0])
    assert not {"gen_head.in", "queries"} & set(llama)


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16, bos_token_id=1, eos_token_id=2
    )
    return GPT2LMHeadModel(cfg)


@pytest.mark.parametrize("make", [lambda: nn.Linear(3, 3), _gpt2], ids=["linear", "gpt2"])
def test_unknown_model_class_raises_with_supported_families_and_how_to(make: Callable[[], nn.Module]) -> None:
    model = make()
    with pytest.raises(NoAdapterError) as info:
        adapter_for(model)
    msg = str(info.value)
    assert f"no adapter for model class {type(model).__name__!r}" in msg
    for family, classes in supported().items():
        assert family in msg
        for cls in classes:
            assert cls in msg
    assert "JanusForConditionalGeneration" in msg and "Emu3ForConditionalGeneration" in msg
    assert "write an adapter" in msg and "register_adapter" in msg and "load_adapter_file" in msg
    assert isinstance(info.value, TypeError)


def test_capture_on_an_unadapted_model_raises_no_adapter_error() -> None:
    with pytest.raises(NoAdapterError):
        capture(nn.Linear(3, 3), "embed")


def test_model_may_declare_its_adapter(tiny: dict) -> None:
    model = nn.Linear(3, 3)
    model.uniprobe_adapter = "janus"
    assert adapter_for(model) is ADAPTERS["janus"]
    model.uniprobe_adapter = TINY_QUERY
    assert adapter_for(model) is TINY_QUERY
    model.uniprobe_adapter = "no-such-adapter"
    with pytest.raises(NoAdapterError, match="'no-such-adapter', which is not registered"):
        adapter_for(model)


def test_register_adapter_makes_a_class_findable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("uniprobe.hooks.adapters.ADAPTERS", dict(ADAPTERS))  # keep the registry clean
    from uniprobe.hooks import adapters

    class MyNet(nn.Module):
        pass

    mine = Adapter(name="mine", model_classes=("MyNet",), blocks="layers", final_norm="norm", lm_head="head")
    assert register_adapter(mine) is mine
    assert adapter_for(MyNet()) is mine
    assert "mine" in adapters.supported()


# -- layouts of the families ------------------------------------------------------------------


def test_causal_lm_layout_is_text_and_pad(tiny: dict) -> None:
    model, _ = tiny["tiny-qwen2"]
    inputs = adapter_for(model).prepare(model, [{"input_ids": [1, 5, 6]}, {"input_ids": [1, 7]}])
    assert inputs.kwargs["input_ids"].tolist() == [[1, 5, 6], [1, 7, 0]]
    assert inputs.layout.names(1) == ["text", "text", "pad"]


def test_janus_understanding_marks_image_positions(tiny: dict) -> None:
    model, info = tiny["tiny-janus"]
    adapter = adapter_for(model)
    img = info["image_token_id"]
    n_img = info["num_image_tokens"]
    examples = [
        {"input_ids": [1, 5, *[img] * n_img, 6, 7], "pixel_values": torch.randn(3, 32, 32)},
        {"input_ids": [1, *[img] * n_img, 8], "pixel_values": torch.randn(3, 32, 32)},
    ]
    inputs = adapter.prepare(model, examples)
    assert inputs.kwargs["pixel_values"].shape == (2, 3, 32, 32)
    assert inputs.layout.positions(0, "image_und") == [2, 3, 4, 5]
    assert inputs.layout.positions(1, "image_und") == [1, 2, 3, 4]
    assert inputs.layout.names(1)[5:] == ["text", "pad", "pad"]
    with (
        torch.no_grad(),
        capture(model, "embed,final_norm", adapter=adapter, layout=inputs.layout, roles=["image_und"]) as cap,
    ):
        adapter.run(model, inputs)
    rows = cap.rows("embed")
    assert len(rows) == 2 * n_img and set(rows.role.tolist()) == {ROLE_ID["image_und"]}
    # the image positions carry the aligned SigLIP features, not the placeholder's embedding
    with torch.no_grad():
        feats = model.model.get_image_features(inputs.kwargs["pixel_values"]).pooler_output
        placeholder = model.get_input_embeddings()(torch.tensor([img]))
    torch.testing.assert_close(rows.values, feats.reshape(-1, feats.shape[-1]), rtol=0, atol=1e-6)
    assert (rows.values - placeholder).abs().max() > 1e-3


def test_janus_generation_layout_is_left_padded_and_open_ended(tiny: dict) -> None:
    model, info = tiny["tiny-janus"]
    inputs = adapter_for(model).prepare(
        model, [{"input_ids": [1, 5, 4]}, {"input_ids": [1, 4]}], mode="generation"
    )
    assert inputs.kwargs["input_ids"].tolist() == [[1, 5, 4], [0, 1, 4]]
    assert inputs.layout.names(1) == ["pad", "text", "text"]
    assert inputs.layout.tail_role == "image_gen"
    assert "pixel_values" not in inputs.kwargs


@pytest.mark.parametrize("name", ["tiny-emu3", "tiny-chameleon"])
def test_unified_vocab_roles_by_mode(tiny: dict, name: str) -> None:
    model, info = tiny[name]
    adapter = adapter_for(model)
    a, b = info["image_token_ids"][:2]
    examples = [{"input_ids": [1, 5, a, b, a, 6]}, {"input_ids": [1, b, 7]}]
    und = adapter.prepare(model, examples, mode="understanding")
    assert und.kwargs["input_ids"][1].tolist() == [1, b, 7, 0, 0, 0]  # right-padded
    assert und.layout.names(0) == ["text", "text", "image_und", "image_und", "image_und", "text"]
    assert und.layout.names(1) == ["text", "image_und", "text", "pad", "pad", "pad"]
    gen = adapter.prepare(model, examples, mode="generation")
    assert gen.kwargs["input_ids"][1].tolist() == [0, 0, 0, 1, b, 7]  # left-padded
    assert gen.layout.names(0) == ["text", "text", "image_gen", "image_gen", "image_gen", "text"]
    assert gen.layout.names(1) == ["pad", "pad", "pad", "text", "image_gen", "text"]
    assert gen.layout.tail_role == "image_gen"
    # understanding runs through the model's own forward with the image tokens in the stream
    with (
        torch.no_grad(),
        capture(model, "blocks.1.resid_post", adapter=adapter, layout=und.layout, roles=["image_und"]) as cap,
    ):
        adapter.run(model, und)
    assert cap.rows("blocks.1.resid_post").pos.tolist() == [2, 3, 4, 1]


def test_unified_vocab_image_token_ids(tiny: dict) -> None:
    emu3, info = tiny["tiny-emu3"]
    assert image_token_ids(emu3) == [*info["image_token_ids"], info["eol_token_id"]]
    chameleon, info = tiny["tiny-chameleon"]
    assert sorted(image_token_ids(chameleon)) == info["image_token_ids"]


def test_example_may_override_roles(tiny: dict) -> None:
    model, _ = tiny["tiny-llama"]
    adapter = adapter_for(model)
    inputs = adapter.prepare(
        model, [{"input_ids": [1, 5, 6, 7], "roles": ["text", "cot", "cot", "text"]}, {"input_ids": [1, 5]}]
    )
    assert inputs.layout.names(0) == ["text", "cot", "cot", "text"]
    assert inputs.layout.names(1) == ["text", "text", "pad", "pad"]
    with pytest.raises(ValueError, match="example 0: 'roles' has 2 entries but the example has 4 tokens"):
        adapter.prepare(model, [{"input_ids": [1, 5, 6, 7], "roles": ["text", "cot"]}])


def test_prepare_errors(tiny: dict) -> None:
    model, _ = tiny["tiny-llama"]
    adapter = adapter_for(model)
    with pytest.raises(ValueError, match="empty batch"):
        adapter.prepare(model, [])
    with pytest.raises(KeyError, match="example 1 has no 'input_ids'"):
        adapter.prepare(model, [{"input_ids": [1]}, {"ids": [1]}])


# -- Emu3 / Chameleon greedy generation -------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny-emu3", "tiny-chameleon"])
def test_unified_vocab_generate_emits_only_image_tokens(tiny: dict, name: str) -> None:
    model, info = tiny[name]
    adapter = adapter_for(model)
    boi = info["boi_token_id"]
    prompts = [{"input_ids": [1, 5, 6, 7, boi]}, {"input_ids": [1, 9, boi]}, {"input_ids": [1, 11, 12, boi]}]
    inputs = adapter.prepare(model, prompts, mode="generation")
    height, width = 2, 3
    tokens = adapter.generate(model, inputs, height=height, width=width)
    visual = set(info["image_token_ids"])
    if name == "tiny-emu3":
        eol = info["eol_token_id"]
        assert tokens.shape == (3, height * (width + 1))
        grid = tokens.view(3, height, width + 1)
        assert (grid[:, :, -1] == eol).all()  # an end-of-line closes every row, and only there
        assert set(grid[:, :, :-1].flatten().tolist()) <= visual
    else:
        assert tokens.shape == (3, height * width)
        assert set(tokens.flatten().tolist()) <= visual
    # batched left-padded generation equals generating each prompt alone
    for i, prompt in enumerate(prompts):
        alone = adapter.generate(
            model, adapter.prepare(model, [prompt], mode="generation"), height=height, width=width
        )
        assert torch.equal(alone[0], tokens[i]), (name, i)


@pytest.mark.parametrize("name", ["tiny-emu3", "tiny-chameleon"])
def test_unified_vocab_generate_is_greedy_over_image_logits(tiny: dict, name: str) -> None:
    model, info = tiny[name]
    adapter = adapter_for(model)
    prompt = [1, 5, 6, info["boi_token_id"]]
    inputs = adapter.prepare(model, [{"input_ids": prompt}], mode="generation")
    tokens = adapter.generate(model, inputs, height=1, width=2)
    visual = torch.tensor(info["image_token_ids"])
    # replay without a cache: each token is the argmax of the unembedding restricted to image ids
    seq = list(prompt)
    with torch.no_grad():
        for tok in tokens[0].tolist():
            if name == "tiny-emu3" and tok == info["eol_token_id"]:
                seq.append(tok)
                continue
            backbone = model.model.text_model if name == "tiny-emu3" else model.model
            hidden = backbone(input_ids=torch.tensor([seq])).last_hidden_state[:, -1]
            logits = model.lm_head(hidden)[0, visual]
            assert tok == int(visual[logits.argmax()])
            seq.append(tok)


def test_generation_capture_through_unified_vocab_tags_steps(tiny: dict) -> None:
    model, info = tiny["tiny-emu3"]
    adapter = adapter_for(model)
    inputs = adapter.prepare(model, [{"input_ids": [1, 5, info["boi_token_id"]]}], mode="generation")
    with capture(model, "final_norm", adapter=adapter, layout=inputs.layout) as cap:
        tokens = adapter.generate(model, inputs, height=1, width=2)
    n = tokens.shape[1]
    assert [c[0] for c in cap.calls] == list(range(n))
    rows = cap.rows("final_norm")
    gen = rows.select(rows.step > 0)
    assert gen.pos.tolist() == list(range(3, 3 + n - 1))
    assert set(gen.role.tolist()) == {ROLE_ID["image_gen"]}


# -- query adapter ----------------------------------------------------------------------------


def test_query_adapter_roles_and_points(tiny: dict) -> None:
    model, info = tiny["tiny-query"]
    n_q = info["n_queries"]
    adapter = adapter_for(model)
    inputs = adapter.prepare(model, [{"input_ids": [1, 5, 6, 7]}, {"input_ids": [1, 8]}])
    layout = inputs.layout
    assert layout.length == 4 + n_q
    for e in range(2):
        assert layout.positions(e, "query") == list(range(4, 4 + n_q))
    assert layout.names(1)[:4] == ["pad", "pad", "text", "text"]  # left-padded prompt
    points = "final_norm,queries,connector.out,decoder.out"
    with torch.no_grad(), capture(model, points, adapter=adapter, layout=layout, roles=["query"]) as cap:
        text_logits, image_logits = adapter.run(model, inputs)
    # independent reference: the backbone's last hidden states through the connector
    with torch.no_grad():
        embeds = model.embed_inputs(inputs.kwargs["input_ids"])
        mask = torch.cat([inputs.kwargs["attention_mask"], torch.ones(2, n_q, dtype=torch.long)], dim=1)
        hidden = model.lm.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        conn = model.connector(hidden[:, -n_q:])
    assert text_logits.shape[1] == 4 + n_q
    queries = cap["queries"]
    assert queries.shape == (2, n_q, 32)
    torch.testing.assert_close(queries, hidden[:, -n_q:], rtol=0, atol=1e-6)
    torch.testing.assert_close(cap["connector.out"], conn, rtol=0, atol=1e-6)
    torch.testing.assert_close(cap["decoder.out"], image_logits, rtol=0, atol=0)
    # the query role selects the same positions from the residual stream
    torch.testing.assert_close(cap["final_norm"], queries, rtol=0, atol=0)
    rows = cap.rows("queries")
    assert set(rows.role.tolist()) == {ROLE_ID["query"]}
    assert rows.pos.tolist() == [4, 5, 6, 7] * 2


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({k: v for k, v in QUERY_SPEC.items() if k != "connector"}, r"missing keys \['connector'\]"),
        ({k: v for k, v in QUERY_SPEC.items() if k not in ("blocks", "queries")}, r"\['blocks', 'queries'\]"),
        ({**QUERY_SPEC, "conector": "connector"}, r"unknown keys \['conector'\]"),
    ],
)
def test_query_adapter_spec_errors(spec: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        query_adapter(spec)
    assert "required: blocks, final_norm, lm_head, queries, connector" in str(info.value)
    assert "optional:" in str(info.value)


def _query_capture(model: nn.Module, adapter: Adapter) -> dict[str, torch.Tensor]:
    inputs = adapter.prepare(model, [{"input_ids": [1, 5, 6]}, {"input_ids": [1, 7, 8]}])
    with torch.no_grad(), capture(model, "blocks.*.resid_post,queries,connector.out", adapter=adapter) as cap:
        adapter.run(model, inputs)
    return {p: cap[p] for p in cap.points}


@pytest.mark.parametrize("suffix", [".json", ".yaml", ".yml"])
def test_load_adapter_file_builds_a_working_adapter(tiny: dict, tmp_path: Path, suffix: str) -> None:
    model, _ = tiny["tiny-query"]
    path = tmp_path / f"adapter{suffix}"
    path.write_text(json.dumps(QUERY_SPEC) if suffix == ".json" else yaml.safe_dump(QUERY_SPEC))
    adapter = load_adapter_file(path)
    assert adapter.name == "my-metaquery" and adapter.model_classes == ("MyMetaQuery",)
    assert adapter.points(model) == TINY_QUERY.points(model)
    got, ref = _query_capture(model, adapter), _query_capture(model, TINY_QUERY)
    assert list(got) == list(ref)
    for p in ref:
        torch.testing.assert_close(got[p], ref[p], rtol=0, atol=0)


def test_load_adapter_file_errors(tmp_path: Path) -> None:
    path = tmp_path / "adapter.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="adapter.yaml: an adapter spec must be a mapping"):
        load_adapter_file(path)
    path = tmp_path / "adapter.json"
    path.write_text(json.dumps({"blocks": "lm.model.layers"}))
    with pytest.raises(ValueError, match="missing keys"):
        load_adapter_file(path)


def test_bad_module_path_in_spec_names_the_missing_part(tiny: dict) -> None:
    model, _ = tiny["tiny-query"]
    adapter = query_adapter({**QUERY_SPEC, "connector": "bridge"})
    with pytest.raises(AttributeError, match="'bridge'.*children: lm, connector, decoder"):
        with capture(model, "queries", adapter=adapter):
            pass
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# -- run_capture(generate=True): the adapter's generation under capture ------------------------


def test_run_capture_generate_tags_guidance_branches_for_janus(tiny: dict) -> None:
    from uniprobe.hooks.backends import run_capture

    model, info = tiny["tiny-janus"]
    adapter = adapter_for(model)
    inputs = adapter.prepare(model, [{"input_ids": [1, 5, 6, 4]}, {"input_ids": [1, 4]}], mode="generation")
    cap = run_capture(model, inputs, "gen_head.in,gen_head.out", generate=True)
    assert torch.equal(cap.generated, adapter.generate(model, inputs))
    n = info["num_gen_tokens"]
    rows = cap.rows("gen_head.out")
    assert len(rows) == n * 2 * 2
    assert set(rows.branch.tolist()) == {0, 1} and sorted(set(rows.step.tolist())) == list(range(n))
    for s in range(n):  # default guidance scale 2
        cond, uncond = (cap.rows("gen_head.out", step=s, branch=b).values for b in ("cond", "uncond"))
        assert torch.equal((uncond + 2.0 * (cond - uncond)).argmax(-1), cap.generated[:, s])


def test_run_capture_generate_without_guidance_for_emu3(tiny: dict) -> None:
    from uniprobe.hooks.backends import run_capture

    model, info = tiny["tiny-emu3"]
    adapter = adapter_for(model)
    inputs = adapter.prepare(model, [{"input_ids": [1, 5, info["boi_token_id"]]}], mode="generation")
    cap = run_capture(model, inputs, "final_norm", generate=True, roles=["image_gen"])
    assert torch.equal(cap.generated, adapter.generate(model, inputs))
    rows = cap.rows("final_norm")
    n = cap.generated.shape[1]
    assert set(rows.branch.tolist()) == {0}  # no guidance: one branch
    # the prompt holds no image tokens: the rows are the n-1 generated tokens fed back
    assert rows.step.tolist() == list(range(1, n)) and rows.pos.tolist() == list(range(3, 3 + n - 1))


def test_run_capture_generate_errors(tiny: dict) -> None:
    from uniprobe.hooks.backends import run_capture

    model, info = tiny["tiny-janus"]
    adapter = adapter_for(model)
    inputs = adapter.prepare(model, [{"input_ids": [1, 4]}], mode="generation")
    with pytest.raises(ValueError, match="needs backend='torch'"):
        run_capture(model, inputs, "final_norm", generate=True, backend="nnsight")
    llama, _ = tiny["tiny-llama"]
    text = adapter_for(llama).prepare(llama, [{"input_ids": [1, 5]}])
    with pytest.raises(ValueError, match="'causal_lm' adapter has no image generation"):
        run_capture(llama, text, "final_norm", generate=True)
