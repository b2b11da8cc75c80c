"""What both sandbox models share: prompts → streams, greedy understanding, CoT drawing, the loss.

Subclasses (``SandboxAR``, ``SandboxQuery``) define ``forward``, how a drawing is asked for and
decoded (``_draw_segments``, ``_draw``), and their part of the loss. All inputs reach the backbone
as ``inputs_embeds`` from ``embed_inputs``, so hooks on ``lm.model`` see every position.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional
from uniprobe.experiments.sandbox.sequences import Batch, Segment, collate, prompt_segments, qa_segments
from uniprobe.experiments.tasks import world
from uniprobe.experiments.tasks.prompts import Prompt, as_prompt
from uniprobe.experiments.tasks.suite import TrainExample
from uniprobe.experiments.tasks.vocab import WordTokenizer


@dataclass
class SandboxOutput:
    """``text_logits [b, pos, vocab]``; ``image_logits`` AR: ``[b, pos, n_tiles]`` (next tile from each
    position), query: ``[b, cells, n_tiles]`` (decoder output; zeros for rows without queries);
    ``hidden [b, pos, d]`` the backbone's final-norm output."""

    text_logits: torch.Tensor
    image_logits: torch.Tensor
    hidden: torch.Tensor


class SandboxModel(nn.Module, abc.ABC):
    """Base class; see module docstring. ``arch`` is ``"ar"`` or ``"query"``."""

    arch = "base"

    def __init__(
        self, tokenizer: WordTokenizer, grid: int = world.GRID, n_tiles: int = world.N_TILES
    ) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.grid = grid
        self.n_tiles = n_tiles
        self.n_cells = grid * grid

    # -- to implement ---------------------------------------------------------------------
    @abc.abstractmethod
    def forward(
        self,
        input_ids: torch.Tensor,
        image_tokens: torch.Tensor,
        image_mask: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
    ) -> SandboxOutput:
        """All ``[b, pos]`` → :class:`SandboxOutput`."""

    @abc.abstractmethod
    def _draw_segments(self, target: Sequence[int] | None, loss: bool = False) -> list[Segment]:
        """Segments after ``prompt <boi>`` that ask for (and, if given, teacher-force) a drawing."""

    @abc.abstractmethod
    def _draw(self, streams: list[list[Segment]]) -> list[np.ndarray]:
        """Complete each stream (ending in ``<boi>``) with a drawing; returns grids ``[H, W]``."""

    @abc.abstractmethod
    def _image_loss(self, out: SandboxOutput, batch: Batch) -> tuple[torch.Tensor, int]:
        """This architecture's image loss: ``(sum, count)``."""

    # -- helpers --------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def run(self, batch: Batch) -> SandboxOutput:
        """``forward`` on a :class:`Batch`."""
        return self(**{k: v.to(self.device) for k, v in batch.model_inputs().items()})

    def _bos(self) -> list[Segment]:
        return [Segment("text", [self.tokenizer["<bos>"]])]

    def _collate(self, streams: list[list[Segment]], grid_targets=None) -> Batch:
        return collate(self.tokenizer, streams, grid_targets)

    @torch.no_grad()
    def _greedy_text(
        self, streams: list[list[Segment]], role: str, max_new_tokens: int = 8
    ) -> list[list[int]]:
        """Append greedy words (through ``<eos>``) to every stream; return them without ``<eos>``."""
        eos = self.tokenizer["<eos>"]
        outs: list[list[int]] = [[] for _ in streams]
        done = [False] * len(streams)
        for _ in range(max_new_tokens):
            active = [i for i, d in enumerate(done) if not d]
            if not active:
                break
            logits = self.run(self._collate([streams[i] for i in active])).text_logits[:, -1]
            for row, i in enumerate(active):
                w = int(logits[row].argmax())
                streams[i].append(Segment(role, [w]))
                if w == eos:
                    done[i] = True
                else:
                    outs[i].append(w)
        return outs

    # -- public API -----------------------------------------------------------------------
    def understand(
        self, prompts: Sequence[str | Prompt], batch_size: int = 64, max_new_tokens: int = 8
    ) -> list[str]:
        """Greedy text answers to understanding prompts (text with ``<image>`` markers + images)."""
        answers: list[str] = []
        for start in range(0, len(prompts), batch_size):
            chunk = [as_prompt(p) for p in prompts[start : start + batch_size]]
            streams = [self._bos() + qa_segments(self.tokenizer, p, None) for p in chunk]
            outs = self._greedy_text(streams, "text", max_new_tokens)
            answers += [self.tokenizer.decode(o) for o in outs]
        return answers

    def generate_image(
        self,
        prompts: Sequence[str | Prompt],
        cot: bool = False,
        batch_size: int = 64,
        return_batch: bool = False,
    ):
        """Draw a grid for each prompt (greedy).

        With ``cot=True`` each prompt's CoT plan runs first in the same stream: every CoT question is
        answered by the model (role ``cot``), then the direct drawing prompt built from those answers
        is appended and drawn. Requires :class:`Prompt` s with ``cot_draw`` (``Item.draw_prompt``).

        Returns:
            grids ``int64 [H, W]`` per prompt; with ``return_batch`` also the final streams as
            :class:`Batch` es (one per chunk), for replaying them under capture.
        """
        grids: list[np.ndarray] = []
        batches: list[Batch] = []
        for start in range(0, len(prompts), batch_size):
            chunk = [as_prompt(p) for p in prompts[start : start + batch_size]]
            streams = [self._bos() for _ in chunk]
            finals = [p.text for p in chunk]
            if cot:
                for p in chunk:
                    if not p.cot_draw:
                        raise ValueError(
                            f"prompt {p.text!r} has no CoT plan; pass Item.draw_prompt for cot=True"
                        )
                answers: list[list[str]] = [[] for _ in chunk]
                for k in range(max(len(p.cot_questions) for p in chunk)):
                    idx = [i for i, p in enumerate(chunk) if k < len(p.cot_questions)]
                    for i in idx:
                        q = Prompt(chunk[i].cot_step(k, answers[i]))
                        streams[i] += qa_segments(self.tokenizer, q, None)
                    outs = self._greedy_text([streams[i] for i in idx], "cot")
                    for i, o in zip(idx, outs, strict=True):  # special tokens never enter a prompt
                        answers[i].append(
                            " ".join(w for w in self.tokenizer.decode(o).split() if w[0] != "<")
                        )
                finals = [p.cot_final(a) for p, a in zip(chunk, answers, strict=True)]
            for s, text in zip(streams, finals, strict=True):
                s += prompt_segments(self.tokenizer, text + " <boi>")
            grids += self._draw(streams)
            if return_batch:
                batches.append(self._collate(streams))
        return (grids, batches) if return_batch else grids

    def prompt_layout(
        self,
        prompts: Sequence[str | Prompt],
        mode: str = "generate",
        targets: Sequence[Sequence[int]] | None = None,
    ) -> Batch:
        """The batch a plain (non-CoT) prompt makes, with the role of every position (``Batch.roles``).

        ``mode="understand"``: ``<bos> prompt <answer>``. ``mode="generate"``: ``<bos> prompt <boi>`` plus
        the drawing positions — AR: teacher-forced ``targets`` tiles (``image_gen``); query: N query
        positions (``query``). For CoT streams use ``generate_image(..., return_batch=True)``.
        """
        streams = []
        for k, p in enumerate(prompts):
            p = as_prompt(p)
            if mode == "understand":
                streams.append(self._bos() + qa_segments(self.tokenizer, p, None))
            elif mode == "generate":
                tgt = targets[k] if targets is not None else None
                segs = self._bos() + prompt_segments(self.tokenizer, p.text + " <boi>", p.images)
                streams.append(segs + self._draw_segments(tgt))
            else:
                raise ValueError(f"unknown mode {mode!r}; expected 'understand' or 'generate'")
        return self._collate(streams)

    # -- training -------------------------------------------------------------------------
    def example_stream(self, ex: TrainExample) -> tuple[list[Segment], list[int] | None]:
        """A training example → (segments with loss flags, grid target for the query decoder or None)."""
        segs = self._bos()
        for p, a in ex.prefix:
            segs += qa_segments(self.tokenizer, p, a)
        if ex.target is None:
            return segs + qa_segments(self.tokenizer, ex.prompt, ex.answer), None
        segs += prompt_segments(self.tokenizer, ex.prompt.text + " <boi>", ex.prompt.images)
        return segs + self._draw_segments(ex.target, loss=True), list(ex.target)

    def training_batch(self, examples: Sequence[TrainExample]) -> Batch:
        """Collate training examples."""
        pairs = [self.example_stream(e) for e in examples]
        return self._collate([s for s, _ in pairs], [g for _, g in pairs])

    def loss_sums(self, batch: Batch) -> tuple[torch.Tensor, int, dict[str, float]]:
        """Summed cross-entropy on answer words and image tokens only, the number of such tokens, and
        per-part sums/counts (``text``, ``n_text``, ``image``, ``n_image``)."""
        out = self.run(batch)
        tt = batch.text_targets.to(self.device)
        text_sum = functional.cross_entropy(
            out.text_logits.flatten(0, 1), tt.flatten(), ignore_index=-100, reduction="sum"
        )
        n_text = int((tt != -100).sum())
        img_sum, n_img = self._image_loss(out, batch)
        parts = {
            "text": text_sum.item(),
            "n_text": n_text,
            "image": float(img_sum.detach()),
            "n_image": n_img,
        }
        return text_sum + img_sum, n_text + n_img, parts

    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean cross-entropy on answer words and image tokens only. Returns (loss, mean per part)."""
        total, n, p = self.loss_sums(batch)
        parts = {"text": p["text"] / max(1, p["n_text"]), "image": p["image"] / max(1, p["n_image"])}
        return total / max(1, n), parts
