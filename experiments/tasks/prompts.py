"""Prompts and test items: what a model is asked, in both forms, with the ground truth.

A :class:`Prompt` is text (whitespace-separated words of the shared vocabulary) in which each
``<image>`` word stands for one image from ``images`` (tile codes, row-major). A drawing prompt may
carry a CoT plan: ``cot_questions`` are asked in turn (``{0}``, ``{1}``... are the model's earlier
answers) and ``cot_draw`` is the direct drawing prompt filled with those answers.

An :class:`Item` is one test item in its two forms with one ground truth: ``question``/``answer``
(understanding) and ``gen_prompt``/``target``/``criterion`` (generation, judged by
``world.satisfies``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from uniprobe.experiments.tasks import world

CATEGORIES: tuple[str, ...] = ("direct", "arithmetic", "mapping", "knowledge_forward", "knowledge_inverse")


@dataclass(frozen=True)
class Prompt:
    """Model input text, its images (one per ``<image>`` word) and an optional CoT plan."""

    text: str
    images: tuple[tuple[int, ...], ...] = ()
    cot_questions: tuple[str, ...] = ()
    cot_draw: str = ""

    def __post_init__(self) -> None:
        n = self.text.split().count("<image>")
        if n != len(self.images):
            raise ValueError(f"prompt {self.text!r} has {n} <image> markers but {len(self.images)} images")

    def cot_step(self, k: int, answers: list[str]) -> str:
        """The ``k``-th CoT question with earlier answers filled in."""
        return self.cot_questions[k].format(*answers)

    def cot_final(self, answers: list[str]) -> str:
        """The direct drawing prompt built from the model's CoT answers."""
        return self.cot_draw.format(*answers)


def as_prompt(p: str | Prompt) -> Prompt:
    """Accept a bare string as a prompt without images."""
    return p if isinstance(p, Prompt) else Prompt(p)


@dataclass
class Item:
    """One test item in two forms with one ground truth.

    Attributes:
        id: stable id, e.g. ``"arithmetic-L2-0007-A"``.
        category: one of :data:`CATEGORIES`.
        task: ``count`` | ``portrait`` | ``arith`` | ``mapping`` | ``fruit`` | ``flower``.
        level: arithmetic ops / mapping hops / 1 for others.
        question, question_images: the understanding form.
        answer: the understanding answer (words).
        gen_prompt: the generation form; ``target``: canonical tile codes ``[N_CELLS]``;
        criterion: what the judge checks (``world.satisfies``).
        cot_questions, cot_draw: the CoT plan (see :class:`Prompt`).
        group: items of one group count together (mapping A/B variants); else the id.
        labels: for probes, e.g. ``answer``, ``entity``, ``template``, ``variant``.
    """

    id: str
    category: str
    task: str
    level: int
    question: str
    answer: str
    gen_prompt: str
    target: tuple[int, ...]
    criterion: dict
    cot_questions: tuple[str, ...]
    cot_draw: str
    question_images: tuple[tuple[int, ...], ...] = ()
    group: str = ""
    labels: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.category not in CATEGORIES:
            raise ValueError(f"unknown category {self.category!r}; valid: {CATEGORIES}")
        if not self.group:
            self.group = self.id

    @property
    def und_prompt(self) -> Prompt:
        """The understanding form as a :class:`Prompt`."""
        return Prompt(self.question, self.question_images)

    @property
    def draw_prompt(self) -> Prompt:
        """The generation form as a :class:`Prompt`, carrying the CoT plan."""
        return Prompt(self.gen_prompt, (), self.cot_questions, self.cot_draw)

    @property
    def target_grid(self) -> np.ndarray:
        return world.decode(self.target)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}
