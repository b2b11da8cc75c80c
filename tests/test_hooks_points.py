"""Tests for uniprobe.hooks.points (canonical names, globs, aliases, errors) and uniprobe.hooks.layout
(TokenLayout)."""

from __future__ import annotations

import json

import pytest
import torch
from uniprobe.hooks.layout import ROLE_ID, ROLES, TokenLayout, role_ids
from uniprobe.hooks.points import (
    UnknownHookPointError,
    block_points,
    canonical,
    expand,
    layer_of,
    to_transformer_lens,
)

# the points of a 4-block model with one family point, in execution order
AVAILABLE = ["embed", *block_points(4), "final_norm", "lm_head.in", "gen_head.in"]


# -- points ---------------------------------------------------------------------------------


def test_block_points_are_in_execution_order() -> None:
    assert block_points(2) == [
        "blocks.0.resid_pre",
        "blocks.0.attn_out",
        "blocks.0.mlp_out",
        "blocks.0.resid_post",
        "blocks.1.resid_pre",
        "blocks.1.attn_out",
        "blocks.1.mlp_out",
        "blocks.1.resid_post",
    ]


def test_glob_resolves_every_block_in_order() -> None:
    assert expand("blocks.*.resid_post", AVAILABLE) == [f"blocks.{i}.resid_post" for i in range(4)]
    assert expand("blocks.2.*", AVAILABLE) == [
        "blocks.2.resid_pre",
        "blocks.2.attn_out",
        "blocks.2.mlp_out",
        "blocks.2.resid_post",
    ]
    assert expand("*", AVAILABLE) == AVAILABLE


def test_comma_list_is_returned_in_execution_order_without_duplicates() -> None:
    got = expand(" lm_head.in, embed ,blocks.1.resid_post,blocks.*.resid_post,embed", AVAILABLE)
    assert got == [
        "embed",
        "blocks.0.resid_post",
        "blocks.1.resid_post",
        "blocks.2.resid_post",
        "blocks.3.resid_post",
        "lm_head.in",
    ]
    # a list of patterns behaves like the comma string
    assert expand(["final_norm", "blocks.3.mlp_out"], AVAILABLE) == ["blocks.3.mlp_out", "final_norm"]


@pytest.mark.parametrize(
    ("alias", "expected"),
    [
        ("blocks.1.hook_resid_post", ["blocks.1.resid_post"]),
        ("blocks.0.hook_resid_pre", ["blocks.0.resid_pre"]),
        ("blocks.3.hook_attn_out", ["blocks.3.attn_out"]),
        ("blocks.2.hook_mlp_out", ["blocks.2.mlp_out"]),
        ("blocks.*.hook_resid_post", [f"blocks.{i}.resid_post" for i in range(4)]),
        ("hook_embed", ["embed"]),
        ("embed.hook_out", ["embed"]),
        ("ln_final.hook_normalized", ["final_norm"]),
        ("ln_final.hook_out", ["final_norm"]),
        ("unembed.hook_in", ["lm_head.in"]),
    ],
)
def test_transformer_lens_aliases_resolve_to_canonical_names(alias: str, expected: list[str]) -> None:
    assert expand(alias, AVAILABLE) == expected


def test_aliases_and_canonical_names_mix_in_one_list() -> None:
    got = expand("ln_final.hook_normalized,hook_embed,blocks.1.hook_resid_post", AVAILABLE)
    assert got == ["embed", "blocks.1.resid_post", "final_norm"]


def test_canonical_passes_other_names_through() -> None:
    assert canonical("blocks.3.hook_resid_post") == "blocks.3.resid_post"
    assert canonical("queries") == "queries"
    assert canonical("blocks.3.resid_post") == "blocks.3.resid_post"


def test_out_of_range_block_error_says_how_many_blocks() -> None:
    with pytest.raises(UnknownHookPointError) as info:
        expand("blocks.40.resid_post", AVAILABLE)
    msg = str(info.value)
    assert "'blocks.40.resid_post'" in msg
    assert "model has 4 blocks" in msg
    assert "blocks.3.resid_post" in msg  # nearest valid point
    # KeyError normally quotes its message; this one stays readable
    assert not msg.startswith('"')


def test_out_of_range_alias_error() -> None:
    with pytest.raises(UnknownHookPointError, match="model has 4 blocks"):
        expand("blocks.4.hook_resid_post", AVAILABLE)


def test_misspelled_point_error_names_value_and_near_matches() -> None:
    with pytest.raises(UnknownHookPointError) as info:
        expand("final_nrm", AVAILABLE)
    msg = str(info.value)
    assert "'final_nrm'" in msg
    assert "nearest: final_norm" in msg
    assert "model has" not in msg  # not a block-range problem
    with pytest.raises(UnknownHookPointError) as info:
        expand("blocks.1.resid", AVAILABLE)
    assert "blocks.1.resid_pre" in str(info.value) and "blocks.1.resid_post" in str(info.value)


def test_error_lists_valid_kinds_and_is_a_key_error() -> None:
    with pytest.raises(KeyError) as info:  # UnknownHookPointError subclasses KeyError
        expand("embed,no_such_point", AVAILABLE)
    msg = str(info.value)
    assert "'no_such_point'" in msg
    for kind in ("blocks.*.resid_post", "embed", "final_norm", "lm_head.in", "gen_head.in"):
        assert kind in msg


def test_glob_matching_nothing_is_an_error() -> None:
    with pytest.raises(UnknownHookPointError, match="'blocks.\\*.resid'"):
        expand("blocks.*.resid", AVAILABLE)


def test_empty_request_is_an_error() -> None:
    with pytest.raises(UnknownHookPointError, match="no hook points requested"):
        expand(" , ", AVAILABLE)


@pytest.mark.parametrize(
    ("point", "tl_name"),
    [
        ("blocks.0.resid_pre", "blocks.0.hook_resid_pre"),
        ("blocks.7.resid_post", "blocks.7.hook_resid_post"),
        ("blocks.2.attn_out", "blocks.2.hook_attn_out"),
        ("blocks.2.mlp_out", "blocks.2.hook_mlp_out"),
        ("embed", "blocks.0.hook_resid_pre"),
        ("final_norm", "ln_final.hook_out"),
        ("lm_head.in", "unembed.hook_in"),
    ],
)
def test_to_transformer_lens(point: str, tl_name: str) -> None:
    assert to_transformer_lens(point) == tl_name
    # mapping back lands on the same point (embed is the same tensor as blocks.0.resid_pre)
    assert canonical(tl_name) in (point, "blocks.0.resid_pre")


@pytest.mark.parametrize("point", ["gen_head.in", "queries", "connector.out", "blocks.*.resid_post"])
def test_to_transformer_lens_refuses_points_it_cannot_map(point: str) -> None:
    with pytest.raises(KeyError, match="no TransformerLens counterpart"):
        to_transformer_lens(point)


def test_layer_of() -> None:
    assert layer_of("blocks.12.mlp_out") == 12
    assert layer_of("final_norm") is None
    assert layer_of("queries") is None


# -- layout ---------------------------------------------------------------------------------


def test_from_names_and_names_round_trip() -> None:
    layout = TokenLayout.from_names([["text", "image_und", "query"], ["text", "cot", "pad"]])
    assert layout.batch == 2 and layout.length == 3
    assert layout.roles.dtype == torch.long
    assert layout.roles.tolist() == [
        [ROLE_ID["text"], ROLE_ID["image_und"], ROLE_ID["query"]],
        [ROLE_ID["text"], ROLE_ID["cot"], ROLE_ID["pad"]],
    ]
    assert layout.names(1) == ["text", "cot", "pad"]
    assert layout.counts() == {"text": 2, "image_und": 1, "query": 1, "cot": 1, "image_gen": 0, "pad": 1}


def test_from_names_needs_equal_lengths() -> None:
    with pytest.raises(ValueError, match="same number of positions"):
        TokenLayout.from_names([["text"], ["text", "text"]])


def test_from_attention_mask_marks_pad() -> None:
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])
    layout = TokenLayout.from_attention_mask(mask)
    assert layout.names(0) == ["text", "text", "text", "pad"]
    assert layout.names(1) == ["pad", "text", "text", "text"]
    query = TokenLayout.from_attention_mask(mask, role="query")
    assert query.positions(0, "query") == [0, 1, 2]
    assert query.positions(1, "pad") == [0]


def test_roles_at_inside_the_layout() -> None:
    layout = TokenLayout.from_names([["text", "text", "pad"], ["text", "pad", "pad"]])
    assert torch.equal(layout.roles_at(1, 2), layout.roles[:, 1:3])


def test_roles_at_past_the_end_uses_tail_role() -> None:
    layout = TokenLayout.from_names([["text", "text"], ["pad", "text"]], tail_role="image_gen")
    got = layout.roles_at(1, 3)
    gen, text, pad = ROLE_ID["image_gen"], ROLE_ID["text"], ROLE_ID["pad"]
    assert got.tolist() == [[text, gen, gen], [text, gen, gen]]
    # entirely past the end: one generated token per step
    assert layout.roles_at(5, 1).tolist() == [[gen], [gen]]
    assert layout.roles_at(0, 2).tolist() == [[text, text], [pad, text]]


def test_roles_at_past_the_end_without_tail_role_raises() -> None:
    layout = TokenLayout.from_names([["text", "text"]])
    with pytest.raises(ValueError, match="past the layout's 2 positions.*tail_role"):
        layout.roles_at(1, 2)


def test_extend() -> None:
    layout = TokenLayout.from_names([["text", "pad"], ["text", "text"]])
    longer = layout.extend(2, "query")
    assert longer.length == 4
    assert longer.names(0) == ["text", "pad", "query", "query"]
    assert longer.tail_role is None
    assert layout.length == 2  # the original is untouched
    gen = TokenLayout.from_names([["text"]], tail_role="image_gen").extend(2)
    assert gen.names(0) == ["text", "image_gen", "image_gen"]
    assert gen.tail_role == "image_gen"
    with pytest.raises(ValueError, match="needs a role"):
        layout.extend(1)


def test_repeat_stacks_the_batch() -> None:
    layout = TokenLayout.from_names([["text", "query"], ["pad", "text"]], tail_role="image_gen")
    doubled = layout.repeat(2)
    assert doubled.batch == 4
    assert torch.equal(doubled.roles[:2], layout.roles) and torch.equal(doubled.roles[2:], layout.roles)
    assert doubled.tail_role == "image_gen"


def test_mask_and_positions() -> None:
    layout = TokenLayout.from_names(
        [["text", "query", "query", "pad"], ["cot", "text", "query", "image_gen"]]
    )
    assert layout.mask("query").tolist() == [[False, True, True, False], [False, False, True, False]]
    assert layout.mask(["text", "cot"]).tolist() == [[True, False, False, False], [True, True, False, False]]
    assert layout.positions(0, "query") == [1, 2]
    assert layout.positions(1, ["query", "image_gen"]) == [2, 3]
    assert layout.positions(0, "image_und") == []


def test_json_round_trip() -> None:
    layout = TokenLayout.from_names(
        [["text", "image_und", "pad"], ["query", "cot", "image_gen"]], tail_role="image_gen"
    )
    data = json.loads(json.dumps(layout.to_json()))
    assert data["role_names"] == list(ROLES)
    back = TokenLayout.from_json(data)
    assert torch.equal(back.roles, layout.roles)
    assert back.tail_role == "image_gen"


def test_from_json_refuses_other_role_names() -> None:
    data = TokenLayout.from_names([["text"]]).to_json()
    data["role_names"] = ["text", "image"]
    with pytest.raises(ValueError, match="written with roles"):
        TokenLayout.from_json(data)


def test_unknown_role_errors_name_the_role_and_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="unknown role 'image'.*text, image_und, query, cot, image_gen, pad"):
        role_ids(["text", "image"])
    layout = TokenLayout.from_names([["text"]])
    for bad in (
        lambda: TokenLayout.from_names([["text", "imgae_gen"]]),
        lambda: layout.mask("querry"),
        lambda: layout.positions(0, ["text", "querry"]),
        lambda: TokenLayout(torch.zeros(1, 2, dtype=torch.long), tail_role="gen"),
        lambda: TokenLayout.uniform(1, 2, role="txt"),
        lambda: TokenLayout.from_attention_mask(torch.ones(1, 2), role="txt"),
        lambda: layout.extend(1, "querry"),
    ):
        with pytest.raises(ValueError, match="unknown role .*valid roles are"):
            bad()


def test_bad_roles_tensor_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"\[batch, pos\]"):
        TokenLayout(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="entries must be in"):
        TokenLayout(torch.tensor([[0, len(ROLES)]]))
