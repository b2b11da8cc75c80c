"""Tests for uniprobe.hooks.backends: torch hooks, nnsight and TransformerLens read the same tensors under
the same names, select roles the same way, and refuse clearly what they cannot serve."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from uniprobe.experiments.tiny import build_tiny
from uniprobe.hooks.adapters import ModelInputs, adapter_for
from uniprobe.hooks.backends import BACKENDS, available, run_capture
from uniprobe.hooks.capture import Captured
from uniprobe.hooks.layout import ROLE_ID

POINTS = "embed,blocks.*.*,final_norm,lm_head.in"
ATOL = 1e-5


def _examples(name: str, info: dict) -> list[dict[str, Any]]:
    """A batch per family; prompts of unequal length where padding leaves no fully masked row."""
    if name == "tiny-janus":
        img = [info["image_token_id"]] * info["num_image_tokens"]
        g = torch.Generator().manual_seed(0)
        return [
            {"input_ids": [1, 5, *img, 6, 7], "pixel_values": torch.randn(3, 32, 32, generator=g)},
            {"input_ids": [1, *img, 8], "pixel_values": torch.randn(3, 32, 32, generator=g)},
        ]
    if name in ("tiny-emu3", "tiny-chameleon"):
        a, b = info["image_token_ids"][:2]
        return [{"input_ids": [1, 5, a, b, 6]}, {"input_ids": [1, b, 7]}]
    if name == "tiny-query":  # left-padded prompts: keep them equal so no row is fully masked
        return [{"input_ids": [1, 5, 6, 7]}, {"input_ids": [1, 9, 10, 11]}]
    return [{"input_ids": [1, 5, 6, 7, 8]}, {"input_ids": [1, 9, 10]}]


class Family:
    """One tiny model, its adapter and prepared batch, and one capture per backend."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.model, self.info = build_tiny(name)
        self.adapter = adapter_for(self.model)
        self.inputs: ModelInputs = self.adapter.prepare(self.model, _examples(name, self.info))
        self._runs: dict[str, Captured] = {}

    def run(self, backend: str) -> Captured:
        if backend not in self._runs:
            self._runs[backend] = run_capture(self.model, self.inputs, POINTS, backend=backend)
        return self._runs[backend]


@pytest.fixture(scope="module")
def family() -> Callable[[str], Family]:
    cache: dict[str, Family] = {}

    def get(name: str) -> Family:
        if name not in cache:
            cache[name] = Family(name)
            # torch first, on the untouched model (booting a bridge wraps the model's modules)
            cache[name].run("torch")
        return cache[name]

    return get


def test_all_backends_available() -> None:
    assert BACKENDS == ("torch", "nnsight", "transformer_lens")
    assert all(available(b) for b in BACKENDS)
    assert not available("jax")


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-emu3", "tiny-janus", "tiny-query"])
@pytest.mark.parametrize("backend", ["nnsight", "transformer_lens"])
def test_backends_agree_on_every_point(family: Callable, name: str, backend: str) -> None:
    fam = family(name)
    ref, got = fam.run("torch"), fam.run(backend)
    assert got.points == ref.points
    assert got.calls == ref.calls == [(0, 0, fam.inputs.layout.length)]
    n_layers = fam.adapter.n_layers(fam.model)
    assert len(ref.points) == 3 + 4 * n_layers
    shape = (*fam.inputs.kwargs["input_ids"].shape, 32)
    if name == "tiny-query":  # the backbone also sees the query tokens
        shape = (2, shape[1] + fam.info["n_queries"], 32)
    for p in ref.points:
        assert ref[p].shape == shape, p
        assert ref[p].abs().max() > 0, p
        torch.testing.assert_close(
            got[p], ref[p], rtol=0, atol=ATOL, msg=lambda m, p=p: f"{backend} {p}: {m}"
        )
        r, g = ref.rows(p), got.rows(p)
        assert torch.equal(r.example, g.example) and torch.equal(r.pos, g.pos) and torch.equal(r.role, g.role)


def test_janus_understanding_feeds_image_features_through_every_backend(family: Callable) -> None:
    fam = family("tiny-janus")
    img = fam.inputs.layout.mask("image_und")
    assert int(img.sum()) == 8
    with torch.no_grad():
        feats = fam.model.model.get_image_features(fam.inputs.kwargs["pixel_values"]).pooler_output
    for backend in BACKENDS:
        embed = fam.run(backend)["embed"]
        torch.testing.assert_close(embed[img], feats.reshape(-1, 32), rtol=0, atol=ATOL)


@pytest.mark.parametrize(
    ("name", "roles"),
    [
        ("tiny-llama", ["text"]),
        ("tiny-emu3", ["image_und"]),
        ("tiny-janus", ["image_und"]),
        ("tiny-query", ["query"]),
        ("tiny-query", ["text", "query"]),
    ],
)
def test_role_selection_is_identical_through_all_backends(
    family: Callable, name: str, roles: list[str]
) -> None:
    fam = family(name)
    # left-padded query prompts of unequal length: the pad rows are excluded by the selection
    inputs = fam.inputs
    if name == "tiny-query":
        inputs = fam.adapter.prepare(fam.model, [{"input_ids": [1, 5, 6, 7]}, {"input_ids": [1, 9]}])
    points = "blocks.*.resid_post,final_norm"
    caps = {b: run_capture(fam.model, inputs, points, backend=b, roles=roles) for b in BACKENDS}
    expected = inputs.layout.mask(roles)
    for p in caps["torch"].points:
        ref = caps["torch"].rows(p)
        assert len(ref) == int(expected.sum()) > 0
        assert expected[ref.example, ref.pos].all()
        for b in ("nnsight", "transformer_lens"):
            got = caps[b].rows(p)
            for col, value in ref.index_tensors().items():
                assert torch.equal(getattr(got, col), value), (b, p, col)
            torch.testing.assert_close(got.values, ref.values, rtol=0, atol=ATOL)


def test_positions_and_dtype_through_all_backends(family: Callable) -> None:
    fam = family("tiny-qwen2")
    caps = {
        b: run_capture(
            fam.model, fam.inputs, "blocks.1.resid_post", backend=b, positions=[1, 3], dtype=torch.float16
        )
        for b in BACKENDS
    }
    ref = caps["torch"].rows("blocks.1.resid_post")
    assert ref.values.dtype == torch.float16
    assert ref.pos.tolist() == [1, 3, 1, 3] and ref.example.tolist() == [0, 0, 1, 1]
    for b in ("nnsight", "transformer_lens"):
        got = caps[b].rows("blocks.1.resid_post")
        assert got.values.dtype == torch.float16
        assert torch.equal(got.pos, ref.pos) and torch.equal(got.example, ref.example)
        torch.testing.assert_close(got.values, ref.values, rtol=0, atol=1e-3)


@pytest.mark.parametrize("roles", [None, ["query"]])
def test_family_points_through_nnsight(family: Callable, roles: list[str] | None) -> None:
    fam = family("tiny-query")
    n_q, length = fam.info["n_queries"], fam.inputs.layout.length
    points = "queries,connector.out,decoder.out"
    ref = run_capture(fam.model, fam.inputs, points, backend="torch", roles=roles)
    got = run_capture(fam.model, fam.inputs, points, backend="nnsight", roles=roles)
    for p in ref.points:
        assert ref[p].shape[:2] == (2, n_q)
        torch.testing.assert_close(got[p], ref[p], rtol=0, atol=ATOL)
        # these points see only the query tokens: the last n_q positions, role "query"
        r, g = ref.rows(p), got.rows(p)
        assert r.pos.tolist() == list(range(length - n_q, length)) * 2
        assert set(r.role.tolist()) == {ROLE_ID["query"]}
        for col, value in r.index_tensors().items():
            assert torch.equal(getattr(g, col), value), (p, col)


def test_chameleon_through_transformer_lens_is_refused(family: Callable) -> None:
    fam = family("tiny-chameleon")
    with pytest.raises(ValueError, match="'chameleon' adapter has no TransformerLens view.*backend='torch'"):
        run_capture(fam.model, fam.inputs, "blocks.0.resid_post", backend="transformer_lens")
    # the other two backends serve it and agree
    ref = fam.run("torch")
    got = fam.run("nnsight")
    for p in ref.points:
        torch.testing.assert_close(got[p], ref[p], rtol=0, atol=ATOL)


@pytest.mark.parametrize(("name", "point"), [("tiny-janus", "gen_head.in"), ("tiny-query", "queries")])
def test_family_point_through_transformer_lens_is_refused(family: Callable, name: str, point: str) -> None:
    fam = family(name)
    with pytest.raises(ValueError, match=f"hook point '{point}' is outside the TransformerLens view"):
        run_capture(fam.model, fam.inputs, f"final_norm,{point}", backend="transformer_lens")


def test_unknown_backend_and_unknown_point(family: Callable) -> None:
    fam = family("tiny-llama")
    with pytest.raises(
        ValueError, match="unknown backend 'jax'; choose one of torch, nnsight, transformer_lens"
    ):
        run_capture(fam.model, fam.inputs, "final_norm", backend="jax")
    for backend in BACKENDS:
        with pytest.raises(KeyError, match="model has 2 blocks"):
            run_capture(fam.model, fam.inputs, "blocks.5.resid_post", backend=backend)
