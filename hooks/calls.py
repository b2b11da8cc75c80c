"""Backbone calls: where each forward of the decoder stack starts, found and checked.

A capture or a patch during generation must know, for every forward of the decoder stack, its
*offset* (how many positions the key/value cache already holds) and *length* (positions it runs),
to tag rows with their stream position and generation step. Both come from what the model owns,
never from keyword names (transformers 5.24 renamed the cache keyword ``past_key_values`` →
``cache``; a tracker that read the name tagged every step 0):

- the cache is the one argument of block 0 that *is* a ``transformers.Cache``, whatever its name;
  its ``get_seq_length()`` before block 0 runs is the offset;
- the length is the sequence axis of the hidden states block 0 receives.

:class:`CallLog` checks every call against the pattern it was told to expect and raises
:class:`CallPatternError` (model class, transformers version, the calls seen) instead of tagging
rows wrongly:

- ``"any"``: a call at offset 0 starts a new sequence (step 0); a call at offset ``o > 0`` must
  continue the previous one (``o`` = previous offset + previous length), and is its next step;
- ``"generation"`` (one prompt pass, then single steps — Janus, Emu3, Chameleon and every
  ``greedy_image_tokens`` loop): additionally, only the first call may start at offset 0 and
  every later call runs exactly one position.

The same module says how to hand a cache to a model and where to find it in its outputs
(:func:`cache_kwarg`, :func:`output_cache`), for the patching engine's suffix path.
"""

from __future__ import annotations

import importlib.metadata
import inspect
from collections.abc import Iterable
from typing import Any, NamedTuple

import torch
from torch import nn
from uniprobe.hooks.adapters.base import get_module
from uniprobe.hooks.errors import UniprobeError
from uniprobe.hooks.hookset import HookSet, input_tensor

PATTERNS = ("any", "generation")
# the names transformers has used for the cache keyword, newest first (checked in cache_kwarg)
_CACHE_NAMES = ("cache", "past_key_values")


class CallPatternError(UniprobeError, RuntimeError):
    """Backbone calls that do not follow the expected pattern (rows would be mislabelled)."""


def transformers_version() -> str:
    try:
        return importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cache_type() -> type | None:
    try:
        from transformers import Cache
    except ImportError:
        return None
    return Cache


def find_cache(values: Iterable[Any]) -> Any | None:
    """The first ``transformers.Cache`` among ``values`` (a call's args and kwargs values), or None."""
    cls = _cache_type()
    if cls is None:
        return None
    for v in values:
        if isinstance(v, cls):
            return v
    return None


def cache_length(cache: Any) -> int:
    """Positions a cache holds (``get_seq_length()``); raises if the cache lacks that method."""
    get = getattr(cache, "get_seq_length", None)
    if get is None:
        raise CallPatternError(
            f"{type(cache).__name__} (transformers {transformers_version()}) has no get_seq_length(); "
            "cannot tell where a backbone call starts"
        )
    return int(get())


def output_cache(outputs: Any) -> Any | None:
    """The ``transformers.Cache`` a model returned (any field of its output), or None."""
    if isinstance(outputs, dict):  # ModelOutput is a dict
        return find_cache(outputs.values())
    if isinstance(outputs, (tuple, list)):
        return find_cache(outputs)
    return None


def cache_kwarg(module: nn.Module) -> str | None:
    """The name under which ``module.forward`` takes a key/value cache, or None if it takes none.

    A parameter annotated with ``Cache`` wins; else the first of the names transformers has used.
    """
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return None
    for name, p in params.items():
        ann = p.annotation
        text = ann if isinstance(ann, str) else getattr(ann, "__name__", "") or repr(ann)
        if "Cache" in text and name not in ("use_cache", "cache_position"):
            return name
    return next((n for n in _CACHE_NAMES if n in params), None)


def call_extent(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[int, int, bool]:
    """``(offset, length, has_cache)`` of a block-0 call from its arguments and input ``hidden``."""
    cache = find_cache((*args, *kwargs.values()))
    offset = cache_length(cache) if cache is not None else 0
    length = int(hidden.shape[1]) if hidden.dim() == 3 else 1
    return offset, length, cache is not None


class Call(NamedTuple):
    """One backbone call: generation ``step``, stream ``offset`` it starts at, ``length`` it runs."""

    step: int
    offset: int
    length: int


class CallLog:
    """The backbone calls of one capture or patched generation, checked as they arrive.

    Args:
        model: the model (named in errors).
        expect: ``"any"`` or ``"generation"`` (see the module docstring).
    """

    def __init__(self, model: nn.Module | None = None, expect: str = "any") -> None:
        if expect not in PATTERNS:
            raise ValueError(f"expect must be one of {PATTERNS}, got {expect!r}")
        self.model_name = type(model).__name__ if model is not None else "model"
        self.expect = expect
        self.calls: list[Call] = []
        self.flow_steps: list[DecoderStep] = []  # denoising steps of a flow backbone (note_timestep)
        self.branch: int | None = None  # the last call's CFG pass within its denoising step, if any
        self._passes = 0
        self._pass_names: tuple[str, ...] | None = None  # the passes a sampler declared it runs

    def note_timestep(self, t: float, rows: int, passes: Iterable[str] | None = None) -> None:
        """A flow model's timestep module ran (BAGEL's ``time_embedder``, before the backbone). A
        timestep other than the last opens the next denoising step; each backbone call until the next
        one is a CFG pass of that step (0 ``cond``, 1 ``uncond_text``, 2 ``uncond_image``, in the order
        they run): BAGEL embeds the timestep once and runs up to three passes, the sandbox embeds it
        in every pass — both tag alike. Rows at different timesteps (``nan``) open a step per call."""
        if not self.flow_steps or self.flow_steps[-1].timestep != t:
            self.flow_steps.append(DecoderStep(len(self.flow_steps), t, rows))
            self._passes = 0
        # a sampler that skips a pass (no text guidance, image guidance on) names the passes it runs,
        # so the image pass is tagged uncond_image, not uncond_text by its place in the order
        self._pass_names = tuple(passes) if passes is not None else None

    def _pass_branch(self, i: int) -> int:
        """The branch id (:data:`~uniprobe.hooks.rows.BRANCH_IDS`) of a denoising step's ``i``-th pass."""
        from uniprobe.hooks.rows import BRANCH_IDS

        names = self._pass_names
        if names is None:
            return i
        if i >= len(names) or names[i] not in BRANCH_IDS:
            self._fail(f"denoising pass {i} is not among the declared passes {names}", 0, 0)
        return BRANCH_IDS[names[i]]

    def begin(self, offset: int, length: int, has_cache: bool = True) -> Call:
        """Record one call; raises :class:`CallPatternError` if it breaks the expected pattern."""
        if self.flow_steps:  # a CFG pass of the current denoising step; each re-runs its whole sequence
            call = Call(self.flow_steps[-1].step, offset, length)
            self.branch, self._passes = self._pass_branch(self._passes), self._passes + 1
            self.calls.append(call)
            return call
        self.branch = None
        prev = self.calls[-1] if self.calls else None
        if offset == 0:
            if self.expect == "generation" and prev is not None:
                why = (
                    "no key/value cache (a transformers.Cache) reached block 0"
                    if not has_cache
                    else "its cache was empty"
                )
                self._fail(
                    f"call {len(self.calls)} starts a new sequence at offset 0 ({why})", offset, length
                )
            step = 0
        elif prev is None:
            step = 0  # a call over a cache filled before the capture began
        else:
            if offset != prev.offset + prev.length:
                self._fail(
                    f"call {len(self.calls)} starts at offset {offset}, but the previous call ended at "
                    f"{prev.offset + prev.length}",
                    offset,
                    length,
                )
            if self.expect == "generation" and length != 1:
                self._fail(
                    f"generation step call {len(self.calls)} runs {length} positions, not 1", offset, length
                )
            step = prev.step + 1
        call = Call(step, offset, length)
        self.calls.append(call)
        return call

    @property
    def last(self) -> Call | None:
        return self.calls[-1] if self.calls else None

    def _fail(self, what: str, offset: int, length: int) -> None:
        seen = [(c.offset, c.length) for c in self.calls[-4:]] + [(offset, length)]
        raise CallPatternError(
            f"{self.model_name} (transformers {transformers_version()}): {what}; expected pattern "
            f"{self.expect!r} ({_PATTERN_TEXT[self.expect]}); last calls as (offset, length): {seen}. "
            "Rows would be tagged with wrong steps/positions, so the capture stopped. If this model's "
            "generation loop works differently, capture it with a forward of your own (teacher-forced), "
            "or report the model class and transformers version"
        )


_PATTERN_TEXT = {
    "any": "each call starts a new sequence at offset 0 or continues the previous one",
    "generation": "one prompt pass at offset 0, then one position per call, each continuing the last",
}


def track_calls(hooks: HookSet, model: nn.Module, blocks: str, log: CallLog) -> Any:
    """Put the call tracker on block 0 of ``blocks`` (a module path) in ``hooks``; returns its handle."""

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        log.begin(*call_extent(args, kwargs, input_tensor(args, kwargs)))

    return hooks.pre(get_module(model, f"{blocks}.0"), pre_hook)


class DecoderStep(NamedTuple):
    """One forward of a diffusion decoder: denoising ``step`` (0 = its first call in the capture),
    the ``timestep`` it was given (the model's own units), the ``rows`` it ran, and ``branch``: a call
    at the same timestep as the one before is that step's next CFG branch (pipelines such as
    GLM-Image's run the conditional and unconditional passes as separate calls), else 0."""

    step: int
    timestep: float
    rows: int
    branch: int = 0


def track_timesteps(hooks: HookSet, model: nn.Module, module: str, log: CallLog) -> Any:
    """Put the flow-step tracker on the timestep ``module`` (a path; it takes the timesteps ``[rows]``
    as its first argument) in ``hooks``: every call reports its timestep to ``log.note_timestep``,
    with the CFG passes the model says it runs (its ``flow_passes`` attribute, names of
    :data:`~uniprobe.hooks.rows.BRANCH_IDS`, when it has one; else passes count in BAGEL's order)."""

    def pre_hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        t = input_tensor(args, kwargs).detach().flatten().float().cpu()
        same = t.numel() > 0 and bool((t == t[0]).all())
        passes = getattr(model, "flow_passes", None)  # set by a sampler that names its CFG passes
        log.note_timestep(float(t[0]) if same else float("nan"), int(t.numel()), passes)

    return hooks.pre(get_module(model, module), pre_hook)


def decoder_timestep(decoder: nn.Module, args: tuple, kwargs: dict) -> float:
    """The one ``timestep`` of a decoder call (``timestep`` argument, by name); every row must share it."""
    try:
        bound = inspect.signature(decoder.forward).bind_partial(*args, **kwargs).arguments
    except (TypeError, ValueError) as err:
        bound = {}
        why = f" ({err})"
    else:
        why = ""
    t = bound.get("timestep")
    if t is None:
        raise CallPatternError(
            f"{type(decoder).__name__} ({_diffusers_version()}): a decoder call without a 'timestep' "
            f"argument{why}; denoising steps cannot be tagged (is the adapter's decoder a diffusers "
            "denoiser whose forward takes timestep=?)"
        )
    t = torch.as_tensor(t).detach().flatten().float().cpu()
    if t.numel() > 1 and not bool((t == t[0]).all()):
        raise CallPatternError(
            f"{type(decoder).__name__} ({_diffusers_version()}): one decoder call ran rows at different "
            f"timesteps {t.tolist()[:8]}; a step's rows must share one timestep to be tagged by it "
            "(run one timestep per call)"
        )
    return float(t[0])


def _diffusers_version() -> str:
    try:
        return f"diffusers {importlib.metadata.version('diffusers')}"
    except importlib.metadata.PackageNotFoundError:
        return "diffusers not installed"


def track_decoder_steps(hooks: HookSet, model: nn.Module, decoder: str, steps: list[DecoderStep]) -> Any:
    """Put the denoising-step tracker on the ``decoder`` module (a path) in ``hooks``: every decoder
    forward appends a :class:`DecoderStep` to ``steps`` before its inner modules run."""
    module = get_module(model, decoder)

    def pre_hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        rows, t = int(input_tensor(args, kwargs).shape[0]), decoder_timestep(mod, args, kwargs)
        prev = steps[-1] if steps else None
        if prev is not None and prev.timestep == t:  # the same step's next guidance branch
            steps.append(DecoderStep(prev.step, t, rows, prev.branch + 1))
        else:
            steps.append(DecoderStep(prev.step + 1 if prev else 0, t, rows))

    return hooks.pre(module, pre_hook)
