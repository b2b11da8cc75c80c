"""The nnsight backend's ``remote`` option, offline: no test makes a network call.

``remote=False`` (the default) calls nnsight's ``trace`` exactly as before; ``remote=True`` on a
local module wrapped in ``NNsight`` is refused with an explanation; on an nnsight model that can
run remotely the flag reaches nnsight's own ``trace(remote=...)``, whose backend is swapped here
for nnsight's local simulation of the remote path (serialize, hide local modules, deserialize,
run) instead of an NDIF server.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from uniprobe.experiments.tiny import build_tiny
from uniprobe.hooks.adapters import adapter_for
from uniprobe.hooks.backends import run_capture
from uniprobe.hooks.backends.tl_backend import word_level_tokenizer

nnsight = pytest.importorskip("nnsight")

pytestmark = pytest.mark.usefixtures("one_thread")

POINTS = "embed,blocks.*.*,final_norm,lm_head.in"


@pytest.fixture(scope="module")
def tiny():
    model, _ = build_tiny("tiny-llama")
    adapter = adapter_for(model)
    inputs = adapter.prepare(model, [{"input_ids": [1, 5, 6, 7, 8]}, {"input_ids": [1, 9, 10]}])
    ref = run_capture(model, inputs, POINTS)
    return model, inputs, ref


@pytest.fixture(scope="module")
def transformers_model(tiny, tmp_path_factory):
    """The same tiny Llama as an nnsight ``TransformersModel`` (the class NDIF serves)."""
    from nnsight import TransformersModel

    tok = word_level_tokenizer(64, str(tmp_path_factory.mktemp("tok")))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TransformersModel(tiny[0], tokenizer=tok, task="text-generation")


def _same(got, ref):
    assert got.points == ref.points
    for p in ref.points:
        torch.testing.assert_close(got.rows(p).values, ref.rows(p).values, atol=1e-6, rtol=0)


def test_default_trace_call_is_unchanged(tiny, monkeypatch):
    model, inputs, ref = tiny
    calls = []
    original = nnsight.Envoy.trace

    def spy(self, *args, **kwargs):
        calls.append(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(nnsight.Envoy, "trace", spy)
    _same(run_capture(model, inputs, POINTS, backend="nnsight"), ref)
    assert calls and all("remote" not in kw for kw in calls)
    assert set(calls[0]) == set(inputs.kwargs)


def test_remote_on_a_local_module_is_refused(tiny):
    model, inputs, _ = tiny
    with pytest.raises(ValueError, match="NDIF.*LanguageModel.*API key.*local LlamaForCausalLM"):
        run_capture(model, inputs, POINTS, backend="nnsight", remote=True)
    with pytest.raises(ValueError, match="backend='nnsight'"):
        run_capture(model, inputs, POINTS, backend="torch", remote=True)


def test_nnsight_model_is_traced_as_is(tiny, transformers_model):
    model, inputs, ref = tiny
    _same(run_capture(transformers_model, inputs, POINTS, backend="nnsight"), ref)
    # the other backends run the torch module inside it
    _same(run_capture(transformers_model, inputs, POINTS, backend="torch"), ref)


def test_remote_local_simulation(tiny, transformers_model):
    """nnsight's serverless dry run of the remote path: our trace body survives serialization."""
    _, inputs, ref = tiny
    _same(run_capture(transformers_model, inputs, POINTS, backend="nnsight", remote="local"), ref)


def test_remote_true_reaches_nnsight(tiny, transformers_model, monkeypatch):
    """``remote=True`` goes to nnsight's trace, which asks for its remote backend: answered here by
    the local simulation, so nothing leaves the machine."""
    from nnsight.intervention.backends.local import LocalSimulationBackend

    _, inputs, ref = tiny
    asked = []

    def offline_backend(self, remote, blocking, job_id, verbose):
        asked.append(remote)
        return LocalSimulationBackend(self)

    monkeypatch.setattr(type(transformers_model), "_remote_backend", offline_backend)
    _same(run_capture(transformers_model, inputs, POINTS, backend="nnsight", remote=True), ref)
    assert asked == [True]
