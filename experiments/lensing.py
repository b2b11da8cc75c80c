"""Logit lens (and tuned lens) of answer tokens over a prompts file: what ``uniprobe lens`` runs, and
the answer-token resolution the sweep's ``lens`` analysis shares.

    run = lens_prompts(loaded, "prompts.jsonl", ["3", "4", "id:7"], tuned_steps=200)  # words; id:N an id
    run.write("artifacts/lens")   # lens.json, lens_rows.csv, lens_map.png, lens_kl.png (+ tuned lens)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uniprobe.experiments import tokens
from uniprobe.experiments.models import LoadedModel
from uniprobe.hooks.errors import UsageError


def resolve_answers(loaded: LoadedModel, answers: Sequence[str | int]) -> list[int]:
    """Token ids of ``answers`` (:func:`uniprobe.experiments.tokens.parse_token`): each a word of the
    model's tokenizer (``"3"`` is the word 3; an int is the word of that number), or ``"id:N"`` for
    token id ``N`` (checked against the readout's vocabulary)."""
    vocab = _vocab_size(loaded)
    ids = []
    for a in answers:
        try:
            ids.append(tokens.parse_token(loaded, a, vocab_size=vocab))
        except UsageError as err:
            raise UsageError(f"answer: {err}") from err
    return ids


def _vocab_size(loaded: LoadedModel) -> int | None:
    from uniprobe.probes.lens import readout

    head = readout(loaded.model, loaded.adapter).head
    out = getattr(head, "out_features", None)
    return int(out) if out is not None else None


def token_str(loaded: LoadedModel) -> Callable[[int], str] | None:
    """A token id → its text (:func:`uniprobe.experiments.tokens.token_str`), ``None`` without a
    tokenizer (the lens then shows ids)."""
    if loaded.tokenizer is None:
        return None
    return lambda t: tokens.token_str(loaded, t)


@dataclass
class LensRun:
    """A lens over prompts: the :class:`~uniprobe.probes.lens.LensResult` (rows per example ×
    layer × position × answer; ``kl`` rows per lens × point), and the tuned lens trained for it."""

    result: Any
    n_examples: int
    answers: list[int]
    tuned: Any = None
    tuned_report: Any = None
    files: dict[str, Path] = field(default_factory=dict)

    def write(self, out: str | Path) -> dict[str, Path]:
        """Write the lens files (and ``tuned_lens.safetensors`` + report when one was trained)."""
        from uniprobe.probes.tuned_lens import save_report

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        files: dict[str, Path] = {}
        if self.tuned_report is not None:
            self.tuned.save(out / "tuned_lens.safetensors")
            save_report(self.tuned_report, out / "tuned_lens_report.json")
        files.update(self.result.save(out))
        self.files = files
        return files


def lens_prompts(
    loaded: LoadedModel,
    prompts: str | Path,
    answers: Sequence[str],
    *,
    points: str = "blocks.*.resid_post",
    roles: Sequence[str] | None = None,
    generate: bool = False,
    batch_size: int = 16,
    tuned_steps: int = 0,
    tuned_lens: str | Path | None = None,
    seed: int = 0,
    name: str | None = None,
) -> LensRun:
    """Logit lens of ``answers`` at every ``points`` × ``roles`` position of a prompts file.

    Args:
        prompts: a JSON-lines prompts file (see :mod:`uniprobe.experiments.prompts_file`).
        answers: one-token words of the model's tokenizer (``"3"`` is the word 3), or ``"id:N"``
            for token id ``N`` (:func:`resolve_answers`).
        roles: positions to decode (default: all but pad); ``generate``: also decode the image
            positions the model generates.
        tuned_steps: train a tuned lens on these prompts first (0: off); ``tuned_lens``: a tuned
            lens saved before, reported beside the logit lens.
        name: the model's name in the result's meta and title (default ``loaded.spec``).
    """
    from uniprobe.experiments.prompts_file import read_prompts
    from uniprobe.probes.lens import DEFAULT_ROLES, LensResult, logit_lens
    from uniprobe.probes.tuned_lens import TunedLens, tuned_lens_from_capture

    name = loaded.spec if name is None else name
    model, adapter = loaded.model, loaded.adapter
    examples = read_prompts(prompts, loaded)
    answer_ids = resolve_answers(loaded, answers)
    roles = list(roles or DEFAULT_ROLES)
    mode = "generation" if generate else "understanding"
    tuned = TunedLens.load(tuned_lens) if tuned_lens else None
    report = None
    if tuned_steps > 0:
        inputs = adapter.prepare(model, examples, mode=mode)
        tuned, report = tuned_lens_from_capture(
            model, inputs, adapter=adapter, points=points, roles=roles, generate=generate,
            steps=tuned_steps, seed=seed,
        )  # fmt: skip
    rows: list[dict] = []
    kl: dict[tuple[str, str], list[tuple[float, int]]] = {}
    for i in range(0, len(examples), batch_size):
        batch = examples[i : i + batch_size]
        inputs = adapter.prepare(model, batch, mode=mode)
        res = logit_lens(
            model, inputs, answer_ids, adapter=adapter, points=points, roles=roles, generate=generate,
            tuned=tuned, example_ids=[ex["id"] for ex in batch], token_str=token_str(loaded),
        )  # fmt: skip
        rows += res.rows
        for r in res.kl:
            kl.setdefault((r["lens"], r["point"]), []).append((r["kl"], r["n"]))
    kl_rows = [  # each batch's mean KL, weighted by its number of positions
        {
            "lens": lens,
            "point": point,
            "layer": next(r["layer"] for r in rows if r["point"] == point),
            "kl": sum(k * n for k, n in v) / sum(n for _, n in v),
            "n": sum(n for _, n in v),
        }
        for (lens, point), v in kl.items()
    ]
    texts = [tokens.token_str(loaded, t) for t in answer_ids]  # the tokens' own text, whatever the form
    meta = {
        "model": name,
        "adapter": adapter.name,
        "answers": answer_ids,
        "answer_words": [str(a) for a in answers],
        "answer_tokens": texts,
        "roles": roles,
        "prompts": str(prompts),
        "title": f"{name}: lens on answers {', '.join(texts)}",
    }
    return LensRun(LensResult(rows, kl_rows, meta), len(examples), answer_ids, tuned, report)
