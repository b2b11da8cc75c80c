"""R3 (arXiv 2602.15772) on the sandbox: generate → understand → regenerate, for up to K rounds.

Round 0: the model draws the prompt. Each later round, the model's understanding judges its own
last drawing against the prompt, in two questions of its training format: it answers the prompt's
question itself (``what is 9 - 7 ?`` → ``a``), then counts the asked object in its own image
(``how many banana in <image> ?``). If the count disagrees with ``a`` it regenerates, with its
judgement added to the prompt (the direct prompt built from ``a``: ``draw a banana``); if they
agree, that sample is done. The exact judge scores every round; as in R3 the report is, per round,
the fraction of samples improved / worse / unchanged and the accuracy.

Items: those whose prompt asks for a count of one object (arithmetic; favourite fruit / flower,
where the object is the model's own answer and any positive count agrees).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from uniprobe.experiments.progress import bar
from uniprobe.experiments.tasks import world
from uniprobe.experiments.tasks.generators import tile_phrase
from uniprobe.experiments.tasks.prompts import Item, Prompt
from uniprobe.hooks.jsonio import read_json, write_json
from uniprobe.hooks.results_io import SavedFiles, result_dir, result_file


@dataclass
class R3Round:
    """One round's outcome over the samples (fractions of all samples)."""

    round: int
    accuracy: float
    improved: float = 0.0
    worse: float = 0.0
    unchanged: float = 1.0
    regenerated: float = 0.0


@dataclass
class R3Result:
    """Per-round outcomes and the ids of the samples; ``r3.json`` is :meth:`to_dict`."""

    rounds: list[R3Round]
    items: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """``{"rounds": [{"round", "accuracy", "improved", ...}, ...], "items": [...]}``."""
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict) -> R3Result:
        return cls([R3Round(**r) for r in doc["rounds"]], list(doc.get("items", [])))

    def save(
        self, out: str | os.PathLike, plot: bool = True, *, title: str = "", plot_title: str | None = None
    ) -> SavedFiles:
        """Write ``r3.json``, ``r3.md`` (headed ``title``) and (``plot``) ``r3.png`` (titled
        ``plot_title``, default ``title``) to ``out``."""
        out = result_dir(out)
        files = {"json": write_json(out / "r3.json", self.to_dict()), "md": out / "r3.md"}
        files["md"].write_text(format_r3(self, title=title) + "\n")
        if plot:
            files["png"] = out / "r3.png"
            plot_r3(self, str(files["png"]), title=plot_title or title)
        return SavedFiles(out, files)

    @classmethod
    def load(cls, out: str | os.PathLike) -> R3Result:
        """Read ``r3.json`` back."""
        return cls.from_dict(read_json(result_file(out, "r3.json")))


def eligible(items: Sequence[Item]) -> list[Item]:
    """Items R3 can run on in the sandbox (one CoT question, a count of one object)."""
    return [
        it
        for it in items
        if len(it.cot_questions) == 1
        and (
            it.category == "arithmetic"
            or (it.category == "knowledge_forward" and it.task in ("fruit", "flower"))
        )
    ]


def _object(it: Item, answer: str) -> str:
    """The words naming the object whose count the image should show."""
    return answer if it.category == "knowledge_forward" else tile_phrase(it.labels["entity"])


def _agrees(it: Item, answer: str, count: str) -> bool:
    if it.category == "knowledge_forward":
        return count.isdigit() and int(count) > 0
    return count == answer


def r3_loop(
    model: object, items: Sequence[Item], rounds: int = 3, batch_size: int = 64, progress: bool = True
) -> R3Result:
    """Run R3 for ``rounds`` regeneration rounds; every sample keeps its latest drawing.

    A bar on stderr counts the first drawing and each round (``progress=False`` hides it)."""
    items = eligible(items)
    if not items:
        raise ValueError("no items R3 can run on (arithmetic or favourite fruit/flower items)")
    pbar = bar(total=rounds + 1, desc="R3", unit="round", progress=progress)
    grids = model.generate_image([it.draw_prompt for it in items], batch_size=batch_size)
    right = [world.satisfies(g, it.criterion) for g, it in zip(grids, items, strict=True)]
    history = [R3Round(0, sum(right) / len(items))]
    active = list(range(len(items)))
    answers = model.understand([Prompt(it.cot_questions[0]) for it in items], batch_size=batch_size)
    answers = [" ".join(w for w in a.split() if not w.startswith("<")) for a in answers]
    pbar.update(1)
    for r in range(1, rounds + 1):
        pbar.update(1)  # counted as it starts: the postfix then says what the round is doing
        if not active:
            history.append(R3Round(r, history[-1].accuracy))
            continue
        pbar.set_postfix(redrawing=len(active))
        questions = [
            Prompt(f"how many {_object(items[k], answers[k])} in <image> ?", (tuple(world.encode(grids[k])),))
            for k in active
        ]
        counts = model.understand(questions, batch_size=batch_size)
        redo = [
            k for k, c in zip(active, counts, strict=True) if not _agrees(items[k], answers[k], c.strip())
        ]
        new = model.generate_image(
            [Prompt(items[k].cot_draw.format(answers[k])) for k in redo], batch_size=batch_size
        ) if redo else []  # fmt: skip
        before = list(right)
        for k, g in zip(redo, new, strict=True):
            grids[k] = g
            right[k] = world.satisfies(g, items[k].criterion)
        n = len(items)
        improved = sum(1 for k in range(n) if right[k] and not before[k]) / n
        worse = sum(1 for k in range(n) if before[k] and not right[k]) / n
        history.append(R3Round(r, sum(right) / n, improved, worse, 1 - improved - worse, len(redo) / n))
        active = redo
    pbar.close()
    return R3Result(history, [it.id for it in items])


def format_r3(result: R3Result, title: str = "") -> str:
    """Markdown: one row per round, as R3 reports it."""
    pct = lambda x: f"{100 * x:.0f}%"  # noqa: E731
    lines = [f"### {title}", ""] if title else []
    lines += [
        f"R3 on {len(result.items)} samples (arithmetic and favourite fruit / flower prompts).",
        "",
        "| round | accuracy | improved | worse | unchanged | regenerated |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result.rounds:
        lines.append(
            f"| {r.round} | {pct(r.accuracy)} | {pct(r.improved)} | {pct(r.worse)} | {pct(r.unchanged)} "
            f"| {pct(r.regenerated)} |"
        )
    return "\n".join(lines)


def plot_r3(result: R3Result, path: str, title: str = "") -> None:
    """Accuracy per round (line) over the fractions improved / worse in that round (bars); writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r.round for r in result.rounds]
    fig, ax = plt.subplots(figsize=(4.8, 3))
    ax.bar(
        [x - 0.2 for x in rounds],
        [r.improved for r in result.rounds],
        0.4,
        label="improved",
        color="tab:green",
    )
    ax.bar([x + 0.2 for x in rounds], [r.worse for r in result.rounds], 0.4, label="worse", color="tab:red")
    ax.plot(rounds, [r.accuracy for r in result.rounds], marker="o", color="black", label="accuracy")
    ax.set_xticks(rounds)
    ax.set_xlabel("round (0: first drawing)")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7)
    ax.set_title(title or "R3: generate → understand → regenerate", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
