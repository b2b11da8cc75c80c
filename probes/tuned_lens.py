"""Tuned lens: a learned affine translator per layer before the model's readout (Belrose et al. 2023).

For a layer's residual state ``h`` ``[d]`` the translator gives ``h + A h + b`` (``A`` ``[d, d]``
and ``b`` ``[d]`` start at zero, so an untrained tuned lens *is* the logit lens); the model's final
norm and unembedding then decode it. Translators are trained, all layers at once, to minimise
KL(final ‖ lens) on a store's or a capture's positions, where "final" is the readout of the last
block's output at the same position. Training is seeded; a held-out share of the examples measures
the KL of both lenses, which :func:`train_tuned_lens` reports per layer.

    tl, report = tuned_lens_from_store(store, model)           # residual states from a store
    tl, report = tuned_lens_from_capture(model, inputs)       # or from one forward pass
    logit_lens(model, inputs, answers, tuned=tl)              # logit and tuned lens side by side
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from uniprobe.hooks.adapters import Adapter, ModelInputs, adapter_for
from uniprobe.hooks.jsonio import write_json
from uniprobe.hooks.results_io import SavedFiles, result_dir, result_file
from uniprobe.hooks.rows import Rows
from uniprobe.hooks.store import ActivationStore
from uniprobe.hooks.store.files import save_safetensors
from uniprobe.probes.lens import (
    DEFAULT_ROLES,
    Readout,
    capture_states,
    last_block,
    point_layer,
    readout,
    row_index,
)


class TunedLens(nn.Module):
    """Affine translators, one per point: ``h ↦ h + h @ weight[i].T + bias[i]``.

    Attributes:
        points: the residual points translated (``blocks.3.resid_post``, ...).
        weight: ``[L, d, d]``; bias: ``[L, d]`` (zeros: the logit lens).
    """

    def __init__(self, points: Iterable[str], d_model: int) -> None:
        super().__init__()
        self.points = list(points)
        self.weight = nn.Parameter(torch.zeros(len(self.points), d_model, d_model))
        self.bias = nn.Parameter(torch.zeros(len(self.points), d_model))

    def translate(self, point: str, h: Tensor) -> Tensor:
        """``h`` ``[n, d]`` at ``point`` → translated ``[n, d]``."""
        if point not in self.points:
            raise KeyError(f"the tuned lens has no translator for {point!r}; it has {self.points}")
        i = self.points.index(point)
        h = h.to(self.weight.dtype)
        return h + h @ self.weight[i].T + self.bias[i]

    @property
    def d_model(self) -> int:
        return int(self.bias.shape[1])

    def to_dict(self) -> dict:
        """``{"points", "d_model", "format"}``: what ``tuned_lens.json`` holds (the weights are tensors)."""
        return {
            "points": list(self.points),
            "d_model": self.d_model,
            "format": "h' = h + h @ weight[i].T + bias[i] for the i-th point; weight [L, d, d], bias [L, d]",
        }

    def save(self, path: str | os.PathLike) -> SavedFiles:
        """Write the translators.

        ``path`` ending in ``.safetensors``: that one file (``weight`` ``[L, d, d]``, ``bias`` ``[L, d]``,
        the points in its metadata). Otherwise ``path`` is a folder: ``tuned_lens.safetensors`` and
        ``tuned_lens.json`` (:meth:`to_dict`) in it, as every result saves.
        """
        path = Path(path)
        if path.suffix == ".safetensors":
            self._save_tensors(path)
            return SavedFiles(path.parent, {"tensors": path})
        out = result_dir(path)
        files = {"tensors": out / TENSORS, "json": out / "tuned_lens.json"}
        self._save_tensors(files["tensors"])
        write_json(files["json"], self.to_dict())
        return SavedFiles(out, files)

    def _save_tensors(self, path: Path) -> None:
        tensors = {"weight": self.weight.detach().contiguous(), "bias": self.bias.detach().contiguous()}
        # through a temp file: atomic, and the umask's mode (save_file alone leaves it 0600)
        save_safetensors(path, tensors, metadata={"points": json.dumps(self.points)}, what="tuned lens")

    @classmethod
    def load(cls, path: str | os.PathLike) -> TunedLens:
        """Read a lens :meth:`save` wrote: a ``.safetensors`` file or a folder holding one."""
        from safetensors import safe_open

        path = Path(path)
        if path.is_dir() or path.suffix != ".safetensors":
            path = result_file(path, TENSORS)
        with safe_open(str(path), framework="pt") as f:
            points = json.loads((f.metadata() or {})["points"])
        tensors = load_file(str(path))
        lens = cls(points, tensors["bias"].shape[1])
        with torch.no_grad():
            lens.weight.copy_(tensors["weight"])
            lens.bias.copy_(tensors["bias"])
        return lens


TENSORS = "tuned_lens.safetensors"  # the tensors' file name inside a saved folder


def _align(states: dict[str, Rows], final: Rows) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """States and final rows at the same (example, pos, step, branch) keys.

    Returns ``{point: [n, d]}``, the final states ``[n, d]`` and the example index ``[n]``.
    """
    index = row_index(final)
    common = None
    maps = {}
    for p, r in states.items():
        keys = list(zip(r.example.tolist(), r.pos.tolist(), r.step.tolist(), r.branch.tolist()))
        maps[p] = {k: i for i, k in enumerate(keys)}
        common = set(keys) if common is None else common & set(keys)
    keys = sorted((common or set()) & set(index))
    if not keys:
        raise ValueError("no positions are shared by the layers and the last block; capture them together")
    xs = {p: states[p].values[torch.tensor([maps[p][k] for k in keys])].float() for p in states}
    fin = final.values[torch.tensor([index[k] for k in keys])].float()
    return xs, fin, torch.tensor([k[0] for k in keys])


def train_tuned_lens(
    read: Readout,
    states: dict[str, Rows],
    final: Rows,
    *,
    steps: int = 300,
    lr: float = 1e-3,
    batch: int = 256,
    holdout: float = 0.25,
    seed: int = 0,
) -> tuple[TunedLens, list[dict]]:
    """Fit translators for ``states`` (point → rows ``[n, d]``) against the readout of ``final``.

    Examples (not positions) are split: ``holdout`` of them only measure the KL of the logit and the
    tuned lens per layer. Adam, ``steps`` full steps on batches of ``batch`` positions, seeded.

    Returns:
        the :class:`TunedLens` and report rows ``{"lens", "point", "layer", "kl", "n", "split"}``.
    """
    xs, fin, example = _align(states, final)
    gen = torch.Generator().manual_seed(seed)
    exs = example.unique()
    perm = exs[torch.randperm(len(exs), generator=gen)]
    n_hold = int(round(holdout * len(exs))) if len(exs) > 1 else 0
    held = torch.isin(example, perm[:n_hold])
    train_idx = (~held).nonzero().flatten()
    points = list(xs)
    lens = TunedLens(points, fin.shape[1])
    with torch.no_grad():
        target = torch.log_softmax(read(fin), -1)  # [n, V]
    opt = torch.optim.Adam(lens.parameters(), lr=lr)
    with read.frozen(), torch.enable_grad():
        for _ in range(steps):
            pick = train_idx[torch.randint(len(train_idx), (min(batch, len(train_idx)),), generator=gen)]
            ref = target[pick]
            loss = torch.zeros(())
            for p in points:
                logp = torch.log_softmax(read(lens.translate(p, xs[p][pick])), -1)
                loss = loss + (ref.exp() * (ref - logp)).sum(-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    report = []
    with torch.no_grad():
        for split, mask in (("heldout", held), ("train", ~held)):
            if not bool(mask.any()):
                continue
            ref = target[mask]
            for p in points:
                for name, h in (("logit", xs[p][mask]), ("tuned", lens.translate(p, xs[p][mask]))):
                    logp = torch.log_softmax(read(h), -1)
                    kl = float((ref.exp() * (ref - logp)).sum(-1).mean())
                    report.append(
                        {
                            "lens": name,
                            "point": p,
                            "layer": point_layer(p),
                            "kl": kl,
                            "n": int(mask.sum()),
                            "split": split,
                        }
                    )
    lens.requires_grad_(False)
    return lens, report


def tuned_lens_from_store(
    store: ActivationStore | str | os.PathLike,
    model: nn.Module,
    *,
    adapter: Adapter | None = None,
    points: str | Iterable[str] = "blocks.*.resid_post",
    roles: Iterable[str] | None = DEFAULT_ROLES,
    step: int | Iterable[int] | None = None,
    branch: str | int | None = "cond",
    steps: int = 300,
    lr: float = 1e-3,
    seed: int = 0,
) -> tuple[TunedLens, list[dict]]:
    """Train a tuned lens on a store's residual states; the store must hold the last block's output.

    ``steps``, ``lr``, ``seed``: see :func:`train_tuned_lens`.
    """
    from uniprobe.hooks.points import expand

    if not isinstance(store, ActivationStore):
        store = ActivationStore.open(store)
    adapter = adapter or adapter_for(model)
    names = expand(points, store.points)
    final_point = last_block(adapter.n_layers(model))
    if final_point not in store.points:
        raise ValueError(
            f"the store at {store.path} lacks {final_point!r}, the last block's output the tuned lens "
            f"learns to match; capture it too (store points: {store.points})"
        )
    states = {p: store.rows(p, roles=roles, step=step, branch=branch) for p in names}
    final = store.rows(final_point, roles=roles, step=step, branch=branch)
    return train_tuned_lens(readout(model, adapter), states, final, steps=steps, lr=lr, seed=seed)


def tuned_lens_from_capture(
    model: nn.Module,
    inputs: ModelInputs,
    *,
    adapter: Adapter | None = None,
    points: str | Iterable[str] = "blocks.*.resid_post",
    roles: Iterable[str] | None = DEFAULT_ROLES,
    generate: bool = False,
    steps: int = 300,
    lr: float = 1e-3,
    seed: int = 0,
) -> tuple[TunedLens, list[dict]]:
    """Train a tuned lens on one capture of ``model`` over ``inputs`` (see :func:`train_tuned_lens`)."""
    adapter = adapter or adapter_for(model)
    _, states, final = capture_states(model, inputs, adapter, points, roles=roles, generate=generate)
    return train_tuned_lens(readout(model, adapter), states, final, steps=steps, lr=lr, seed=seed)


def save_report(report: list[dict], path: str | os.PathLike) -> Path:
    """Write a tuned-lens report as JSON."""
    return write_json(path, report)
