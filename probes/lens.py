"""Logit lens at any position: decode the residual stream of every layer through the model's readout.

The readout is the model's final norm followed by its text unembedding, found through the adapter
(``adapter.final_norm``, ``adapter.lm_head``). Decoding the last block's output gives the model's own
logits; decoding earlier blocks asks what the stream "says" there. Positions of any role can be
decoded — prompt text, the learnable query tokens of a query-based model, the image positions being
generated — which makes this the direct test of a latent chain of thought: do the query tokens spell
"3" or "banana" in the middle layers?

For each decoded position and answer token the lens reports the token's rank (1 = top) and
probability; :meth:`LensResult.summary` averages them per lens × layer × role × token, and
``kl`` holds KL(final ‖ lens) per layer. A :class:`uniprobe.probes.tuned_lens.TunedLens` passed as ``tuned``
adds the same rows for the tuned lens, beside the logit lens.

    res = logit_lens(model, adapter.prepare(model, examples), answers=[17])
    res = logit_lens_store(store, model, answers="answer_token")   # from captured residual states
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from uniprobe.hooks.adapters import Adapter, ModelInputs, adapter_for, get_module
from uniprobe.hooks.backends import run_capture
from uniprobe.hooks.layout import ROLES
from uniprobe.hooks.points import layer_of
from uniprobe.hooks.rows import Rows
from uniprobe.hooks.store import ActivationStore
from uniprobe.probes.lens_result import LensResult

NORMED_POINTS = ("final_norm", "lm_head.in")  # already through the final norm: decode with the head only
DEFAULT_ROLES = tuple(r for r in ROLES if r != "pad")


@dataclass
class Readout:
    """The model's decoder of the residual stream: ``logits = head(norm(h))``."""

    norm: nn.Module
    head: nn.Module

    def __call__(self, h: Tensor, normed: bool = False) -> Tensor:
        """``h`` ``[..., d]`` → logits ``[..., V]`` (``normed``: ``h`` is already the norm's output)."""
        h = h.to(_dtype(self.head))
        return self.head(h if normed else self.norm(h)).float()

    def frozen(self) -> _Frozen:
        """Context: the readout's parameters do not collect gradients (tuned-lens training)."""
        return _Frozen([*self.norm.parameters(), *self.head.parameters()])


class _Frozen:
    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params = params
        self.flags = [p.requires_grad for p in params]

    def __enter__(self) -> None:
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc: object) -> None:
        for p, flag in zip(self.params, self.flags):
            p.requires_grad_(flag)


def _dtype(module: nn.Module) -> torch.dtype:
    p = next(module.parameters(), None)
    return p.dtype if p is not None else torch.float32


def readout(model: nn.Module, adapter: Adapter | None = None) -> Readout:
    """The final norm and text unembedding of ``model`` (module paths from its adapter)."""
    adapter = adapter or adapter_for(model)
    return Readout(get_module(model, adapter.final_norm), get_module(model, adapter.lm_head))


def point_layer(point: str) -> int:
    """Layer index of a lens point: the block index; ``embed`` is ``-1``; other points ``10**6``."""
    layer = layer_of(point)
    if layer is not None:
        return layer
    return -1 if point == "embed" else 10**6


# -- decoding -------------------------------------------------------------------------------------


def _answer_lookup(answers: Any, n_examples: int | None) -> Callable[[int], list[int]]:
    """``answers``: token ids for every example, or one list per example → ``example -> [ids]``."""
    items = list(answers)
    if not items:
        raise ValueError("answers is empty: give at least one answer token id")
    if all(isinstance(a, int) for a in items):
        return lambda e: items
    per = [[int(t) for t in ([a] if isinstance(a, int) else a)] for a in items]
    if n_examples is not None and len(per) != n_examples:
        raise ValueError(f"answers has {len(per)} per-example entries for {n_examples} examples")
    return lambda e: per[e]


@torch.no_grad()
def decode_rows(
    read: Readout,
    states: dict[str, Rows],
    answers: Callable[[int], list[int]],
    *,
    final: Rows | None = None,
    translate: Callable[[str, Tensor], Tensor] | None = None,
    lens: str = "logit",
    example_ids: Sequence[Any] | None = None,
    token_str: Callable[[int], str] | None = None,
    chunk: int = 2048,
) -> tuple[list[dict], list[dict]]:
    """Decode captured rows through the readout.

    Args:
        states: point → :class:`Rows` (``values`` ``[n, d]``) of residual states.
        answers: example index → answer token ids to report.
        final: rows of the last block's output at the same (example, pos, step, branch), for KL.
        translate: ``(point, h [n, d]) -> h'`` applied before the readout (a tuned lens).
        example_ids: names for example indices in the output rows.

    Returns:
        (per-position rows, per-point KL rows).
    """
    rows: list[dict] = []
    kls: list[dict] = []
    final_index = row_index(final) if final is not None else None
    for point, r in states.items():
        layer = point_layer(point)
        kl_sum, kl_n = 0.0, 0
        for start in range(0, len(r), chunk):
            sl = slice(start, start + chunk)
            h = r.values[sl].float()
            if translate is not None:
                h = translate(point, h)
            logits = read(h, normed=point in NORMED_POINTS)  # [c, V]
            logp = torch.log_softmax(logits, -1)
            top = logits.argmax(-1)
            ex, pos, role, step = (r.example[sl], r.pos[sl], r.role[sl], r.step[sl])
            if final_index is not None:
                idx = torch.tensor(
                    [
                        final_index.get(k, -1)
                        for k in zip(ex.tolist(), pos.tolist(), step.tolist(), r.branch[sl].tolist())
                    ]
                )
                ok = idx >= 0
                if bool(ok.any()):
                    ref = torch.log_softmax(read(final.values[idx[ok]].float()), -1)
                    kl = (ref.exp() * (ref - logp[ok])).sum(-1)
                    kl_sum += float(kl.sum())
                    kl_n += int(ok.sum())
            toks = [answers(int(e)) for e in ex.tolist()]
            width = max(len(t) for t in toks)
            tok = torch.tensor([t + [-1] * (width - len(t)) for t in toks])  # [c, A], -1 pads
            safe = tok.clamp_min(0)
            picked = logits.gather(1, safe)  # [c, A]
            rank = torch.stack([(logits > picked[:, j : j + 1]).sum(-1) + 1 for j in range(width)], 1)
            prob = logp.gather(1, safe).exp()
            names = [example_ids[e] if example_ids is not None else e for e in ex.tolist()]
            for i, (e_name, p_i, ro, st, tp) in enumerate(
                zip(names, pos.tolist(), role.tolist(), step.tolist(), top.tolist())
            ):
                for j, t in enumerate(toks[i]):
                    rows.append(
                        {
                            "lens": lens,
                            "point": point,
                            "layer": layer,
                            "example": e_name,
                            "pos": p_i,
                            "role": ROLES[ro],
                            "step": st,
                            "token": t,
                            "token_str": token_str(t) if token_str else None,
                            "rank": int(rank[i, j]),
                            "prob": float(prob[i, j]),
                            "top_token": tp,
                        }
                    )
        if kl_n:
            kls.append({"lens": lens, "point": point, "layer": layer, "kl": kl_sum / kl_n, "n": kl_n})
    return rows, kls


def row_index(r: Rows) -> dict[tuple[int, int, int, int], int]:
    """``(example, pos, step, branch)`` → row number of ``r``."""
    keys = zip(r.example.tolist(), r.pos.tolist(), r.step.tolist(), r.branch.tolist())
    return {k: i for i, k in enumerate(keys)}


def last_block(n_layers: int) -> str:
    return f"blocks.{n_layers - 1}.resid_post"


def capture_states(
    model: nn.Module,
    inputs: ModelInputs,
    adapter: Adapter,
    points: str | Iterable[str],
    *,
    roles: Iterable[str] | None = DEFAULT_ROLES,
    generate: bool = False,
    branch: str | int | None = "cond",
    backend: str = "torch",
) -> tuple[list[str], dict[str, Rows], Rows]:
    """One capture of ``points`` plus the last block's output (what every lens is compared to).

    Returns ``(names, {point: Rows}, final Rows)``; rows ``[n, d_model]`` of the chosen branch.
    """
    names = adapter.expand(model, points)
    final_point = last_block(adapter.n_layers(model))
    cap = run_capture(
        model,
        inputs,
        list(dict.fromkeys([*names, final_point])),
        adapter=adapter,
        backend=backend,
        roles=roles,
        generate=generate,
    )
    return names, {p: cap.rows(p, branch=branch) for p in names}, cap.rows(final_point, branch=branch)


def logit_lens(
    model: nn.Module,
    inputs: ModelInputs,
    answers: Sequence[int] | Sequence[Sequence[int]],
    *,
    adapter: Adapter | None = None,
    points: str | Iterable[str] = "blocks.*.resid_post",
    roles: Iterable[str] | None = DEFAULT_ROLES,
    generate: bool = False,
    branch: str | int | None = "cond",
    backend: str = "torch",
    tuned: Any = None,
    example_ids: Sequence[Any] | None = None,
    token_str: Callable[[int], str] | None = None,
) -> LensResult:
    """Run ``model`` on prepared ``inputs`` and decode every layer at the selected positions.

    Args:
        inputs: from ``adapter.prepare(model, examples)``; its layout gives each position's role.
        answers: token ids reported at every position, or one list per example of the batch.
        points: residual points to decode (``"blocks.*.resid_post"``; ``embed`` gives layer -1).
        roles: positions to decode by role (default: all but padding); ``generate=True`` runs the
            adapter's image generation and decodes the generated positions too (role ``image_gen``).
        tuned: a :class:`uniprobe.probes.tuned_lens.TunedLens`: its readings are added as
            ``lens="tuned"`` rows.

    Returns:
        :class:`LensResult` with rows for the logit lens (and the tuned lens).
    """
    adapter = adapter or adapter_for(model)
    names, states, final = capture_states(
        model, inputs, adapter, points, roles=roles, generate=generate, branch=branch, backend=backend
    )
    n_ex = inputs.layout.batch
    meta = {
        "model_class": type(model).__name__,
        "adapter": adapter.name,
        "points": names,
        "answers": list(answers),
    }
    return _decode_all(
        readout(model, adapter), states, final, answers, n_ex, tuned, example_ids, token_str, meta
    )


def logit_lens_store(
    store: ActivationStore | str | os.PathLike,
    model: nn.Module,
    answers: Sequence[int] | Sequence[Sequence[int]] | str,
    *,
    adapter: Adapter | None = None,
    points: str | Iterable[str] = "blocks.*.resid_post",
    roles: Iterable[str] | None = DEFAULT_ROLES,
    step: int | Iterable[int] | None = None,
    branch: str | int | None = "cond",
    tuned: Any = None,
    token_str: Callable[[int], str] | None = None,
) -> LensResult:
    """The logit lens on residual states already in a store, decoded with ``model``'s readout.

    Args:
        answers: token ids for every example, one list per example, or a label key of the store
            whose values are token ids (an int or a list per example).
        points: the store's residual points to decode; KL needs the last block's output
            (``blocks.{L-1}.resid_post``) in the store too.
    """
    from uniprobe.hooks.points import expand

    if not isinstance(store, ActivationStore):
        store = ActivationStore.open(store)
    adapter = adapter or adapter_for(model)
    names = expand(points, store.points)
    if isinstance(answers, str):
        values = store.labels(answers)
        missing = [i for i, v in enumerate(values) if v is None]
        if missing:
            raise ValueError(
                f"label {answers!r} is missing on examples {missing[:5]}; every example needs one"
            )
        answers = [[int(v)] if isinstance(v, int) else [int(t) for t in v] for v in values]
    states = {p: store.rows(p, roles=roles, step=step, branch=branch) for p in names}
    final_point = last_block(adapter.n_layers(model))
    final = (
        store.rows(final_point, roles=roles, step=step, branch=branch)
        if final_point in store.points
        else None
    )
    ids = [ex["id"] for ex in store.examples]
    meta = {"store": str(store.path), "adapter": adapter.name, "points": names}
    return _decode_all(
        readout(model, adapter), states, final, answers, store.n_examples, tuned, ids, token_str, meta
    )


def _decode_all(
    read: Readout,
    states: dict[str, Rows],
    final: Rows | None,
    answers: Any,
    n_ex: int,
    tuned: Any,
    example_ids: Sequence[Any] | None,
    token_str: Callable[[int], str] | None,
    meta: dict,
) -> LensResult:
    lookup = _answer_lookup(answers, n_ex)
    rows, kl = decode_rows(read, states, lookup, final=final, example_ids=example_ids, token_str=token_str)
    if tuned is not None:
        known = {p: r for p, r in states.items() if p in tuned.points}
        t_rows, t_kl = decode_rows(
            read,
            known,
            lookup,
            final=final,
            translate=tuned.translate,
            lens="tuned",
            example_ids=example_ids,
            token_str=token_str,
        )
        rows += t_rows
        kl += t_kl
    return LensResult(rows, kl, meta)
