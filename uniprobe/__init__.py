"""uniprobe: mechanistic probing of unified multimodal models.

Does what a model understands flow into what it generates? ``import uniprobe as up``::

    loaded = up.load_model("sandbox-ar")                    # tiny, sandbox, local folder or spec file
    cache = loaded.run_with_cache("what is 2 + 1 ?", "blocks.*.resid_post")
    cache["blocks.3.resid_post"]                           # [batch, pos, d_model]
    store = loaded.capture_dataset(examples, "blocks.*.resid_post", "artifacts/my-store")
    res = up.probe_store(store, "answer")                  # linear probes per point x role
    grid = up.patch_sweep(loaded.model, clean, corrupted, up.grid_sites(L, P), up.LogitDiff(t, f))

Everything else lives in the three layers: :mod:`uniprobe.hooks` (where activations come from),
:mod:`uniprobe.probes` (what is asked of them) and :mod:`uniprobe.experiments` (the sandbox, the
papers' protocols, sweeps, the CLI). Names here are loaded on first use, so ``import uniprobe``
stays fast (the CLI starts from it).
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("uniprobe")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

# public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    # models
    "load_model": "uniprobe.experiments.models",
    "LoadedModel": "uniprobe.experiments.models",
    "adapter_for": "uniprobe.hooks.adapters",
    "Adapter": "uniprobe.hooks.adapters",
    "TokenLayout": "uniprobe.hooks.layout",
    # capture and stores
    "capture": "uniprobe.hooks.capture",
    "Captured": "uniprobe.hooks.capture",
    "capture_dataset": "uniprobe.hooks.pipeline",
    "ActivationStore": "uniprobe.hooks.store",
    # probes and lenses
    "probe_store": "uniprobe.probes.linear",
    "probe_tensors": "uniprobe.probes.linear",
    "train_probes": "uniprobe.probes.linear",
    "logit_lens": "uniprobe.probes.lens",
    "logit_lens_store": "uniprobe.probes.lens",
    "train_tuned_lens": "uniprobe.probes.tuned_lens",
    "tuned_lens_from_store": "uniprobe.probes.tuned_lens",
    # patching
    "patch_sweep": "uniprobe.probes.patching",
    "attribution_patch": "uniprobe.probes.patching",
    "patch_across": "uniprobe.probes.patching",
    "grid_sites": "uniprobe.probes.patching",
    "role_sites": "uniprobe.probes.patching",
    "point_sites": "uniprobe.probes.patching",
    "PatchSite": "uniprobe.probes.patching",
    # metrics
    "LogitDiff": "uniprobe.probes.patching",
    "TargetProb": "uniprobe.probes.patching",
    "SequenceLogProb": "uniprobe.probes.patching",
    "GridLogProb": "uniprobe.probes.patching",
    "KLToClean": "uniprobe.probes.patching",
    "JudgeRate": "uniprobe.probes.patching",
    "DenoisingLoss": "uniprobe.probes.patching",
    "logits_of": "uniprobe.probes.patching",
    # attention: head-level and path patching, steering
    "head_sites": "uniprobe.probes.attention",
    "head_grid": "uniprobe.probes.attention",
    "path_patch": "uniprobe.probes.attention",
    "Receivers": "uniprobe.probes.attention",
    "every_head": "uniprobe.probes.attention",
    "Steer": "uniprobe.probes.attention",
    "steered_run": "uniprobe.probes.attention",
    "steered_generation": "uniprobe.probes.attention",
    "steer_sweep": "uniprobe.probes.attention",
    "probe_direction": "uniprobe.probes.attention",
    "mean_difference": "uniprobe.probes.attention",
    "state_at": "uniprobe.probes.attention",
    # attention: patterns, mass, knockout
    "intercept_attention": "uniprobe.hooks.attention",
    "attention_geometry": "uniprobe.hooks.attention",
    "head_outputs": "uniprobe.hooks.attention",
    "Knockout": "uniprobe.probes.attention",
    "knockout_grid": "uniprobe.probes.attention",
    "knockout_sweep": "uniprobe.probes.attention",
    "knockout_reference": "uniprobe.probes.attention",
    "AttentionMass": "uniprobe.probes.attention",
    "MassTable": "uniprobe.probes.attention",
    "attention_mass": "uniprobe.probes.attention",
    "mass_table": "uniprobe.probes.attention",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'uniprobe' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
