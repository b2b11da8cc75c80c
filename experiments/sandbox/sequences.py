"""Token streams of the sandbox models: segments, roles and left-padded batches.

A stream is a list of :class:`Segment` s, each a run of positions with one role
(``text``, ``image_und``, ``query``, ``cot``, ``image_gen``; ``pad`` is added by padding) — the role
names and order of ``uniprobe.hooks.layout.ROLES``. Text positions hold word ids; image positions hold the
``<image>`` id in ``input_ids`` and the tile code in ``image_tokens`` with ``image_mask`` set.

Padding is always on the LEFT, so every stream ends at the last position and generation appends
to all rows at once; ``position_ids`` count real tokens only (pads get 0).

Stream shapes (``|`` separates segments):

- understanding:  ``<bos> | question (images as <boi> | tiles | <eoi>) <answer> | answer <eos>``
- AR drawing:     ``<bos> | prompt <boi> | tiles (image_gen)``
- query drawing:  ``<bos> | prompt <boi> | <query> x N (query)``
- CoT: ``<bos> | q1 <answer> | a1 <eos> (cot) | q2 <answer> | a2 <eos> (cot) | direct prompt <boi> | ...``
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from uniprobe.experiments.tasks import world
from uniprobe.experiments.tasks.prompts import Prompt
from uniprobe.experiments.tasks.vocab import WordTokenizer

ROLE_NAMES: tuple[str, ...] = (
    "text",
    "image_und",
    "query",
    "cot",
    "image_gen",
    "pad",
)  # = uniprobe.hooks.layout.ROLES
IMAGE_ROLES = ("image_und", "image_gen")


@dataclass
class Segment:
    """A run of positions with one role. ``ids``: word ids, or tile codes for image roles."""

    role: str
    ids: list[int]
    loss: bool = False


def prompt_segments(tok: WordTokenizer, text: str, images: tuple[tuple[int, ...], ...] = ()) -> list[Segment]:
    """Text with ``<image>`` markers → segments; each marker becomes ``<boi>``, the tiles, ``<eoi>``."""
    segs: list[Segment] = []
    words: list[str] = []
    it = iter(images)
    for w in text.split():
        if w == "<image>":
            words.append("<boi>")
            segs.append(Segment("text", tok.encode(" ".join(words))))
            segs.append(Segment("image_und", list(next(it))))
            words = ["<eoi>"]
        else:
            words.append(w)
    if words:
        segs.append(Segment("text", tok.encode(" ".join(words))))
    return segs


def qa_segments(
    tok: WordTokenizer, prompt: Prompt, answer: str | None, answer_role: str = "text"
) -> list[Segment]:
    """``prompt <answer>`` then (if given) ``answer <eos>`` with loss."""
    segs = prompt_segments(tok, prompt.text + " <answer>", prompt.images)
    if answer is not None:
        segs.append(Segment(answer_role, tok.encode(answer + " <eos>"), loss=True))
    return segs


@dataclass
class Batch:
    """A left-padded batch.

    Attributes:
        input_ids: ``[b, pos]`` word ids (``<image>`` at image positions, ``<query>`` at query positions).
        image_tokens: ``[b, pos]`` tile codes at image positions, 0 elsewhere.
        image_mask: ``[b, pos]`` bool, True at image positions (read or generated).
        attention_mask: ``[b, pos]`` 1 for real tokens, 0 for left padding.
        position_ids: ``[b, pos]`` 0.. over real tokens.
        roles: per example, the role name of every position.
        text_targets: ``[b, pos]`` next word id to predict from each position, -100 where no loss.
        image_targets: ``[b, pos]`` next tile code to predict from each position, -100 where no loss.
        grid_targets: ``[b, cells]`` tile codes for the query model's decoder (-100 rows: no target).
    """

    input_ids: torch.Tensor
    image_tokens: torch.Tensor
    image_mask: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    roles: list[list[str]]
    text_targets: torch.Tensor
    image_targets: torch.Tensor
    grid_targets: torch.Tensor | None = None

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """The keyword arguments of the sandbox models' ``forward``."""
        return {
            "input_ids": self.input_ids,
            "image_tokens": self.image_tokens,
            "image_mask": self.image_mask,
            "attention_mask": self.attention_mask,
            "position_ids": self.position_ids,
        }

    def role_ids(self) -> torch.Tensor:
        """``[b, pos]`` int64 role ids in :data:`ROLE_NAMES` order."""
        return torch.tensor([[ROLE_NAMES.index(r) for r in row] for row in self.roles], dtype=torch.long)


def collate(
    tok: WordTokenizer, streams: list[list[Segment]], grid_targets: list[list[int] | None] | None = None
) -> Batch:
    """Left-pad streams into a :class:`Batch` (targets from segments marked ``loss``)."""
    image_id = tok["<image>"]
    rows = []
    for segs in streams:
        ids, tiles, mask, roles, tt, it = [], [], [], [], [], []
        for s in segs:
            is_img = s.role in IMAGE_ROLES
            for v in s.ids:
                ids.append(image_id if is_img else v)
                tiles.append(v if is_img else 0)
                mask.append(is_img)
                roles.append(s.role)
                # the token at position p is predicted from position p - 1
                tt.append(v if (s.loss and not is_img) else -100)
                it.append(v if (s.loss and is_img) else -100)
        rows.append((ids, tiles, mask, roles, tt[1:] + [-100], it[1:] + [-100]))
    length = max(len(r[0]) for r in rows)
    b = len(rows)
    out = {
        "input_ids": torch.full((b, length), tok.pad_id, dtype=torch.long),
        "image_tokens": torch.zeros((b, length), dtype=torch.long),
        "image_mask": torch.zeros((b, length), dtype=torch.bool),
        "attention_mask": torch.zeros((b, length), dtype=torch.long),
        "position_ids": torch.zeros((b, length), dtype=torch.long),
        "text_targets": torch.full((b, length), -100, dtype=torch.long),
        "image_targets": torch.full((b, length), -100, dtype=torch.long),
    }
    roles_out = []
    for i, (ids, tiles, mask, roles, tt, it) in enumerate(rows):
        n = len(ids)
        sl = slice(length - n, length)
        out["input_ids"][i, sl] = torch.tensor(ids)
        out["image_tokens"][i, sl] = torch.tensor(tiles)
        out["image_mask"][i, sl] = torch.tensor(mask)
        out["attention_mask"][i, sl] = 1
        out["position_ids"][i, sl] = torch.arange(n)
        out["text_targets"][i, sl] = torch.tensor(tt)
        out["image_targets"][i, sl] = torch.tensor(it)
        roles_out.append(["pad"] * (length - n) + roles)
    grids = None
    if grid_targets is not None:
        grids = torch.tensor([g if g is not None else [-100] * _cells(grid_targets) for g in grid_targets])
    return Batch(roles=roles_out, grid_targets=grids, **out)


def _cells(grid_targets: list[list[int] | None]) -> int:
    return next((len(g) for g in grid_targets if g is not None), world.N_CELLS)
