"""The call tracker: offsets from the cache object (not keyword names), and loud pattern checks."""

from __future__ import annotations

import pytest
import torch
import uniprobe.hooks.calls as calls
from uniprobe.experiments.tiny import tiny_emu3, tiny_llama
from uniprobe.hooks.adapters import adapter_for
from uniprobe.hooks.backends import run_capture
from uniprobe.hooks.calls import CallLog, CallPatternError, cache_kwarg, output_cache, transformers_version
from uniprobe.probes.patching import LogitDiff, grid_sites, patch_sweep
from uniprobe.probes.patching.generation import StepPatch, patched_generation

PROMPTS = [{"input_ids": [1, 5, 6, 7]}, {"input_ids": [1, 9, 4, 3]}]


def test_generation_pattern_is_prompt_then_single_continuing_steps() -> None:
    log = CallLog(expect="generation")
    for offset, length in [(0, 5), (5, 1), (6, 1), (7, 1)]:
        log.begin(offset, length)
    assert log.calls == [(0, 0, 5), (1, 5, 1), (2, 6, 1), (3, 7, 1)]


def test_a_generation_step_seen_at_offset_zero_is_an_error_not_step_zero() -> None:
    """The transformers 5.24 failure: the cache was not seen, every step looked like a new prompt."""
    log = CallLog(torch.nn.Linear(1, 1), expect="generation")
    log.begin(0, 5)
    with pytest.raises(CallPatternError) as err:
        log.begin(0, 1, has_cache=False)
    msg = str(err.value)
    assert "Linear" in msg and f"transformers {transformers_version()}" in msg
    assert "no key/value cache" in msg and "(0, 5), (0, 1)" in msg


@pytest.mark.parametrize("expect", ["any", "generation"])
def test_a_call_that_does_not_continue_the_last_is_an_error(expect: str) -> None:
    log = CallLog(expect=expect)
    log.begin(0, 5)
    with pytest.raises(CallPatternError, match="starts at offset 7, but the previous call ended at 5"):
        log.begin(7, 1)


def test_generation_steps_run_one_position() -> None:
    log = CallLog(expect="generation")
    log.begin(0, 5)
    with pytest.raises(CallPatternError, match="runs 3 positions, not 1"):
        log.begin(5, 3)


def test_any_pattern_allows_new_sequences_and_a_prefilled_cache() -> None:
    log = CallLog()
    for offset, length in [(4, 2), (6, 1), (0, 3), (0, 3)]:
        log.begin(offset, length)
    assert [c.step for c in log.calls] == [0, 1, 0, 0]
    with pytest.raises(ValueError, match="expect must be one of"):
        CallLog(expect="beam")


def test_cache_keyword_and_output_field_are_found_on_this_transformers() -> None:
    model, _ = tiny_llama()
    name = cache_kwarg(model)
    assert name in ("cache", "past_key_values")
    assert cache_kwarg(model.model) == name and cache_kwarg(model.model.layers[0]) == name
    out = model(input_ids=torch.tensor([[1, 2, 3]]), use_cache=True)
    assert output_cache(out) is not None and output_cache(out).get_seq_length() == 3
    assert cache_kwarg(torch.nn.Linear(2, 2)) is None


def test_generation_capture_tags_steps_on_emu3() -> None:
    model, _ = tiny_emu3()
    adapter = adapter_for(model)
    inputs = adapter.prepare(model, PROMPTS, mode="generation")
    cap = run_capture(model, inputs, "blocks.0.resid_post", adapter=adapter, generate=True)
    prompt = inputs.kwargs["input_ids"].shape[1]
    n = cap.generated.shape[1]
    assert cap.calls == [(0, 0, prompt)] + [(s, prompt + s - 1, 1) for s in range(1, n)]
    assert sorted(set(cap.rows("blocks.0.resid_post").step.tolist())) == list(range(n))


def test_a_cache_the_tracker_cannot_see_stops_the_capture(monkeypatch: pytest.MonkeyPatch) -> None:
    """If a future transformers hides the cache from block 0, capture fails loudly, never tags step 0."""
    model, _ = tiny_emu3()
    adapter = adapter_for(model)
    inputs = adapter.prepare(model, PROMPTS, mode="generation")
    monkeypatch.setattr(calls, "find_cache", lambda values: None)
    with pytest.raises(
        CallPatternError, match=r"Emu3ForConditionalGeneration \(transformers .*no key/value cache"
    ):
        run_capture(model, inputs, "blocks.0.resid_post", adapter=adapter, generate=True)
    with pytest.raises(CallPatternError, match="starts a new sequence at offset 0"):
        patched_generation(model, inputs, [StepPatch("blocks.0.resid_post", 2, [4], torch.zeros(1, 32))])


def _llama_pair() -> tuple:
    model, _ = tiny_llama(layers=2)
    adapter = adapter_for(model)
    clean = adapter.prepare(model, [{"input_ids": [1, 5, 6, 7, 8, 9]}])
    corrupted = adapter.prepare(model, [{"input_ids": [1, 5, 10, 7, 8, 9]}])
    sites = grid_sites(2, 6, ["resid_pre"])
    return model, clean, corrupted, sites


def test_the_suffix_path_is_taken_and_reported_when_off() -> None:
    model, clean, corrupted, sites = _llama_pair()
    fast = patch_sweep(model, clean, corrupted, sites, LogitDiff(11, 12))
    assert fast.info["suffix"] and fast.info["notes"] == []
    slow = patch_sweep(model, clean, corrupted, sites, LogitDiff(11, 12, position=2))
    assert not slow.info["suffix"]
    assert any("suffix path is off" in n and "last_position_only" in n for n in slow.info["notes"])


def test_a_model_that_ignores_the_handed_cache_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Were the cache keyword to move again, a suffix run without its prefix must not give a grid."""
    import uniprobe.probes.patching.engine as engine

    model, clean, corrupted, sites = _llama_pair()
    monkeypatch.setattr(engine, "cache_kwarg", lambda m: "kv_cache_of_another_version")
    with pytest.raises(
        CallPatternError, match=r"LlamaForCausalLM \(transformers .*did not run over the prefix"
    ):
        patch_sweep(model, clean, corrupted, sites, LogitDiff(11, 12))
