"""Attention mass: per layer × head from eager weights; as a knockout and a patching metric."""

from __future__ import annotations

import pytest
import torch
from test_attention_hooks import eager_copy, eager_weights
from test_attention_knockout import GROUPS, tiny_inputs
from uniprobe.hooks.errors import UsageError
from uniprobe.probes.attention.knockout import knockout_grid, knockout_reference, knockout_sweep
from uniprobe.probes.attention.mass import AttentionMass, MassTable, attention_mass, mass_table
from uniprobe.probes.patching.engine import collect_states, run_sites_reference
from uniprobe.probes.patching.exact import patch_sweep
from uniprobe.probes.patching.sites import grid_sites


@pytest.mark.parametrize("pad", [False, True])
def test_mass_table_equals_eager_weights(pad: bool, tmp_path) -> None:
    model, adapter, inputs = tiny_inputs("tiny-qwen2", pad)
    table = mass_table(model, inputs, ["image_gen"], ["text", "cot"])
    weights, _ = eager_weights(eager_copy(model), adapter, range(3), lambda m: adapter.run(m, inputs))
    keys = inputs.layout.mask(["text", "cot"])  # [b, P]
    for layer in range(3):
        w = weights[layer][0][:, :, 5:8]  # image_gen queries at 5..7
        want = (w * keys[:, None, None, :]).sum(-1).mean(-1)  # [b, h]
        torch.testing.assert_close(table.per_example[:, layer], want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(table.values, table.per_example.mean(0))
    assert table.values.shape == (3, 4) and bool(((table.values >= 0) & (table.values <= 1)).all())
    table.save(tmp_path)
    back = MassTable.load(tmp_path)
    assert torch.equal(back.values, table.values) and back.key_roles == ["text", "cot"]
    assert len(table.to_pandas()) == 12
    assert table.figure() is not None


def test_attention_mass_function_and_errors() -> None:
    pattern = torch.tensor([[[[1.0, 0.0], [0.25, 0.75]]]])  # [1, 1, 2, 2]
    q = torch.tensor([[False, True]])
    assert attention_mass(pattern, q, torch.tensor([[True, False]])).item() == 0.25
    model, _, inputs = tiny_inputs("tiny-llama")
    with pytest.raises(UsageError, match=r"key_roles \['query'\]: no such position"):
        mass_table(model, inputs, ["image_gen"], ["query"])
    with pytest.raises(UsageError, match="run it through metric.wrap"):
        AttentionMass([0], ["image_gen"], ["text"])(torch.zeros(2))


def test_mass_as_knockout_metric_equals_reference() -> None:
    model, adapter, inputs = tiny_inputs("tiny-llama")
    metric = AttentionMass([1, 2], ["image_gen"], ["cot"])
    kos, grid = knockout_grid(model, GROUPS, query=["image_gen"])
    res = knockout_sweep(model, inputs, (kos, grid), metric)
    wrapped = metric.wrap(adapter.run, adapter)
    ref = knockout_reference(model, inputs, kos, metric, forward=wrapped)
    torch.testing.assert_close(res.values, ref, atol=1e-6, rtol=1e-5)
    grid_values = res.as_grid(False)[0]
    assert bool((grid_values[1:, 1] < res.clean - 1e-4).all())  # knocking out cot at layer >=1 drops the mass
    assert res.clean == pytest.approx(
        float(mass_table(model, inputs, ["image_gen"], ["cot"], layers=[1, 2]).values.mean()), abs=1e-6
    )


def test_mass_as_patching_metric() -> None:
    model, adapter, clean = tiny_inputs("tiny-llama")
    _, _, corrupted = tiny_inputs("tiny-llama")
    corrupted.kwargs["input_ids"] = corrupted.kwargs["input_ids"].flip(1)
    metric = AttentionMass([2], ["image_gen"], ["text"])
    sites = grid_sites(3, 8, ("resid_pre",), layers=[1])
    wrapped = metric.wrap(adapter.run, adapter)
    res = patch_sweep(model, clean, corrupted, sites, metric, forward=wrapped, resume=False)
    _, source = collect_states(model, adapter, clean, ["blocks.1.resid_pre"])
    ref = run_sites_reference(model, adapter, corrupted, sites.sites, source, metric, forward=wrapped)
    torch.testing.assert_close(res.values, ref, atol=1e-6, rtol=1e-5)
    later = grid_sites(3, 8, ("resid_pre",), layers=[2])  # a resumed forward skips block 1 for these
    early = AttentionMass([1], ["image_gen"], ["text"])
    with pytest.raises(UsageError, match="pass resume=False"):
        patch_sweep(model, clean, corrupted, later, early, forward=early.wrap(adapter.run, adapter))
