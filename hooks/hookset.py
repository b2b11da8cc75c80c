"""HookSet: register forward / pre hooks on modules, and always remove every one of them.

The one place in uniprobe that installs hooks (capture, the call tracker and every patching
context build on it), in the style of baukit's ``nethook``::

    with HookSet() as hooks:
        hooks.read(model, Site("model.layers.3"), seen.append)        # keep a block's output
        hooks.write(model, Site("model.layers.5", "input"), lambda t: t * 0)  # zero an input
        model(**inputs)
    # every handle is gone here, also when the forward raised

A subclass registers its hooks in :meth:`HookSet.install`; ``__enter__`` calls it and, if it
raises half-way, removes what it had registered before re-raising. Replaced ``forward`` methods
(:meth:`HookSet.swap_forward`) are restored the same way.

Site read/write helpers live here too, side by side, so that reading and writing a site can
never disagree about which tensor "the" tensor of a module call is:

- :func:`input_tensor` / :func:`replace_input`: the hidden-state input of a call (first positional
  tensor, else ``hidden_states``, else the first floating tensor keyword);
- :func:`pick` / :func:`replace_output`: the tensor in a module's output (a tensor, element
  ``index`` of a tuple/list, or a field of a ``ModelOutput``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn
from uniprobe.hooks.adapters.base import Site, get_module

PreHook = Callable[[nn.Module, tuple, dict], "tuple[tuple, dict] | None"]
PostHook = Callable[[nn.Module, tuple, Any], Any]
H = TypeVar("H", bound="HookSet")

# -- reading and writing the tensor of a site --------------------------------------------------------


def pick(value: Any, index: int | None) -> torch.Tensor:
    """The tensor inside a module input/output (tuples and ModelOutputs unwrapped)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, dict):  # ModelOutput is a dict
        value = tuple(value.values())
    if isinstance(value, (tuple, list)):
        t = value[index or 0]
        if isinstance(t, torch.Tensor):
            return t
    raise TypeError(f"hook expected a tensor (or a tuple holding one), got {type(value).__name__}")


def replace_output(output: Any, index: int | None, new: torch.Tensor) -> Any:
    """``output`` with the tensor :func:`pick` would read swapped for ``new``."""
    if isinstance(output, torch.Tensor):
        return new
    if isinstance(output, tuple):
        i = index or 0
        return (*output[:i], new, *output[i + 1 :])
    if isinstance(output, list):
        i = index or 0
        return [*output[:i], new, *output[i + 1 :]]
    if isinstance(output, dict):  # a ModelOutput: write in place (its class rebuilds poorly)
        pick(output, index).copy_(new)
        return output
    raise TypeError(f"cannot patch a module output of type {type(output).__name__}")


def input_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    """First tensor argument of a module call (positional, else ``hidden_states`` or first tensor kwarg)."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return kwargs["hidden_states"]
    for v in kwargs.values():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v
    raise TypeError("hooked module was called without a tensor input")


def replace_input(args: tuple, kwargs: dict, new: torch.Tensor) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of a module call with the tensor :func:`input_tensor` reads swapped for ``new``."""
    if args and isinstance(args[0], torch.Tensor):
        return (new, *args[1:]), kwargs
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return args, {**kwargs, "hidden_states": new}
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return args, {**kwargs, key: new}
    raise TypeError("hooked module was called without a tensor input")


# -- the hook set ------------------------------------------------------------------------------------


class HookSet:
    """Hooks and replaced ``forward`` s that all go away on exit (also on error).

    Use it directly (``with HookSet() as hooks: hooks.read(...)``) or subclass it and register
    in :meth:`install`. Every registration returns the torch handle, but callers never need to
    remove one themselves.
    """

    def __init__(self) -> None:
        self._handles: list[Any] = []
        self._forwards: list[tuple[nn.Module, Any]] = []  # (module, its own forward attribute or None)
        self._held: list[HookSet] = []  # other sets entered by this one (see hold)

    # -- lifecycle ------------------------------------------------------------------------------
    def install(self) -> None:
        """Register this set's hooks (subclasses); called by ``__enter__``."""

    def __enter__(self: H) -> H:
        try:
            self.install()
        except BaseException:
            self.remove()  # a half-installed set must not outlive the failed enter
            raise
        return self

    def __exit__(self, exc_type: object = None, *exc: object) -> None:
        try:
            if exc_type is None:  # a held set's own checks (e.g. every attention call intercepted)
                for sub in self._held:
                    getattr(sub, "check", lambda: None)()
        finally:
            self.remove()

    def hold(self, sub: HookSet) -> HookSet:
        """Enter another set now and remove it with this one (its ``check()`` runs on a clean exit)."""
        sub.__enter__()
        self._held.append(sub)
        return sub

    def remove(self) -> None:
        """Remove every hook and restore every replaced ``forward`` (idempotent)."""
        for sub in reversed(self._held):
            sub.remove()
        self._held.clear()
        for h in self._handles:
            h.remove()
        self._handles.clear()
        # newest first, so a module swapped twice ends with its original forward
        for module, fwd in reversed(self._forwards):
            if fwd is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = fwd
        self._forwards.clear()

    # -- raw hooks ------------------------------------------------------------------------------
    def pre(self, module: nn.Module, fn: PreHook) -> Any:
        """A forward pre-hook ``fn(module, args, kwargs)``; returning ``(args, kwargs)`` replaces them."""
        handle = module.register_forward_pre_hook(fn, with_kwargs=True)
        self._handles.append(handle)
        return handle

    def post(self, module: nn.Module, fn: PostHook) -> Any:
        """A forward hook ``fn(module, args, output)``; returning a value replaces the output."""
        handle = module.register_forward_hook(fn)
        self._handles.append(handle)
        return handle

    def swap_forward(self, module: nn.Module, forward: Callable[..., Any]) -> None:
        """Replace ``module.forward`` by ``forward`` until the set is removed."""
        self._forwards.append((module, module.__dict__.get("forward")))
        module.forward = forward

    # -- site hooks -----------------------------------------------------------------------------
    def read(self, model: nn.Module, site: Site, fn: Callable[[torch.Tensor], None]) -> Any:
        """Call ``fn(tensor)`` with the site's tensor (``[batch, pos, *feat]`` for stream sites) each
        time its module runs."""
        module = get_module(model, site.module)
        # wrapped so that whatever fn returns, the hook returns None (a read never replaces)
        if site.io == "input":

            def pre(mod: nn.Module, args: tuple, kwargs: dict) -> None:
                fn(input_tensor(args, kwargs))

            return self.pre(module, pre)
        index = site.index

        def post(mod: nn.Module, args: tuple, output: Any) -> None:
            fn(pick(output, index))

        return self.post(module, post)

    def write(self, model: nn.Module, site: Site, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
        """Replace the site's tensor by ``fn(tensor)`` (same shape) each time its module runs."""
        module = get_module(model, site.module)
        if site.io == "input":

            def pre(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
                return replace_input(args, kwargs, fn(input_tensor(args, kwargs)))

            return self.pre(module, pre)
        index = site.index

        def post(mod: nn.Module, args: tuple, output: Any) -> Any:
            return replace_output(output, index, fn(pick(output, index)))

        return self.post(module, post)
