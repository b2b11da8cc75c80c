"""Figures a reader takes in at a glance, checked without pixels: panels wrap into rows, legends sit
outside the data, layer ticks are integers, colour bars and axes say what they show, patch columns
read as the prompt; and the demo's sentences use the statistic the figures plot (one "readable")."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from uniprobe.experiments import demo_sections, demo_text  # noqa: E402
from uniprobe.probes.patching import PatchResult, grid_sites  # noqa: E402
from uniprobe.probes.patching.plots import heatmap_figure  # noqa: E402
from uniprobe.probes.plots import lens_map_figure, plot_probe_map, probe_map_figure  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _panels(fig) -> list:
    """Axes that hold data (not colour bars, not switched off)."""
    return [ax for ax in fig.axes if ax.axison and ax.get_label() != "<colorbar>" and ax.images + ax.lines]


def _per_row(axes) -> list[int]:
    rows: dict[float, int] = defaultdict(int)
    for ax in axes:
        rows[round(ax.get_position().y0, 3)] += 1
    return [rows[k] for k in sorted(rows, reverse=True)]


def _colorbar_labels(fig) -> list[str]:
    return [ax.get_ylabel() for ax in fig.axes if ax.get_label() == "<colorbar>"]


def _outside_every_axes(fig, legend) -> bool:
    fig.canvas.draw()
    box = legend.get_window_extent()
    return not any(box.overlaps(ax.get_window_extent()) for ax in fig.axes if ax.axison)


def _probe_rows(kinds: int = 6, layers: int = 4) -> list[dict]:
    rows = []
    for k in range(kinds):
        for layer in range(layers):
            for role in ("text", "image_gen"):
                acc = 0.3 + 0.1 * layer
                rows.append(
                    {"point": f"blocks.{layer}.kind{k}", "layer": layer, "role": role, "accuracy": acc,
                     "ci_low": acc - 0.1, "ci_high": acc + 0.1, "control": 0.25, "chance": 0.2}
                )  # fmt: skip
    return rows


def test_probe_map_wraps_and_keeps_its_legend_off_the_data(tmp_path) -> None:
    fig = probe_map_figure(_probe_rows(kinds=6), title="t")
    panels = _panels(fig)
    assert len(panels) == 6 and _per_row(panels) == [4, 2]
    legend = fig.legends[0]
    texts = [t.get_text() for t in legend.get_texts()]
    assert any("shuffled-label control" in t for t in texts) and "95% bootstrap CI" in texts
    assert "majority class" in texts and {"text", "image_gen"} <= set(texts)
    assert _outside_every_axes(fig, legend)
    for ax in panels:
        assert all(float(t).is_integer() for t in ax.get_xticks()), ax.get_xticks()
        assert not ax.get_legend()
    assert plot_probe_map(_probe_rows(kinds=1), tmp_path / "p.png").stat().st_size > 1000


def test_lens_map_of_many_answers_wraps_into_rows() -> None:
    summary = [
        {"lens": lens, "token": f"t{j:02d}", "token_str": f"w{j}", "role": role, "layer": layer,
         "mean_prob": 0.1 * layer, "mean_rank": 1 + layer}
        for lens in ("logit", "tuned") for j in range(23) for role in ("text", "query") for layer in range(3)
    ]  # fmt: skip
    fig = lens_map_figure(summary, title="sweep")
    panels = _panels(fig)
    assert len(panels) == 46
    rows = _per_row(panels)
    assert max(rows) <= 5 and len(rows) == 10  # 23 answers → 5 rows per lens, each lens its own rows
    assert panels[0].get_title().startswith("logit lens") and panels[-1].get_title().startswith("tuned lens")
    assert _colorbar_labels(fig) == ["mean probability of the answer token"]
    w, h = fig.get_size_inches()
    assert w / h < 3  # not one long strip


def test_patch_heatmap_labels_its_colour_and_axes() -> None:
    grid = grid_sites(3, 4, ("resid_pre", "attn_out"), labels=["2", "+", "1", "?"])
    values = torch.arange(24, dtype=torch.float32)
    res = PatchResult(values, clean=23.0, corrupted=0.0, sites=grid.sites, grid=grid, metric="m")
    fig = heatmap_figure(res)
    panels = _panels(fig)
    assert len(panels) == 2 and _per_row(panels) == [2]
    for ax in panels:
        assert ax.get_xlabel() == "position (token)" and ax.get_ylabel() == "layer"
        assert [t.get_text() for t in ax.get_xticklabels()] == ["2", "+", "1", "?"]
        assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "1", "2"]
    labels = _colorbar_labels(fig)
    assert len(labels) == 2 and all("(patched − corrupted) / (clean − corrupted)" in t for t in labels)


def test_demo_patch_figure_reads_as_the_prompt() -> None:
    grid = np.linspace(-1, 1, 24).reshape(4, 6)
    cols = ["number 1", "operator 1", "number 2", "operator 2", "number 3", "answer slot"]
    tokens = ["1", "+", "3", "+", "0", "<answer>→<boi>"]
    fig = demo_sections.patch_figure(
        grid, cols, "ar", tokens=tokens, source_prompt="what is 1 + 3 + 0 ?", n_pairs=12
    )
    ax = _panels(fig)[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == tokens
    assert ax.get_xlabel().startswith("position (token") and "what is 1 + 3 + 0 ?" in ax.get_xlabel()
    assert "12 pairs" in ax.get_xlabel() and ax.get_ylabel().startswith("layer")
    assert all(float(t).is_integer() for t in ax.get_yticks())
    assert "normalised effect" in _colorbar_labels(fig)[0]


def test_demo_pair_tokens_show_the_source_tokens() -> None:
    words = ["what", "is", "1", "+", "3", "?", "<answer>", "draw", "as", "many", "7", "-", "2", "<boi>"]
    tok = SimpleNamespace(decode=lambda ids: " ".join(words[i] for i in ids))
    source = SimpleNamespace(kwargs={"input_ids": torch.tensor([[0, 1, 2, 3, 4, 5, 6]])})
    target = SimpleNamespace(kwargs={"input_ids": torch.tensor([[7, 8, 9, 10, 11, 2, 13]])})
    align = SimpleNamespace(pairs=[(4, 2), (5, 3), (6, 4), (6, 6)])
    assert demo_sections.pair_tokens(tok, source, target, align) == ["1", "+", "3", "<answer>→<boi>"]


def test_demo_lens_figure_integer_layers_and_legend_below() -> None:
    summary = [
        {"group": g, "layer": layer, "role": role, "mean_prob": 0.2 * layer, "top1": 0.0}
        for g in ("arithmetic", "knowledge") for role in ("image_gen", "text(<boi>)") for layer in range(4)
    ]  # fmt: skip
    fig = demo_sections.lens_figure(summary, "ar")
    panels = _panels(fig)
    assert _per_row(panels) == [2]
    for ax in panels:
        assert all(float(t).is_integer() for t in ax.get_xticks())
        assert ax.get_xlabel() == "layer" and ax.get_ylabel() == "mean p(answer word)"
    assert _outside_every_axes(fig, fig.legends[0])


# -- the sentences -------------------------------------------------------------------------------
def _row(role: str, layer: int, acc: float, lo: float, control: float, chance: float = 0.2) -> dict:
    return {"role": role, "layer": layer, "accuracy": acc, "ci_low": lo, "ci_high": acc + 0.15,
            "control": control, "chance": chance, "selectivity": acc - control}  # fmt: skip


def test_best_probe_is_the_highest_accuracy_among_readable_ones() -> None:
    # the case: layer 2 has the higher selectivity, layer 1 the higher accuracy and is readable
    rows = [_row("gen:image_gen", 1, 0.52, 0.35, 0.30), _row("gen:image_gen", 2, 0.48, 0.30, 0.10)]
    top, ok = demo_text.best_probe(rows)
    assert ok and top["layer"] == 1
    assert demo_text.readable(rows[0]) and not demo_text.readable(_row("x", 0, 0.5, 0.19, 0.1))
    none = [_row("x", 0, 0.40, 0.25, 0.30), _row("x", 1, 0.45, 0.28, 0.30)]
    top, ok = demo_text.best_probe(none)
    assert not ok and top["layer"] == 1  # the figure's peak, said to be not readable
    assert not demo_text.readable({"ci_low": None, "control": 0.1})


def test_probe_paragraph_uses_the_one_definition() -> None:
    rows = [
        _row("und:text", 0, 0.9, 0.8, 0.2),
        _row("gen:text", 0, 0.3, 0.15, 0.25),
        _row("gen:image_gen", 1, 0.52, 0.35, 0.30),
        _row("gen:image_gen", 2, 0.48, 0.30, 0.10),
    ]
    text = demo_text.probe_paragraph("ar", rows)
    assert (
        "readable at the image_gen positions where the model draws — at layers 1, 2; best at layer 1: 52%"
        in text
    )
    assert (
        "not readable at the prompt's last position at any layer — highest accuracy at layer 0: 30%" in text
    )
    assert "shuffled-label control 30%" in text and "selectivity" not in text
    assert "Readable" in demo_text.READABLE and "shuffled-label control" in demo_text.READABLE


def _items() -> list:
    def it(cat: str, group: str) -> SimpleNamespace:
        return SimpleNamespace(category=cat, group=group)

    return (
        [it("direct", f"d{i}") for i in range(3)]
        + [it("mapping", f"m{i // 2}") for i in range(4)]
        + [it("arithmetic", f"a{i}") for i in range(2)]
    )


def test_counts_add_up_and_say_why() -> None:
    c = demo_text.item_counts(_items())
    assert c == {"prompts": 9, "mapping_prompts": 4, "mapping_pairs": 2, "table": 7}
    opening = demo_text.opening_paragraph(_items())
    assert "9 test prompts (3 direct, 4 mapping, 2 arithmetic)" in opening
    assert "4 mapping prompts as 2 A/B pairs" in opening and "sums to 7" in opening
    assert opening.count("**Readable**") == 1
    rows = [{"n": 3}, {"n": 2}, {"n": 2}]
    note = demo_sections._count_note(_items(), rows)
    assert "4 prompts = 2 pairs" in note and "n sums to 7 for the 9 test prompts" in note


def test_the_two_largest_gaps_name_their_measures() -> None:
    kinds = ("direct", "reasoning", "knowledge (forward)", "knowledge (inverse)")
    accs = [(1.0, 1.0, 1.0), (0.9, 0.1, 0.8), (0.8, 0.5, 0.7), (0.6, 0.4, 0.5)]
    summary = {
        k: {"kind": k, "understanding": u, "generation": g, "generation_cot": c}
        for k, (u, g, c) in zip(kinds, accs, strict=True)
    }
    text = demo_text.gap_paragraph("m", summary)
    assert "largest understanding − generation accuracy difference is on reasoning" in text
    assert "80 points" in text
    cat = SimpleNamespace(category="mapping", gap=0.7, delta=1.2, n=120, rates={"10": 0.3, "00": 0.5})
    low = SimpleNamespace(category="direct", gap=0.01, delta=0.0, n=60, rates={"10": 0.0, "00": 0.0})
    g = demo_text.gapeval_paragraph((0.35, [cat, low], ""))
    assert (
        "Fitting GapEval's two-dimensional IRT model" in g and "differently from the accuracy difference" in g
    )
    assert "largest category gap is on mapping (gap score 0.700" in g and "of its 120 prompts" in g
