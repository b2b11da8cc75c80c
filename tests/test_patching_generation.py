"""Across the understanding → generation boundary: explicit alignments (role, anchors, ends, maps)
that refuse ambiguity; understanding-run states patched into a teacher-forced Janus image run
(batched = one forward per site); patches at chosen steps of free generation; judged generation;
query-model patching of query tokens and the connector output."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from uniprobe.experiments.tiny import tiny_janus, tiny_query
from uniprobe.hooks.adapters import adapter_for
from uniprobe.hooks.capture import capture
from uniprobe.hooks.layout import TokenLayout
from uniprobe.probes.patching import (
    KLToClean,
    SequenceLogProb,
    StepPatch,
    align_by_anchors,
    align_by_role,
    align_end,
    alignment,
    collect_states,
    generation_effect,
    janus_image_forward,
    janus_teacher_forced,
    patch_across,
    patch_sweep,
    patched_generation,
    query_sites,
    run_sites_reference,
    step_patches,
)
from uniprobe.probes.patching.metrics import GridLogProb, second_output

GUIDE = {"guidance_scale": 2.0}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def janus() -> tuple[Any, Any, dict]:
    model, info = tiny_janus()
    return model, adapter_for(model), info


# -- alignments ------------------------------------------------------------------------------------


def test_align_by_role_pairs_in_order_and_refuses_count_mismatch() -> None:
    src = TokenLayout.from_names([["text", "query", "query", "text"]])
    tgt = TokenLayout.from_names([["text", "text", "query", "query", "image_gen"]])
    al = align_by_role(src, tgt, "query")
    assert al.pairs == [(2, 1), (3, 2)] and al.labels == ["query0", "query1"]
    with pytest.raises(
        ValueError, match="cannot align role 'query': 2 positions in the source run, 1 in the target"
    ):
        align_by_role(src, TokenLayout.from_names([["text", "text", "query"]]), ["query", "text"])
    with pytest.raises(ValueError, match="role 'image_gen': 0 positions in the source run, 1 in the target"):
        align_by_role(src, tgt, "image_gen")


def test_align_by_anchors_refuses_ambiguous_and_missing_anchors() -> None:
    al = align_by_anchors([1, 7, 8, 9, 4], [1, 2, 7, 8, 3, 9, 4], [7, (8,), (9, 4)], names=["a", "b", "c"])
    assert al.pairs == [(2, 1), (3, 2), (5, 3), (6, 4)]
    assert al.labels == ["a", "b", "c[0]", "c[1]"]
    with pytest.raises(
        ValueError,
        match=r"anchor '7' is ambiguous: found 2 times in the target prompt \(positions \[1, 3\]\)",
    ):
        align_by_anchors([1, 7], [1, 7, 2, 7], [7])
    with pytest.raises(ValueError, match="anchor '5' is missing from the source prompt"):
        align_by_anchors([1, 7], [1, 5], [5])


def test_explicit_and_end_alignments_are_checked() -> None:
    assert align_end(5, 3).pairs == [(0, 2), (1, 3), (2, 4)]
    assert align_end(3, 5, n=2).pairs == [(3, 1), (4, 2)]
    with pytest.raises(ValueError, match="mapped more than once"):
        alignment([(1, 0), (1, 2)], 4, 4)
    with pytest.raises(ValueError, match="source position 9 is outside the source run"):
        alignment([(1, 9)], 4, 4)
    with pytest.raises(ValueError, match="cannot align 6 end positions"):
        align_end(5, 3, n=6)


# -- understanding → teacher-forced generation (Janus) ------------------------------------------------


def test_teacher_forced_logits_are_the_generation_head_during_generation(janus: tuple) -> None:
    model, adapter, info = janus
    prompt = adapter.prepare(model, [{"input_ids": [1, 5, 6, 7, info["boi_token_id"]]}], mode="generation")
    with (
        torch.no_grad(),
        capture(model, "gen_head.in", adapter=adapter, layout=prompt.layout, cfg_batch=1) as cap,
    ):
        tokens = adapter.generate(model, prompt, **GUIDE)
    cond = model.model.generation_head(cap.rows("gen_head.in", branch="cond").values)
    forced = janus_teacher_forced(prompt, tokens[0])
    assert forced.layout.length == 5 + tokens.shape[1] - 1 and forced.layout.names(0)[-1] == "image_gen"
    with torch.no_grad():
        logits = janus_image_forward(model, forced)
    assert logits.shape == (1, info["num_gen_tokens"], cond.shape[-1])
    torch.testing.assert_close(logits[0], cond, atol=1e-5, rtol=0)


def test_understanding_states_into_a_generation_run(janus: tuple) -> None:
    model, adapter, info = janus
    boi = info["boi_token_id"]
    understanding = adapter.prepare(model, [{"input_ids": [1, 20, 5, 6, 7, 21]}])  # "what is 5 6 7 ?"
    gen_clean = adapter.prepare(model, [{"input_ids": [1, 5, 6, 7, boi]}], mode="generation")
    gen_corrupt = adapter.prepare(model, [{"input_ids": [1, 5, 9, 7, boi]}], mode="generation")
    target = adapter.generate(model, gen_clean, **GUIDE)[0]
    assert align_by_anchors([1, 20, 5, 6, 7, 21], [1, 5, 9, 7, boi], [5, 7]).pairs == [(1, 2), (3, 4)]
    with pytest.raises(ValueError, match="anchor '6' is missing from the target"):
        align_by_anchors([1, 20, 5, 6, 7, 21], [1, 5, 9, 7, boi], [6])
    al = alignment([(1, 2), (2, 3), (3, 4)], 6, 5, ["5", "6", "7"])  # the problem's tokens
    sites = al.sites(2, ("resid_pre", "attn_out", "mlp_out"))
    metric = SequenceLogProb(target, logits_fn=lambda out: out)
    tf_corrupt = janus_teacher_forced(gen_corrupt, target)
    res = patch_across(
        model, understanding, tf_corrupt, sites, metric,
        clean_target=janus_teacher_forced(gen_clean, target), target_forward=janus_image_forward,
    )  # fmt: skip
    with torch.no_grad():
        clean_v = float(metric(janus_image_forward(model, janus_teacher_forced(gen_clean, target))))
        corrupt_v = float(metric(janus_image_forward(model, tf_corrupt)))
    assert res.clean == pytest.approx(clean_v, abs=1e-5) and res.corrupted == pytest.approx(
        corrupt_v, abs=1e-5
    )
    assert res.direction == "cross" and res.as_grid().shape == (3, 2, 3)
    _, states = collect_states(model, adapter, understanding, [s.point for s in sites.sites])
    ref = run_sites_reference(
        model, adapter, tf_corrupt, sites.sites, states, metric, forward=janus_image_forward
    )
    assert float((res.values - ref).abs().max()) <= 1e-5
    with pytest.raises(ValueError, match="clean_target"):
        patch_across(model, understanding, tf_corrupt, sites, metric, target_forward=janus_image_forward)


# -- patches at generation steps ----------------------------------------------------------------------


def test_step_patches_in_free_generation(janus: tuple) -> None:
    model, adapter, info = janus
    boi = info["boi_token_id"]
    a = adapter.prepare(model, [{"input_ids": [1, 5, 6, 7, boi]}], mode="generation")
    b = adapter.prepare(model, [{"input_ids": [1, 9, 10, 11, boi]}], mode="generation")
    tok_a, tok_b = adapter.generate(model, a, **GUIDE), adapter.generate(model, b, **GUIDE)
    assert not torch.equal(tok_a, tok_b)
    everything = alignment([(i, i) for i in range(5)], 5, 5)
    _, own = collect_states(model, adapter, a, ["blocks.0.resid_pre"])
    same = patched_generation(model, a, step_patches(own, everything, ["blocks.0.resid_pre"]), **GUIDE)
    assert torch.equal(same, tok_a)  # writing a run's own states changes nothing
    _, other = collect_states(model, adapter, b, ["blocks.0.resid_pre"])
    swapped = patched_generation(model, a, step_patches(other, everything, ["blocks.0.resid_pre"]), **GUIDE)
    assert torch.equal(swapped, tok_b)  # the whole conditional prompt swapped: b's image
    kick = StepPatch("blocks.1.resid_pre", 2, [6], torch.full((32,), 30.0))  # step 2 feeds token 1 at 6
    kicked = patched_generation(model, a, [kick], **GUIDE)
    assert torch.equal(kicked[:, :2], tok_a[:, :2]) and not torch.equal(kicked, tok_a)
    with pytest.raises(RuntimeError, match="never applied.*step 9"):
        patched_generation(model, a, [StepPatch("blocks.0.resid_pre", 9, [0], torch.zeros(32))], **GUIDE)
    with pytest.raises(ValueError, match="outside this step's positions 5..5"):
        patched_generation(model, a, [StepPatch("blocks.0.resid_pre", 1, [2], torch.zeros(32))], **GUIDE)
    for mod in model.modules():
        assert not mod._forward_hooks and not mod._forward_pre_hooks


def test_judged_generation_effect(janus: tuple) -> None:
    model, adapter, info = janus
    boi = info["boi_token_id"]
    clean = adapter.prepare(model, [{"input_ids": [1, 9, 10, 11, boi]}], mode="generation")
    corrupted = adapter.prepare(model, [{"input_ids": [1, 5, 6, 7, boi]}], mode="generation")
    wanted = adapter.generate(model, clean, **GUIDE)[0]
    _, states = collect_states(model, adapter, clean, ["blocks.0.resid_pre"])
    everything = alignment([(i, i) for i in range(5)], 5, 5)
    effect = generation_effect(
        model, clean, corrupted, step_patches(states, everything, ["blocks.0.resid_pre"]),
        judge=lambda toks: bool(torch.equal(toks, wanted)), **GUIDE,
    )  # fmt: skip
    assert (effect.clean, effect.corrupted, effect.patched) == (1.0, 0.0, 1.0)
    assert effect.normalised == 1.0 and torch.equal(effect.tokens[0], wanted)


# -- query-based models -----------------------------------------------------------------------------


def test_query_tokens_and_connector_output() -> None:
    model, _ = tiny_query(layers=2)
    adapter = adapter_for(model)
    clean = adapter.prepare(model, [{"input_ids": [1, 5, 6, 7]}])
    corrupted = adapter.prepare(model, [{"input_ids": [1, 5, 9, 7]}])
    grid, connector = query_sites(model, clean.layout, ("resid_pre", "resid_post"))
    assert grid.columns == ["query"] and [s.positions for s in connector] == [(0,), (1,), (2,), (3,)]
    _, all_at_once = query_sites(model, clean.layout, per_query=False)
    with torch.no_grad():
        clean_tiles = second_output(model(**clean.kwargs)).argmax(-1)[0]
    metric = GridLogProb(clean_tiles)
    res = patch_sweep(model, clean, corrupted, grid.sites + connector + all_at_once, metric)
    norm = res.normalised
    assert norm[0] == pytest.approx(0.0, abs=1e-6)  # resid_pre 0 at the queries: identical there
    assert norm[-1] == pytest.approx(1.0, abs=1e-5)  # the whole connector output: the clean drawing
    assert norm[3] == pytest.approx(1.0, abs=1e-5)  # resid_post of the last block at every query
    kl = patch_sweep(model, clean, corrupted, all_at_once, KLToClean(second_output, position=None))
    assert kl.clean == pytest.approx(0.0, abs=1e-7) and kl.corrupted > 0
    assert kl.normalised[0] == pytest.approx(1.0, abs=1e-5)
