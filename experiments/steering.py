"""Steering one prompt of a loaded model along a direction: what ``uniprobe steer`` and the sweep's
``steer`` analysis run.

    res = steer_prompt(loaded, "draw 2 + 1", points="blocks.*.resid_pre", alphas=[0, 2, 4, 8],
                       target="3", foil="4", toward="draw 3", away="draw 4")
    res.write("artifacts/steer")      # steer.json, steer.safetensors, steer.png (point × alpha)

The direction comes from exactly one source: a saved probe (``probe=DIR`` with ``probe_role`` and
``cls``: :func:`uniprobe.probes.attention.probe_direction`), two prompts (``toward`` − ``away``: each point's
captured state at the last position, :func:`~uniprobe.probes.attention.state_at`), or two activation
stores (``stores=(A, B)``: :func:`~uniprobe.probes.attention.mean_difference`). The metric is the logit
difference target − foil at the last position; the sweep over ``points × alphas`` is batched
(:func:`uniprobe.probes.attention.steer_sweep`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from uniprobe.experiments import tokens
from uniprobe.experiments.models import LoadedModel
from uniprobe.experiments.patching import example, token_id
from uniprobe.hooks.errors import UsageError
from uniprobe.probes.attention import SteerResult


@dataclass
class PromptSteer:
    """A steered prompt: the sweep's result plus what the prompt, tokens and direction were."""

    result: SteerResult
    data: dict[str, Any]
    title: str
    files: dict[str, Path] = field(default_factory=dict)

    def write(self, out: str | Path) -> dict[str, Path]:
        """Write ``steer.json`` (+ prompt, metric, direction), ``steer.safetensors`` and ``steer.png``."""
        from uniprobe.hooks.jsonio import write_json

        saved = self.result.save(out)
        write_json(saved["json"], {**self.result.to_dict(), **self.data})
        self.files = {**saved, "png": figure(self.result, Path(out) / "steer.png", self.title)}
        return self.files


def figure(result: SteerResult, path: Path, title: str) -> Path:
    """Heatmap ``point × alpha`` of the metric's change from the plain run (0 at alpha = 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    delta = (result.values - result.plain).numpy()
    top = float(abs(delta).max()) or 1.0
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * len(result.alphas), 1.2 + 0.35 * len(result.points)))
    im = ax.imshow(delta, cmap="RdBu_r", vmin=-top, vmax=top, aspect="auto", origin="lower")
    ax.set_xticks(range(len(result.alphas)), [f"{a:g}" for a in result.alphas])
    ax.set_yticks(range(len(result.points)), result.points)
    ax.set_xlabel("alpha")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label=f"{result.metric} − plain run")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _directions(
    loaded: LoadedModel,
    points: list[str],
    probe: str | None,
    probe_role: str | None,
    cls: str | None,
    toward: str | None,
    away: str | None,
    stores: Sequence[str] | None,
    store_role: str | None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from uniprobe.probes.attention import mean_difference, probe_direction, state_at

    chosen = [
        name for name, on in (("probe", probe), ("toward/away", toward or away), ("stores", stores)) if on
    ]
    if len(chosen) != 1:
        raise UsageError(
            "give exactly one direction source: --probe DIR (with --probe-role and --class), "
            f"--toward TEXT --away TEXT, or --stores A B (got {', '.join(chosen) or 'none'})"
        )
    model, adapter = loaded.model, loaded.adapter
    if probe:
        from uniprobe.probes.results import ProbeResults

        if not probe_role:
            raise UsageError("--probe needs --probe-role (the role the probe read, e.g. text)")
        results = ProbeResults.load(probe)
        classes = [str(c) for c in results.meta.get("classes", [])]
        label = None
        if cls is not None:
            if str(cls) not in classes:
                raise UsageError(f"--class {cls!r} is not one of the probe's classes {classes}")
            label = results.meta["classes"][classes.index(str(cls))]
        try:
            dirs = {p: probe_direction(results, p, probe_role, label) for p in points}
        except KeyError as err:  # the probe was not trained at a steered point / role
            raise UsageError(
                f"--probe {probe}: {err.args[0]}; steer the points the probe read (--points)"
            ) from err
        return dirs, {"source": "probe", "probe": str(probe), "role": probe_role, "class": cls}
    if toward or away:
        if not (toward and away):
            raise UsageError("--toward and --away go together (the direction is toward − away)")
        a, b = (adapter.prepare(model, [example(loaded, t)]) for t in (toward, away))
        dirs = {
            p: state_at(model, a, p, -1, adapter=adapter) - state_at(model, b, p, -1, adapter=adapter)
            for p in points
        }
        return dirs, {"source": "states", "toward": toward, "away": away, "position": "last"}
    from uniprobe.hooks.store import ActivationStore

    if len(stores) != 2:
        raise UsageError(
            f"--stores takes two store folders (A B: the direction is mean A − mean B), got {len(stores)}"
        )
    sa, sb = (ActivationStore.open(s) for s in stores)
    try:
        dirs = {p: mean_difference(sa, sb, p, store_role) for p in points}
    except (KeyError, ValueError) as err:  # a point or role the stores do not hold
        raise UsageError(f"--stores: {err}; steer the points the stores hold (--points)") from err
    return dirs, {"source": "stores", "stores": [str(s) for s in stores], "role": store_role}


def steer_prompt(
    loaded: LoadedModel,
    prompt: str,
    *,
    points: str | Sequence[str],
    alphas: Sequence[float],
    target: str | int,
    foil: str | int,
    probe: str | None = None,
    probe_role: str | None = None,
    cls: str | None = None,
    toward: str | None = None,
    away: str | None = None,
    stores: Sequence[str] | None = None,
    store_role: str | None = None,
    role: str | None = None,
    positions: Sequence[int] | None = None,
    budget_mb: float = 512.0,
    name: str | None = None,
) -> PromptSteer:
    """Steer ``prompt`` at every ``points × alphas`` (see the module docstring) → :class:`PromptSteer`.

    ``points``: hook points or globs (``blocks.*.resid_pre``); ``role`` / ``positions``: where to add the
    direction (default: every position); ``target`` / ``foil``: one-token words or ``id:N``.
    """
    from uniprobe.probes.attention import steer_sweep
    from uniprobe.probes.patching import LogitDiff

    if not alphas:
        raise UsageError("--alphas needs at least one value (0 is the plain run)")
    model, adapter = loaded.model, loaded.adapter
    point_list = adapter.expand(model, points)
    target_id, foil_id = token_id(loaded, target), token_id(loaded, foil)
    dirs, source = _directions(loaded, point_list, probe, probe_role, cls, toward, away, stores, store_role)
    inputs = adapter.prepare(model, [example(loaded, prompt)])
    result = steer_sweep(
        model, inputs, dirs, alphas, point_list, LogitDiff(target_id, foil_id), role=role,
        positions=positions, adapter=adapter, budget_bytes=int(budget_mb * 2**20),
    )  # fmt: skip
    t_text, f_text = tokens.token_str(loaded, target_id), tokens.token_str(loaded, foil_id)
    name = loaded.spec if name is None else name
    data = {
        "model": name,
        "prompt": prompt,
        "where": {"role": role, "positions": None if positions is None else list(positions)},
        "direction": {**source, "norms": {p: float(d.norm()) for p, d in dirs.items()}},
        "target": {"text": t_text, "given": str(target), "id": target_id},
        "foil": {"text": f_text, "given": str(foil), "id": foil_id},
    }
    return PromptSteer(result, data, f"{name}: steering ({source['source']}), logit {t_text!r} − {f_text!r}")
