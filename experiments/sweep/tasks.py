"""A run's examples: sandbox test items selected by category, level and form, or a prompts file."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from uniprobe.experiments.models import LoadedModel
from uniprobe.experiments.tasks.prompts import Item

FORM_KEY = {"understanding": "und", "generation": "gen"}  # the suffix of example ids, as in the demo


@lru_cache(maxsize=4)
def _suite_items(seed: int) -> tuple[Item, ...]:
    from uniprobe.experiments.tasks.suite import Suite

    return tuple(Suite(seed).items)


def sandbox_items(task: dict) -> list[Item]:
    """The suite's test items of ``task``: its categories (and levels), at most ``limit`` per category,
    spread evenly over the category so every level is represented."""
    picked = []
    for category in task["categories"]:
        items = [
            it
            for it in _suite_items(task["suite_seed"])
            if it.category == category and (task["levels"] is None or it.level in task["levels"])
        ]
        limit = task["limit"]
        if limit is not None and len(items) > limit:
            items = [items[(k * len(items)) // limit] for k in range(limit)]
        picked += items
    if not picked:
        raise ValueError(
            f"task {task['name']!r}: no sandbox items in categories {task['categories']} at levels "
            f"{task['levels']}; arithmetic and mapping have levels 1-3, the other categories level 1"
        )
    return picked


def run_examples(task: dict, loaded: LoadedModel) -> tuple[list[dict[str, Any]], list[Item] | None]:
    """Capture examples of ``task`` for ``loaded`` (and the sandbox items they come from, if any).

    Sandbox examples are ``{"id", "prompt", "labels"}`` with labels ``answer``, ``entity``,
    ``template``, ``category``, ``level``; prompts-file examples are what ``uniprobe capture`` reads.
    """
    if task["source"] == "sandbox":
        from uniprobe.experiments.demo_sections import examples_of

        if not loaded.info.get("text_prompts"):
            raise ValueError(
                f"task {task['name']!r} uses sandbox items, which only sandbox models can read; "
                f"model {loaded.spec!r} needs a prompts task (tasks[].prompts)"
            )
        items = sandbox_items(task)
        return examples_of(items, FORM_KEY[task["form"]]), items
    from uniprobe.experiments.prompts_file import read_prompts

    examples = read_prompts(task["prompts"], loaded)
    return (examples[: task["limit"]] if task["limit"] else examples), None


def capture_mode(task: dict, mode: str) -> str:
    """``auto``: understanding for questions and prompts files, ``generate`` for drawing prompts."""
    if mode != "auto":
        return mode
    return "generate" if task.get("form") == "generation" else "understanding"
