"""The demo's "How does the answer travel?" section: its numbers (batched = one item at a time), its files,
and sentences that agree with the numbers they come from."""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest
from uniprobe.experiments import demo_attention as da
from uniprobe.experiments.demo_attention_text import (
    MATTERS,
    attention_paragraph,
    cot_knockout_sentence,
    largest_change,
    steer_sentence,
)
from uniprobe.experiments.models import load_model
from uniprobe.experiments.tasks.suite import Suite


@pytest.fixture(scope="module")
def items():
    return Suite(0).items


@pytest.fixture(scope="module")
def ar():
    return load_model("sandbox-ar").model


@pytest.fixture(scope="module")
def ar_result(ar, items, tmp_path_factory):
    out = tmp_path_factory.mktemp("attention")
    return da.run_attention(ar, items, "ar", out, n_items=2), out


def test_section_writes_its_numbers_and_figures(ar_result):
    result, out = ar_result
    assert json.loads((out / "attention-ar.json").read_text()) == result
    for fig in ("attn-mass-ar.png", "attn-flow-ar.png"):
        assert (out / fig).stat().st_size > 5000
    mass = np.asarray(result["mass"])
    assert mass.shape == (4, 4) and ((mass >= 0) & (mass <= 1)).all()
    for key, groups in (("cot_knockout", ("CoT answer", "restated answer")),
                        ("direct_knockout", ("expression", "whole prompt"))):  # fmt: skip
        ko = result[key]
        assert all(len(ko[g]) == 5 for g in groups)  # 4 layers, then every layer at once
    steer = result["steer"]
    # layer 0's resid_pre is the <answer> embedding in every understanding run: no direction, not swept
    assert steer["points"] == ["blocks.1.resid_pre", "blocks.2.resid_pre", "blocks.3.resid_pre"]
    grid = np.asarray(steer["grid"])
    assert np.allclose(grid[:, 0], steer["plain"], atol=1e-5)  # alpha 0 = the plain run
    assert steer["best"]["metric"] == pytest.approx(grid[:, 1:].max()) and steer["best"]["alpha"] > 0
    assert steer["best"]["point"] == f"blocks.{steer['best']['layer']}.resid_pre"


def test_batched_items_equal_one_item_at_a_time(ar, ar_result, items):
    """PerRow over a batch of items = the mean of the same knockout sweep run on each item alone."""
    result, _ = ar_result
    chosen = [it for it in items if it.id in result["items"]]
    cot = da.cot_inputs(ar, chosen)
    restated = da.restated_position(ar, cot, chosen)
    groups = {"CoT answer": ["cot"], "restated answer": [restated]}
    metric = da.PerRow([da.drawing_metric(ar, it) for it in chosen])
    batched = da._knock(ar, cot, da.drawing_positions(cot, "ar"), groups, metric)
    alone = []
    for it in chosen:
        one = da.cot_inputs(ar, [it])
        alone.append(da._knock(ar, one, da.drawing_positions(one, "ar"), groups, da.drawing_metric(ar, it)))
    for key in batched:
        assert np.allclose(batched[key], np.mean([a[key] for a in alone], axis=0), atol=1e-5)
    assert np.allclose(batched["restated answer"], result["cot_knockout"]["restated answer"], atol=1e-5)


def test_streams_that_do_not_line_up_are_refused(ar, items):
    chosen = [it for it in items if it.category == "arithmetic" and it.level == 2][:2]
    cot = da.cot_inputs(ar, chosen)
    with pytest.raises(ValueError, match="do not line up"):
        da._check_words(ar, cot, cot.layout.positions(0, "cot")[-1] + 2, ["9", "9"])


def _numbers(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"[-+]?\d+\.\d\d", text)]


def test_sentences_agree_with_the_numbers(ar_result):
    result, _ = ar_result
    text = attention_paragraph(result)
    mass = np.asarray(result["mass"])
    assert f"put {mass.mean():.2f} of their attention" in text
    layer, head = np.unravel_index(np.argmax(mass), mass.shape)
    assert f"the most at layer {layer}, head {head} ({mass[layer, head]:.2f})" in text
    cot = largest_change(result["cot_knockout"], "CoT answer")
    loses = abs(cot["delta"]) >= MATTERS or abs(cot["all_delta"]) >= MATTERS
    assert ("does not lose the answer when it cannot see the CoT answer" in text) != loses
    s = result["steer"]
    assert f"{s['plain']:.2f} → {s['best']['metric']:.2f}" in text
    assert (
        f"draws {s['drawn_steered']} of {len(result['items'])} items right (unsteered {s['drawn_plain']})"
        in text
    )


def test_verdicts_follow_the_threshold(ar_result):
    """Synthetic numbers: the words flip exactly where the numbers cross MATTERS."""
    result = copy.deepcopy(ar_result[0])
    ko = result["cot_knockout"]
    ko["clean"], ko["CoT answer"] = -0.1, [-0.1, -0.15, -0.1, -0.1, -0.12]
    assert "does not lose the answer" in cot_knockout_sentence(result)
    ko["CoT answer"] = [-0.1, -0.9, -0.1, -0.1, -1.5]
    sentence = cot_knockout_sentence(result)
    assert "without the CoT answer tokens the drawing loses the answer (most at layer 1)" in sentence
    assert "lowers it to -1.50 at every layer at once (-1.40)" in sentence
    ko["CoT answer"] = [-0.1, 0.0, -0.1, -0.1, 0.2]  # a knockout that helps the right drawing
    sentence = cot_knockout_sentence(result)
    assert "raises it to 0.20" in sentence and "draws the right answer more readily" in sentence
    s = result["steer"]
    s.update(plain=-1.0, best={"layer": 2, "point": "blocks.2.resid_pre", "alpha": 4.0, "metric": -0.95})
    s.update(drawn_plain=1, drawn_steered=1)
    assert "Nothing in this sweep makes the model draw the answer it knows" in steer_sentence(result)
    s["best"]["metric"], s["drawn_steered"] = -0.5, 2
    sentence = steer_sentence(result)
    assert "Nothing in this sweep" not in sentence and "layer 2 at alpha 4" in sentence
    assert "-1.00 → -0.50 (+0.50)" in sentence and _numbers(sentence)[-1] == 0.5


@pytest.mark.parametrize("name, arch", [("sandbox-query", "query"), ("sandbox-mot", "mot")])
def test_section_is_generic_over_the_generation_role(name, arch, items, tmp_path):
    """Query model: the queries draw; MoT: the latents (role image_gen, empty as a drawing starts)."""
    model = load_model(name).model
    result = da.run_attention(model, items, arch, tmp_path, n_items=1)
    role = {"query": "query", "mot": "image_gen"}[arch]
    assert result["gen_role"] == role and (tmp_path / f"attn-flow-{arch}.png").exists()
    text = attention_paragraph(result)
    assert f"the {role} positions put" in text and f"at the {role} positions with alpha" in text
    if arch == "mot":  # the right tiles there would hand the answer to the drawing
        from uniprobe.experiments.tasks import world

        cot = da.cot_inputs(model, [it for it in items if it.id == result["items"][0]])
        latents = cot.kwargs["image_tokens"][0, cot.layout.mask(role)[0]]
        assert latents.tolist() == [world.EMPTY] * len(latents)
