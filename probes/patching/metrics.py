"""Patching metrics: model outputs (``n`` batch rows) → one float per row, ``[n]``.

Every metric is a callable ``metric(outputs) -> Tensor[n]`` with a ``name``. Where the outputs'
logits live differs by family, so each metric takes a ``logits_fn`` (default :func:`logits_of`:
``.logits``, else ``.text_logits``, else the first tuple element, else the tensor itself).
Metrics that compare to the clean run (:class:`KLToClean`) have ``prepare(clean_outputs)``, which
the sweeps call once with the clean run's outputs before any value is computed.

The sweeps normalise every metric as ``(patched − corrupted) / (clean − corrupted)`` and report
both baselines (:mod:`uniprobe.probes.patching.results`).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.nn import functional

LogitsFn = Callable[[Any], torch.Tensor]


def logits_of(outputs: Any) -> torch.Tensor:
    """The text logits ``[n, pos, vocab]`` of common output types."""
    for name in ("logits", "text_logits"):
        value = getattr(outputs, name, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        return outputs[0]
    raise TypeError(f"cannot find logits in {type(outputs).__name__}; pass logits_fn=...")


def second_output(outputs: Any) -> torch.Tensor:
    """``outputs[1]`` or ``.image_logits``: the per-cell logits of query models ``[n, cells, tiles]``."""
    value = getattr(outputs, "image_logits", None)
    if isinstance(value, torch.Tensor):
        return value
    return outputs[1]


class _Metric(abc.ABC):
    """Base: ``name``; ``last_position_only`` tells the engine the metric reads only the last
    position of the text logits (then positions before a patch need not be recomputed)."""

    name = "metric"
    position: int | None = None

    @property
    def last_position_only(self) -> bool:
        return self.position == -1 and getattr(self, "logits_fn", None) is logits_of

    @abc.abstractmethod
    def __call__(self, outputs: Any) -> torch.Tensor:
        """``outputs → [rows]``."""

    def __repr__(self) -> str:
        return self.name


class LogitDiff(_Metric):
    """``logit[target] − logit[foil]`` at one position → ``[n]``."""

    def __init__(self, target: int, foil: int, position: int = -1, logits_fn: LogitsFn = logits_of) -> None:
        self.target, self.foil, self.position, self.logits_fn = int(target), int(foil), position, logits_fn
        self.name = f"logit_diff({self.target}-{self.foil})"

    def __call__(self, outputs: Any) -> torch.Tensor:
        logits = self.logits_fn(outputs)[:, self.position].float()
        return logits[:, self.target] - logits[:, self.foil]


class TargetProb(_Metric):
    """``p(target)`` at one position, or ``p(target) − p(foil)`` with a foil → ``[n]``."""

    def __init__(
        self, target: int, foil: int | None = None, position: int = -1, logits_fn: LogitsFn = logits_of
    ) -> None:
        self.target, self.foil, self.position, self.logits_fn = int(target), foil, position, logits_fn
        self.name = f"prob({self.target})" if foil is None else f"prob_diff({self.target}-{foil})"

    def __call__(self, outputs: Any) -> torch.Tensor:
        probs = self.logits_fn(outputs)[:, self.position].float().softmax(-1)
        p = probs[:, self.target]
        return p if self.foil is None else p - probs[:, int(self.foil)]


class SequenceLogProb(_Metric):
    """Teacher-forced ``Σ_k log p(tokens[k])`` → ``[n]``.

    ``logits_fn(outputs)`` must return ``[n, k, vocab]`` aligned with ``tokens [k]`` (the logits that
    predict each token; e.g. Janus's generation head over the image positions, or
    ``shifted(start, k)`` for a causal LM whose image tokens start at ``start``).
    """

    def __init__(self, tokens: Sequence[int] | torch.Tensor, logits_fn: LogitsFn, mean: bool = False) -> None:
        self.tokens = torch.as_tensor(tokens, dtype=torch.long).flatten()
        self.logits_fn, self.mean = logits_fn, mean
        self.name = f"seq_logprob({len(self.tokens)} tokens)"

    def __call__(self, outputs: Any) -> torch.Tensor:
        logits = self.logits_fn(outputs).float()
        if logits.shape[1] != len(self.tokens):
            raise ValueError(
                f"logits_fn gave {logits.shape[1]} positions for {len(self.tokens)} target tokens"
            )
        logp = logits.log_softmax(-1)
        idx = self.tokens.to(logp.device)[None, :, None].expand(logp.shape[0], -1, 1)
        per_token = logp.gather(-1, idx).squeeze(-1)
        return per_token.mean(1) if self.mean else per_token.sum(1)


def shifted(start: int, k: int, logits_fn: LogitsFn = logits_of) -> LogitsFn:
    """Logits that predict positions ``start .. start+k-1`` of a causal LM: ``[:, start-1 : start-1+k]``."""
    if start < 1:
        raise ValueError("the first predicted position must be ≥ 1 (position 0 has no predecessor)")

    def fn(outputs: Any) -> torch.Tensor:
        return logits_fn(outputs)[:, start - 1 : start - 1 + k]

    return fn


class GridLogProb(_Metric):
    """Mean over cells of ``log p(target tile)`` from a grid decoder's per-cell logits → ``[n]``.

    ``cell_logits_fn(outputs)`` maps the model outputs to ``[n, cells, tiles]`` (query models:
    ``decoder.out``; default :func:`second_output`). ``target [cells]`` is the tile per cell.
    """

    def __init__(
        self, target: Sequence[int] | torch.Tensor, cell_logits_fn: LogitsFn = second_output
    ) -> None:
        self.target = torch.as_tensor(target, dtype=torch.long).flatten()
        self.cell_logits_fn = cell_logits_fn
        self.name = f"grid_logprob({len(self.target)} cells)"

    def distribution(self, outputs: Any) -> torch.Tensor:
        """``[n, cells, tiles]`` per-cell tile probabilities."""
        return self.cell_logits_fn(outputs).float().softmax(-1)

    def __call__(self, outputs: Any) -> torch.Tensor:
        logits = self.cell_logits_fn(outputs).float()
        if logits.shape[1] != len(self.target):
            raise ValueError(
                f"cell_logits_fn gave {logits.shape[1]} cells for a target of {len(self.target)}"
            )
        idx = self.target.to(logits.device)[None, :, None].expand(logits.shape[0], -1, 1)
        return logits.log_softmax(-1).gather(-1, idx).squeeze(-1).mean(1)


class KLToClean(_Metric):
    """``KL(clean ‖ patched)`` of the next-token (or per-cell) distribution → ``[n]``.

    ``position=None`` averages over every position ``logits_fn`` returns (all cells of a grid).
    Normalised, 1 means the clean distribution is fully restored (its KL is 0).
    """

    def __init__(self, logits_fn: LogitsFn = logits_of, position: int | None = -1) -> None:
        self.logits_fn, self.position = logits_fn, position
        self.clean: torch.Tensor | None = None
        self.name = "kl_to_clean"

    def _logp(self, outputs: Any) -> torch.Tensor:
        logits = self.logits_fn(outputs).float()
        if logits.dim() == 3 and self.position is not None:
            logits = logits[:, self.position]
        return logits.log_softmax(-1)

    def prepare(self, clean_outputs: Any) -> None:
        """Remember the clean distribution (batch mean over examples is not taken: row-wise)."""
        self.clean = self._logp(clean_outputs).detach()

    def __call__(self, outputs: Any) -> torch.Tensor:
        if self.clean is None:
            raise RuntimeError("KLToClean needs prepare(clean_outputs) first (the sweeps do this)")
        logp = self._logp(outputs)
        ref = self.clean.to(logp.device)
        if ref.shape[0] != logp.shape[0]:  # n patched rows of B examples: row i·B + b ↔ example b
            ref = ref.repeat(logp.shape[0] // ref.shape[0], *([1] * (ref.dim() - 1)))
        kl = functional.kl_div(logp, ref, log_target=True, reduction="none").sum(-1)
        return kl.reshape(kl.shape[0], -1).mean(1)


class JudgeRate(_Metric):
    """A pluggable judge on generated tokens: ``judge(tokens [k]) -> bool`` per row → ``[n]`` (0/1)."""

    def __init__(self, judge: Callable[[torch.Tensor], bool], name: str = "judge") -> None:
        self.judge, self.name = judge, name

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.tensor([float(bool(self.judge(row))) for row in tokens])


def metric_name(metric: Any) -> str:
    """A metric's name for reports."""
    return str(getattr(metric, "name", getattr(metric, "__name__", type(metric).__name__)))
