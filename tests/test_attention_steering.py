"""Steering: alpha = 0 is the plain run (forward, sweep, generation); the batched alpha × point sweep equals
a loop of single steered runs (Llama, through a query model's queries, a teacher-forced Janus image pass);
directions from a saved probe, a mean difference of two stores and a captured state; steering during free
image generation at chosen steps; errors name the bad value."""

from __future__ import annotations

import pytest
import torch
from uniprobe.experiments.tiny import tiny_janus, tiny_llama, tiny_query
from uniprobe.hooks.adapters import adapter_for
from uniprobe.hooks.errors import UniprobeError
from uniprobe.hooks.pipeline import capture_dataset
from uniprobe.probes.attention import (
    Steer,
    mean_difference,
    probe_direction,
    state_at,
    steer_sweep,
    steered_generation,
    steered_run,
)
from uniprobe.probes.patching import LogitDiff, SequenceLogProb, logits_of
from uniprobe.probes.patching.metrics import GridLogProb, second_output
from uniprobe.probes.results import ProbeResults, probe_key

pytestmark = pytest.mark.usefixtures("one_thread")
GUIDE = {"guidance_scale": 2.0}


@pytest.fixture(scope="module")
def llama():
    model, _ = tiny_llama(layers=3)
    adapter = adapter_for(model)
    inputs = adapter.prepare(model, [{"input_ids": [1, 5, 6, 7, 8]}, {"input_ids": [1, 9, 6, 10, 8]}])
    return model, adapter, inputs


def _direction(d: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(d, generator=torch.Generator().manual_seed(seed))


def test_alpha_zero_is_the_plain_run(llama):
    model, adapter, inputs = llama
    with torch.no_grad():
        plain = logits_of(adapter.run(model, inputs))
    zero = steered_run(model, inputs, [Steer("blocks.1.resid_pre", _direction(32), alpha=0.0)])
    assert torch.equal(logits_of(zero), plain)
    moved = steered_run(
        model, inputs, [Steer("blocks.1.resid_pre", _direction(32), alpha=3.0, positions=[4])]
    )
    changed = (logits_of(moved) - plain).abs().amax(-1)[0]
    assert changed[:4].max() == 0 and changed[4] > 1e-3  # causal: only position 4 on


def test_batched_sweep_equals_a_loop_of_single_runs(llama):
    model, adapter, inputs = llama
    d = _direction(32, 1)
    metric = LogitDiff(11, 12)
    points = ["blocks.0.resid_pre", "blocks.1.attn_out", "blocks.2.resid_post", "blocks.1.mlp_out"]
    alphas = [0.0, -2.0, 1.5, 4.0]
    for kw in ({}, {"positions": [2, 4]}, {"role": "text"}):
        res = steer_sweep(model, inputs, d, alphas, points, metric, budget_bytes=4000, **kw)
        assert res.values.shape == (4, 4) and res.info["forwards"] > 1  # several chunks
        loop = torch.tensor(
            [
                [float(metric(steered_run(model, inputs, [Steer(p, d, a, **kw)])).mean()) for a in alphas]
                for p in points
            ]
        )
        torch.testing.assert_close(res.values, loop, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(res.values[:, 0], torch.full((4,), res.plain), atol=1e-5, rtol=1e-5)
    full = steer_sweep(model, inputs, d, alphas, points, metric, resume=False)
    assert full.info["strategy"] == "full" and res.info["strategy"] == "resume"
    torch.testing.assert_close(full.values, res.values, atol=1e-5, rtol=1e-5)


def test_steering_through_the_query_models_queries():
    model, _ = tiny_query()
    adapter = adapter_for(model)
    inputs = adapter.prepare(model, [{"input_ids": [1, 5, 6, 7]}])
    with torch.no_grad():
        metric = GridLogProb(second_output(model(**inputs.kwargs)).argmax(-1)[0])
    d = _direction(32, 2)
    points = ["blocks.0.resid_pre", "blocks.1.resid_post"]
    res = steer_sweep(model, inputs, d, [0.0, 5.0], points, metric, role="query")
    loop = [
        [float(metric(steered_run(model, inputs, [Steer(p, d, a, role="query")]))) for a in (0.0, 5.0)]
        for p in points
    ]
    torch.testing.assert_close(res.values, torch.tensor(loop), atol=1e-5, rtol=1e-5)
    assert (
        res.values[0, 0] == pytest.approx(res.plain, abs=1e-5)
        and (res.values[:, 1] - res.plain).abs().min() > 1e-4
    )


@pytest.fixture(scope="module")
def janus():
    model, info = tiny_janus()
    return model, adapter_for(model), info


def test_steering_during_image_generation(janus):
    model, adapter, info = janus
    prompt = adapter.prepare(model, [{"input_ids": [1, 5, 6, 7, info["boi_token_id"]]}], mode="generation")
    with torch.no_grad():
        plain = adapter.generate(model, prompt, **GUIDE)
    d = _direction(32, 3)
    same = steered_generation(model, prompt, [Steer("blocks.1.resid_pre", d, 0.0, steps=[1, 2, 3])], **GUIDE)
    assert torch.equal(same, plain)
    pushes = [Steer("blocks.0.resid_post", d, 50.0, steps=[s]) for s in (1, 2, 3)]
    pushed = steered_generation(model, prompt, pushes, **GUIDE)
    assert pushed.shape == plain.shape and all(s.applied == 1 for s in pushes)
    assert not torch.equal(pushed, plain)  # the drawing changed
    at_boi = Steer("blocks.0.resid_post", d, 50.0, positions=[4], steps=[0])
    steered_generation(model, prompt, [at_boi], **GUIDE)
    assert at_boi.applied == 1
    with pytest.raises(UniprobeError, match="never applied"):
        steered_generation(model, prompt, [Steer("blocks.0.resid_post", d, 1.0, steps=[40])], **GUIDE)


def test_sweep_over_a_teacher_forced_image_pass(janus):
    model, adapter, info = janus
    prompt = adapter.prepare(model, [{"input_ids": [1, 5, 6, 7, info["boi_token_id"]]}], mode="generation")
    image = torch.tensor([3, 1, 4, 1])
    forced = adapter.teacher_forced(prompt, image)
    metric = SequenceLogProb(image, logits_fn=lambda out: out)
    d = _direction(32, 4)

    def forward(m, x):
        return adapter.image_forward(m, x)

    res = steer_sweep(
        model, forced, d, [0.0, 3.0], ["blocks.1.resid_pre"], metric, role="image_gen", forward=forward
    )
    one = steered_run(model, forced, [Steer("blocks.1.resid_pre", d, 3.0, role="image_gen")], forward=forward)
    assert float(res.values[0, 1]) == pytest.approx(float(metric(one)), abs=1e-5)
    assert float(res.values[0, 0]) == pytest.approx(res.plain, abs=1e-5)


def test_directions_from_a_probe_two_stores_and_a_state(tmp_path, llama):
    model, adapter, inputs = llama
    w = torch.randn(3, 32)
    parts = {"weight": w, "bias": torch.zeros(3), "mean": torch.zeros(32), "std": torch.ones(32)}
    results = ProbeResults(
        rows=[{"point": "blocks.1.resid_post", "role": "text", "accuracy": 1.0}],
        meta={"classes": ["a", "b", "c"]},
        directions={f"{probe_key('blocks.1.resid_post', 'text')}/{k}": v for k, v in parts.items()},
    )
    u = probe_direction(results, "blocks.1.resid_post", "text", cls="b")
    torch.testing.assert_close(u, w[1] / w[1].norm())
    with pytest.raises(UniprobeError, match="pass cls="):
        probe_direction(results, "blocks.1.resid_post", "text")
    stores = [
        capture_dataset(model, [{"id": f"{k}{i}", "input_ids": ids} for i, ids in enumerate(group)],
                        "blocks.1.resid_post", tmp_path / k, batch_size=2, progress=False)
        for k, group in (("a", [[1, 5, 6], [1, 7, 6]]), ("b", [[1, 9, 10], [1, 11, 10], [1, 12, 10]]))
    ]  # fmt: skip
    diff = mean_difference(stores[0], stores[1], "blocks.1.resid_post", "text")
    a = stores[0].matrix("blocks.1.resid_post", "text").values.float().mean(0)
    b = stores[1].matrix("blocks.1.resid_post", "text").values.float().mean(0)
    torch.testing.assert_close(diff, a - b)
    state = state_at(model, inputs, "blocks.1.resid_post", -1)
    assert state.shape == (32,)
    with pytest.raises(UniprobeError, match="position 9 is outside"):
        state_at(model, inputs, "blocks.1.resid_post", 9)


def test_bad_steers_are_named(llama):
    model, adapter, inputs = llama
    with pytest.raises(UniprobeError, match="direction has 31 dims"):
        steered_run(model, inputs, [Steer("blocks.1.resid_pre", torch.zeros(31))])
    with pytest.raises(UniprobeError, match="role 'query' has no positions"):
        steered_run(model, inputs, [Steer("blocks.1.resid_pre", torch.zeros(32), role="query")])
    with pytest.raises(UniprobeError, match="positions or role, not both"):
        Steer("blocks.1.resid_pre", torch.zeros(32), positions=[1], role="text")


@pytest.mark.parametrize("name", ["tiny-emu3", "tiny-chameleon"])
def test_steering_the_image_tokens_of_unified_vocabulary_models(name):
    from uniprobe.experiments.tiny import build_tiny

    model, _ = build_tiny(name)
    adapter = adapter_for(model)
    prompt = adapter.prepare(model, [{"input_ids": [1, 5, 6, 7]}], mode="generation")
    with torch.no_grad():
        plain = adapter.generate(model, prompt)
    d = _direction(32, 5)
    same = steered_generation(model, prompt, [Steer("blocks.1.resid_pre", d, 0.0, steps=range(1, 4))])
    assert torch.equal(same, plain)
    pushes = [Steer("blocks.0.resid_post", d, 80.0, steps=range(1, plain.shape[1]))]
    pushed = steered_generation(model, prompt, pushes)
    assert pushed.shape == plain.shape and pushes[0].applied == plain.shape[1] - 1
