"""Patching one clean/corrupted prompt pair of a loaded model: what ``uniprobe patch`` and the
sweep's ``patch`` analysis run.

    res = patch_pair(loaded, "what is 2 + 1 ?", "what is 2 + 2 ?", "three", "four", kinds=["resid_pre"])
    res.write("artifacts/patch")          # patch.json (grid, axes, baselines, metric, timing), patch.png

The metric is the logit difference target − foil at the last prompt position. Prompts of different
token lengths are an error unless ``align="end"`` (right-aligned positions; only the shared tail is
patched).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uniprobe.experiments import tokens
from uniprobe.experiments.models import LoadedModel, encode
from uniprobe.hooks.errors import UsageError
from uniprobe.probes.patching import PatchResult
from uniprobe.probes.patching.sites import HEAD_KINDS, KINDS

METHODS = ("exact", "attribution")
DIRECTIONS = ("denoise", "noise")
ALIGNS = ("strict", "end")


@dataclass
class PairPatch:
    """A patched pair: the engine's result plus what the prompts and tokens were.

    Attributes:
        result: the :class:`PatchResult` (``values [n_sites]``, baselines, sites, grid).
        data: the JSON document ``patch.json`` holds (``result.to_json()`` plus model, metric,
            prompts, ``axes.position_tokens`` and ``timing.seconds``).
        sites: the patched sites' grid (``kinds``, ``layers``, ``columns``: one label per position,
            ``"clean/corrupted"`` where the prompts differ).
        title: the heatmap's title.
    """

    result: PatchResult
    data: dict[str, Any]
    sites: Any
    title: str
    files: dict[str, Path] = field(default_factory=dict)

    def write(self, out: str | Path) -> dict[str, Path]:
        """Write ``out/patch.json`` and ``out/patch.png``; returns their paths."""
        from uniprobe.probes.patching import heatmap

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "patch.json").write_text(json.dumps(self.data, indent=1))
        png = heatmap(self.result, out / "patch.png", title=self.title)
        self.files = {"json": out / "patch.json", "png": Path(png)}
        return self.files

    def strongest(self) -> tuple[str, int, str] | None:
        """``(kind, layer, column)`` of the largest normalised value (``None`` when all undefined)."""
        grid = self.result.as_grid()  # [kind, layer, column]
        if not grid.isfinite().any():
            return None
        flat = int(grid.nan_to_num(float("-inf")).argmax())
        k, rest = divmod(flat, grid.shape[1] * grid.shape[2])
        layer, col = divmod(rest, grid.shape[2])
        return self.sites.kinds[k], self.sites.layers[layer], self.sites.columns[col]


def site_kinds(raw: Sequence[str]) -> list[str]:
    """Site kinds from ``["resid_pre", "attn_out,mlp_out"]`` (commas allowed), checked, deduplicated."""
    kinds = [k.strip() for item in raw for k in item.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS + HEAD_KINDS]
    if bad:
        raise UsageError(f"unknown --points {bad}; choose from {', '.join(KINDS + HEAD_KINDS)}")
    kinds = list(dict.fromkeys(kinds))
    if any(k in HEAD_KINDS for k in kinds) and len(kinds) > 1:
        raise UsageError(
            f"--points {' '.join(kinds)}: head sites ({', '.join(HEAD_KINDS)}) make their own "
            "layer × head grid; patch them in a run of their own"
        )
    return kinds


def token_id(loaded: LoadedModel, text: str | int) -> int:
    """The token id a target or foil names (:func:`uniprobe.experiments.tokens.parse_token`): a
    one-token word (``"3"`` is the word 3), or ``"id:N"`` for token id ``N``."""
    try:
        return tokens.parse_token(loaded, text)
    except UsageError as err:
        raise UsageError(f"{err}; --target/--foil must be exactly one token (a word, or id:N)") from err


def token_labels(loaded: LoadedModel, ids: list[int]) -> list[str]:
    """One label per id (the token's text when the tokenizer can say)."""
    tok = loaded.tokenizer
    if tok is None or not hasattr(tok, "convert_ids_to_tokens"):
        return [str(i) for i in ids]
    out = []
    for i in ids:
        names = tok.convert_ids_to_tokens([i])
        out.append(str(names[0]) if names else str(i))
    return out


def example(loaded: LoadedModel, text: str) -> dict[str, Any]:
    """A prompt as the model's adapter takes it: ``{"prompt": text}`` for models that build their own
    batches from text (the sandbox), else ``{"input_ids": ...}`` from the tokenizer."""
    if loaded.info.get("text_prompts"):
        return {"prompt": text}
    return {"input_ids": encode(loaded, text)}


def _ids(inputs: Any) -> list[int]:
    """Token ids of a prepared single-example batch (its real positions)."""
    ids = inputs.kwargs["input_ids"][0]
    mask = inputs.kwargs.get("attention_mask")
    return (
        ids[mask[0].bool()].tolist()
        if mask is not None and mask.shape == inputs.kwargs["input_ids"].shape
        else ids.tolist()
    )


def patch_pair(
    loaded: LoadedModel,
    clean: str,
    corrupted: str,
    target: str | int,
    foil: str | int,
    *,
    kinds: Sequence[str] = ("resid_pre",),
    method: str = "exact",
    direction: str = "denoise",
    align: str = "strict",
    budget_mb: float = 512.0,
    name: str | None = None,
) -> PairPatch:
    """Patch every (kind, layer, position) site between two prompts of ``loaded``.

    Args:
        clean, corrupted: the prompts (text); ``target`` / ``foil``: one-token answers of each, as
            words (``"3"`` is the word 3) or ``"id:N"`` for token id ``N`` (:func:`token_id`).
        kinds: site kinds (see :data:`uniprobe.probes.patching.sites.KINDS`; commas allowed), or one
            head kind: ``head_out`` (each layer × head, all positions at once) or ``head_out_pos`` (each
            layer × head × position); columns ``h{head}:all`` / ``h{head}:{token}``.
        method: ``"exact"`` (batched patching) or ``"attribution"`` (its linear estimate).
        direction: ``"denoise"`` (clean states into the corrupted run) or ``"noise"``.
        align: ``"strict"`` (equal token lengths) or ``"end"`` (align the prompts' last tokens).
        budget_mb: activation memory per batched chunk (exact patching).
        name: the model's name in ``patch.json`` and the title (default ``loaded.spec``).

    Returns:
        a :class:`PairPatch`; ``.write(out)`` saves ``patch.json`` and ``patch.png``.
    """
    from uniprobe.probes.patching import LogitDiff, align_end, attribution_patch, grid_sites, patch_sweep

    if method not in METHODS:
        raise UsageError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if direction not in DIRECTIONS:
        raise UsageError(f"unknown direction {direction!r}; choose from {', '.join(DIRECTIONS)}")
    kinds = site_kinds(kinds)
    model, adapter = loaded.model, loaded.adapter
    target_id, foil_id = token_id(loaded, target), token_id(loaded, foil)
    clean_in = adapter.prepare(model, [example(loaded, clean)])
    corrupted_in = adapter.prepare(model, [example(loaded, corrupted)])
    clean_ids, corrupted_ids = _ids(clean_in), _ids(corrupted_in)
    denoise = direction == "denoise"
    source_ids, target_ids = (clean_ids, corrupted_ids) if denoise else (corrupted_ids, clean_ids)
    layout = (corrupted_in if denoise else clean_in).layout
    n_layers = adapter.n_layers(model)
    answer_pos = max(layout.positions(0, ["text", "image_und", "cot"]))
    pos_tokens = token_labels(loaded, target_ids)
    if len(clean_ids) == len(corrupted_ids):  # mark the positions where the prompts differ: "clean/corrupted"
        pairs = zip(token_labels(loaded, clean_ids), token_labels(loaded, corrupted_ids))
        pos_tokens = [c if c == r else f"{c}/{r}" for c, r in pairs]
    extra = layout.names(0)[len(target_ids) :]  # positions past the prompt (query tokens)
    labels = pos_tokens + [f"{role[0]}{i}" for i, role in enumerate(extra)]
    if len(clean_ids) != len(corrupted_ids):
        if align != "end":
            raise UsageError(
                f"clean prompt has {len(clean_ids)} tokens, corrupted has {len(corrupted_ids)}: positions "
                "do not line up, so a position-by-position patch would be meaningless. Make the prompts "
                "the same length, or pass --align end to align their last tokens"
            )
        if layout.length != len(target_ids):
            raise UsageError("--align end works on plain prompts (no appended query tokens)")
        if kinds[0] in HEAD_KINDS:
            raise UsageError("head sites need prompts of one length (--align strict)")
        aligned = align_end(len(source_ids), len(target_ids))
        sites = aligned.sites(n_layers, kinds)
        sites.columns = [labels[t] for t, _ in aligned.pairs]
    elif kinds[0] in HEAD_KINDS:
        from uniprobe.probes.attention import head_sites

        by_pos = kinds[0] == "head_out_pos"
        sites = head_sites(
            model, clean_in if not denoise else corrupted_in, adapter=adapter, by_position=by_pos
        )
        if by_pos:  # name the position columns by their tokens
            sites.columns = [f"{c.split(':')[0]}:{labels[int(c.split(':')[1])]}" for c in sites.columns]
    else:
        sites = grid_sites(n_layers, layout.length, kinds, labels=labels)
    # -1 when the answer is read at the end: lets the engine skip recomputing earlier positions
    metric = LogitDiff(target_id, foil_id, position=-1 if answer_pos == layout.length - 1 else answer_pos)
    t0 = time.perf_counter()
    if method == "exact":
        result = patch_sweep(
            model, clean_in, corrupted_in, sites, metric, direction=direction, adapter=adapter,
            budget_bytes=int(budget_mb * 2**20),
        )  # fmt: skip
    else:
        result = attribution_patch(
            model, clean_in, corrupted_in, sites, metric, direction=direction, adapter=adapter
        )
    seconds = time.perf_counter() - t0
    data = result.to_json()
    name = loaded.spec if name is None else name
    data["model"] = name
    data["metric"] = {
        "name": "logit_diff",
        "target": {"text": tokens.token_str(loaded, target_id), "given": str(target), "id": target_id},
        "foil": {"text": tokens.token_str(loaded, foil_id), "given": str(foil), "id": foil_id},
        "position": answer_pos,
    }
    data["prompts"] = {
        "clean": {"text": clean, "ids": clean_ids, "tokens": token_labels(loaded, clean_ids)},
        "corrupted": {"text": corrupted, "ids": corrupted_ids, "tokens": token_labels(loaded, corrupted_ids)},
    }
    data["axes"]["position_tokens"] = sites.columns
    data["timing"]["seconds"] = seconds
    t_text, f_text = data["metric"]["target"]["text"], data["metric"]["foil"]["text"]
    title = f"{name}: {method} patching ({direction}), logit {t_text!r} − {f_text!r}"
    return PairPatch(result, data, sites, title)
