"""Path patching: the batched sweep equals the two-pass reference (q / k / v receivers with GQA, stream
receivers at chosen positions, MLPs recomputed or frozen) on tiny Llama, Qwen2, Emu3, Janus (its LM) and
Chameleon (q/k norms), a query model's queries and the shipped sandbox AR model at its last positions; a
sender after its receivers has no effect; a sender just before a whole-stream receiver equals plain head
patching of it."""

from __future__ import annotations

import pytest
import torch
from uniprobe.experiments.sandbox import load_sandbox
from uniprobe.experiments.tiny import build_tiny, tiny_llama
from uniprobe.hooks.adapters import adapter_for
from uniprobe.hooks.errors import UniprobeError
from uniprobe.probes.attention import Receivers, every_head, head_sites, path_patch, path_patch_reference
from uniprobe.probes.patching import LogitDiff, logits_of, patch_sweep

pytestmark = pytest.mark.usefixtures("one_thread")

RECEIVERS = [
    Receivers(heads=((2, 0), (2, 3)), inputs=("q",)),
    Receivers(heads=((2, 1), (2, 0)), inputs=("k", "v"), positions=(3, 4)),  # one GQA group: one k/v head
    Receivers(layer=2, positions=(4,)),
]


FAMILIES = ["tiny-llama", "tiny-qwen2", "tiny-emu3", "tiny-chameleon", "tiny-janus"]


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request):
    model, _ = build_tiny(request.param, layers=3)
    adapter = adapter_for(model)
    clean = adapter.prepare(model, [{"input_ids": [1, 5, 6, 7, 8]}, {"input_ids": [1, 5, 9, 7, 8]}])
    corrupted = adapter.prepare(model, [{"input_ids": [1, 9, 6, 7, 8]}, {"input_ids": [1, 5, 10, 7, 8]}])
    return model, adapter, clean, corrupted


@pytest.mark.parametrize("receivers", RECEIVERS, ids=["q", "kv-positions", "stream"])
@pytest.mark.parametrize("freeze_mlps", [False, True])
def test_batched_equals_two_pass_reference(pair, receivers, freeze_mlps):
    model, adapter, clean, corrupted = pair
    senders = every_head(model, adapter, layers=[0, 1]) + [[(0, 1), (1, 2)]]
    metric = LogitDiff(11, 12)
    res = path_patch(
        model, clean, corrupted, senders, receivers, metric, freeze_mlps=freeze_mlps, budget_bytes=3000
    )
    ref = path_patch_reference(model, clean, corrupted, senders, receivers, metric, freeze_mlps=freeze_mlps)
    assert res.info["forwards"] > 2  # several chunks of sender sets
    assert float((res.values - ref).abs().max()) <= 1e-5
    assert float((res.values - res.clean).abs().max()) > 1e-6  # some sender matters through these receivers
    for direction in ("denoise",):
        d = path_patch(model, clean, corrupted, senders[:3], receivers, metric, direction=direction)
        r = path_patch_reference(model, clean, corrupted, senders[:3], receivers, metric, direction=direction)
        assert float((d.values - r).abs().max()) <= 1e-5


def test_senders_after_the_receivers_do_nothing_and_the_last_hop_is_head_patching():
    model, _ = tiny_llama(layers=3)
    adapter = adapter_for(model)
    clean = adapter.prepare(model, [{"input_ids": [1, 5, 6, 7, 8]}])
    corrupted = adapter.prepare(model, [{"input_ids": [1, 9, 6, 7, 8]}])
    metric = LogitDiff(11, 12)
    late = path_patch(model, clean, corrupted, every_head(model, adapter, layers=[2]), RECEIVERS[2], metric)
    assert torch.allclose(late.values, torch.full_like(late.values, late.clean), atol=1e-6)
    # a sender in layer 1, receivers = the whole stream entering layer 2: nothing in between to bypass
    senders = every_head(model, adapter, layers=[1])
    path = path_patch(model, clean, corrupted, senders, Receivers(layer=2), metric)
    grid = head_sites(model, clean, layers=[1])
    plain = patch_sweep(model, clean, corrupted, grid, metric, direction="noise")
    torch.testing.assert_close(path.values, plain.values, atol=1e-5, rtol=1e-5)
    assert path.to_dict()["receivers"]["layer"] == 2


def test_drawing_positions_of_the_sandbox_model():
    model = load_sandbox("sandbox-ar")
    adapter = adapter_for(model)
    clean, corrupted = (
        adapter.prepare(model, [{"prompt": p}], "generation") for p in ("what is 2 + 1 ?", "what is 3 + 1 ?")
    )
    with torch.no_grad():
        target, foil = (int(i) for i in logits_of(adapter.run(model, clean))[0, -1].topk(2).indices)
    n = clean.layout.length
    receivers = Receivers(layer=adapter.n_layers(model) - 1, positions=(n - 2, n - 1))
    senders = every_head(model, adapter, layers=[0, 1])
    metric = LogitDiff(target, foil)
    res = path_patch(model, clean, corrupted, senders, receivers, metric)
    ref = path_patch_reference(model, clean, corrupted, senders, receivers, metric)
    assert float((res.values - ref).abs().max()) <= 1e-5


def test_through_the_query_models_queries():
    from uniprobe.probes.patching import GridLogProb
    from uniprobe.probes.patching.metrics import second_output

    model, _ = build_tiny("tiny-query", layers=3)
    adapter = adapter_for(model)
    clean = adapter.prepare(model, [{"input_ids": [1, 5, 6, 7]}])
    corrupted = adapter.prepare(model, [{"input_ids": [1, 9, 6, 7]}])
    with torch.no_grad():
        metric = GridLogProb(second_output(adapter.run(model, clean)).argmax(-1)[0])
    receivers = Receivers(layer=2, positions=tuple(clean.layout.positions(0, "query")))
    senders = every_head(model, adapter, layers=[0, 1])
    res = path_patch(model, clean, corrupted, senders, receivers, metric)
    ref = path_patch_reference(model, clean, corrupted, senders, receivers, metric)
    assert (
        float((res.values - ref).abs().max()) <= 1e-5 and float((res.values - res.clean).abs().max()) > 1e-6
    )


def test_bad_receivers_and_senders_are_named():
    model, _ = tiny_llama(layers=3)
    adapter = adapter_for(model)
    inputs = adapter.prepare(model, [{"input_ids": [1, 5, 6, 7, 8]}])
    with pytest.raises(UniprobeError, match="exactly one"):
        Receivers()
    with pytest.raises(UniprobeError, match="inputs must be among"):
        Receivers(heads=((1, 0),), inputs=("o",))
    with pytest.raises(UniprobeError, match="layer 2 has 4 heads"):
        path_patch(model, inputs, inputs, [[(0, 0)]], Receivers(heads=((2, 9),)), LogitDiff(1, 2))
    with pytest.raises(UniprobeError, match=r"sender head \(0, 5\)"):
        path_patch(model, inputs, inputs, [[(0, 5)]], Receivers(layer=1), LogitDiff(1, 2))
