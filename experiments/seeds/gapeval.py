"""GapEval's gap score (arXiv 2602.02140) from bidirectional items.

Every item is answered in both directions — as text (understanding) and as an image (generation,
judged exactly) — giving one of four joint outcomes: both right (11), text only (10), image only
(01), both wrong (00). Per category a two-dimensional IRT model is fitted by MAP:

    P(text right  | item i in category c) = σ(θ_text[c]  − b_text[i])
    P(image right | item i in category c) = σ(θ_image[c] − b_image[i])

with Gaussian priors θ ~ N(0, σ_θ²), b ~ N(0, σ_b²) (the priors make the abilities identifiable).
Then per category δ = θ_text − θ_image, g = |δ| / (1 + |δ|) and

    gap = sigmoid(logit(g) + 2.7·p00 − 1.05·p11),

where p00 / p11 are the category's both-wrong / both-right rates; the model's gap score is the
mean over categories. The fit is written by hand (a few lines of torch L-BFGS): no maintained
library fits this two-dimensional MAP model.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from uniprobe.hooks.jsonio import read_json, write_json
from uniprobe.hooks.results_io import SavedFiles, result_dir, result_file

OUTCOMES = ("11", "10", "01", "00")


@dataclass
class CategoryGap:
    """One category: outcome rates, fitted abilities and its gap."""

    category: str
    n: int
    rates: dict[str, float]
    theta_text: float
    theta_image: float
    delta: float
    gap: float


@dataclass
class GapEvalResult:
    """The model's gap score and its categories; ``gapeval.json`` is :meth:`to_dict`.

    ``GapEvalResult(*gap_score(...)).save(out)`` writes ``gapeval.json``, ``.md`` and ``.png``.
    """

    score: float
    categories: list[CategoryGap]

    def to_dict(self) -> dict:
        """``{"score": s, "categories": [{"category", "n", "rates", "theta_text", ...}, ...]}``."""
        return {"score": self.score, "categories": [asdict(c) for c in self.categories]}

    @classmethod
    def from_dict(cls, doc: dict) -> GapEvalResult:
        return cls(doc["score"], [CategoryGap(**c) for c in doc["categories"]])

    def save(
        self, out: str | os.PathLike, plot: bool = True, *, title: str = "", plot_title: str | None = None
    ) -> SavedFiles:
        """Write ``gapeval.json``, ``gapeval.md`` (headed ``title``) and (``plot``) ``gapeval.png``
        (titled ``plot_title``, default ``title``) to ``out``."""
        out = result_dir(out)
        files = {"json": write_json(out / "gapeval.json", self.to_dict()), "md": out / "gapeval.md"}
        files["md"].write_text(format_gap_score(self.score, self.categories, title=title) + "\n")
        if plot:
            files["png"] = out / "gapeval.png"
            plot_gap_score(self.categories, self.score, str(files["png"]), title=plot_title or title)
        return SavedFiles(out, files)

    @classmethod
    def load(cls, out: str | os.PathLike) -> GapEvalResult:
        """Read ``gapeval.json`` back."""
        return cls.from_dict(read_json(result_file(out, "gapeval.json")))


def outcome(text_right: bool, image_right: bool) -> str:
    """The joint outcome code of one item."""
    return f"{int(bool(text_right))}{int(bool(image_right))}"


def fit_irt(
    categories: Sequence[str],
    text: Sequence[bool],
    image: Sequence[bool],
    *,
    prior_theta: float = 1.0,
    prior_b: float = 1.0,
    seed: int = 0,
    max_iter: int = 200,
) -> dict[str, tuple[float, float]]:
    """MAP fit of the two-dimensional IRT model; returns ``{category: (θ_text, θ_image)}``.

    Args:
        categories, text, image: per item, its category and whether each direction was right.
        prior_theta, prior_b: standard deviations of the Gaussian priors.
    """
    if not (len(categories) == len(text) == len(image)) or not categories:
        raise ValueError("need the same, non-zero number of categories, text outcomes and image outcomes")
    names = sorted(set(categories))
    cat = torch.tensor([names.index(c) for c in categories])
    y = torch.tensor([[float(t), float(i)] for t, i in zip(text, image, strict=True)])  # [n, 2]
    g = torch.Generator().manual_seed(seed)
    theta = (0.01 * torch.randn(len(names), 2, generator=g, dtype=torch.float64)).requires_grad_()
    b = (0.01 * torch.randn(len(y), 2, generator=g, dtype=torch.float64)).requires_grad_()
    y = y.double()
    opt = torch.optim.LBFGS(
        [theta, b], max_iter=max_iter, tolerance_grad=1e-10, line_search_fn="strong_wolfe"
    )

    def neg_log_posterior() -> torch.Tensor:
        opt.zero_grad()
        logits = theta[cat] - b  # [n, 2]
        nll = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="sum")
        prior = (theta**2).sum() / (2 * prior_theta**2) + (b**2).sum() / (2 * prior_b**2)
        loss = nll + prior
        loss.backward()
        return loss

    opt.step(neg_log_posterior)
    theta = theta.detach()
    return {name: (float(theta[k, 0]), float(theta[k, 1])) for k, name in enumerate(names)}


def _logit(p: float) -> float:
    p = min(max(p, 1e-6), 1 - 1e-6)
    return math.log(p / (1 - p))


def category_gap(delta: float, p00: float, p11: float) -> float:
    """``sigmoid(logit(|δ|/(1+|δ|)) + 2.7·p00 − 1.05·p11)``."""
    g = abs(delta) / (1 + abs(delta))
    return 1 / (1 + math.exp(-(_logit(g) + 2.7 * p00 - 1.05 * p11)))


def gap_score(
    categories: Sequence[str], text: Sequence[bool], image: Sequence[bool], seed: int = 0
) -> tuple[float, list[CategoryGap]]:
    """The model's gap score (mean over categories) and the per-category details."""
    abilities = fit_irt(categories, text, image, seed=seed)
    by_cat: dict[str, list[str]] = defaultdict(list)
    for c, t, i in zip(categories, text, image, strict=True):
        by_cat[c].append(outcome(t, i))
    rows = []
    for c in sorted(by_cat):
        codes = by_cat[c]
        rates = {o: codes.count(o) / len(codes) for o in OUTCOMES}
        th_t, th_i = abilities[c]
        delta = th_t - th_i
        rows.append(
            CategoryGap(
                c, len(codes), rates, th_t, th_i, delta, category_gap(delta, rates["00"], rates["11"])
            )
        )
    return sum(r.gap for r in rows) / len(rows), rows


def format_gap_score(score: float, rows: list[CategoryGap], title: str = "") -> str:
    """Markdown table of the per-category fit and the score."""
    lines = [f"### {title}", ""] if title else []
    lines += [
        "| category | n | both | text only | image only | neither | θ_text | θ_image | δ | gap |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        p = r.rates
        lines.append(
            f"| {r.category} | {r.n} | {p['11']:.2f} | {p['10']:.2f} | {p['01']:.2f} | {p['00']:.2f} "
            f"| {r.theta_text:+.2f} | {r.theta_image:+.2f} | {r.delta:+.2f} | {r.gap:.3f} |"
        )
    lines += ["", f"**GapEval gap score: {score:.3f}** (mean over {len(rows)} categories; 0 = no gap)"]
    return "\n".join(lines)


def sandbox_gap_score(results: Sequence[dict]) -> tuple[float, list[CategoryGap]]:
    """The gap score of a sandbox model from
    :func:`uniprobe.experiments.sandbox.evaluate.evaluate_items` records (``category``,
    ``understanding``, ``generation`` per item)."""
    return gap_score(
        [r["category"] for r in results],
        [r["understanding"] for r in results],
        [r["generation"] for r in results],
    )


def plot_gap_score(rows: list[CategoryGap], score: float, path: str, title: str = "") -> None:
    """Stacked joint-outcome rates per category, with each category's gap marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"11": "both right", "10": "text only", "01": "image only", "00": "both wrong"}
    colours = {"11": "#4c9a2a", "10": "#e0a030", "01": "#3a78c2", "00": "#b0b0b0"}
    fig, ax = plt.subplots(figsize=(1.2 + 1.3 * len(rows), 3.2))
    x = range(len(rows))
    bottom = [0.0] * len(rows)
    for code in OUTCOMES:
        vals = [r.rates[code] for r in rows]
        ax.bar(x, vals, bottom=bottom, color=colours[code], label=labels[code])
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax.plot(list(x), [r.gap for r in rows], "k_", markersize=22, mew=2.5, label="gap")
    ax.set_xticks(list(x), [r.category.replace("_", "\n") for r in rows], fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_title(f"{title} GapEval gap score {score:.3f}", fontsize=9)
    ax.legend(fontsize=6.5, loc="upper left", bbox_to_anchor=(1, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
