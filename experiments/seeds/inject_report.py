"""Markdown and figure for knowledge injection; every sentence is computed from the result's numbers."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

FORWARD, INVERSE = "knowledge (forward)", "knowledge (inverse)"
COLUMNS = (
    (FORWARD, "understanding", "new facts: understanding"),
    (FORWARD, "generation", "forward drawing"),
    (FORWARD, "generation_cot", "forward drawing + CoT"),
    (INVERSE, "understanding", "inverse: understanding"),
    (INVERSE, "generation", "inverse drawing"),
    (INVERSE, "generation_cot", "inverse drawing + CoT"),
)


def pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.0f}%"


def _stages(result: dict) -> list[tuple[str, dict]]:
    stages = [("before injection", result["before"])]
    stages += [(f"after {d}-only injection", result[d]["after"]) for d in ("understanding", "generation")]
    return stages


def _get(m: dict, kind: str, metric: str) -> float | None:
    return m["summary"].get(kind, {}).get(metric)


def format_inject(result: dict) -> str:
    """The accuracy table, the maps' headline numbers and a paragraph stating what they show."""
    s = result["settings"]
    names = ", ".join(c["name"] for c in result["characters"])
    lines = [
        f"### Knowledge injection (sandbox-{result['model_arch']})",
        "",
        f"{len(result['characters'])} new characters ({names}); each direction fine-tunes the same "
        f"starting weights for {s['steps']} steps (batch {s['batch_size']}, lr {s['lr']}, "
        f"{pct(s['replay'])} replay of pre-training data).",
        "",
        "| stage | " + " | ".join(c[2] for c in COLUMNS) + " | old facts: und. | direct: und. / drawing |",
        "| --- | " + " | ".join("---:" for _ in COLUMNS) + " | ---: | ---: |",
    ]
    for name, m in _stages(result):
        cells = [pct(_get(m, k, metric)) for k, metric, _ in COLUMNS]
        o = m["original"]
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {pct(o['knowledge_understanding'])} | "
            f"{pct(o['direct_understanding'])} / {pct(o['direct_generation'])} |"
        )
    lines += ["", inject_paragraph(result)]
    if "maps" in result:
        lines += ["", maps_paragraph(result)]
    return "\n".join(lines)


def inject_paragraph(result: dict) -> str:
    u, g = result["understanding"]["after"], result["generation"]["after"]
    und = _get(u, FORWARD, "understanding")
    fwd, fwd_cot = _get(u, FORWARD, "generation"), _get(u, FORWARD, "generation_cot")
    inv, inv_cot = _get(u, INVERSE, "generation"), _get(u, INVERSE, "generation_cot")
    text = (
        f"Taught through text QA only, the model answers {pct(und)} of questions about the new "
        f"characters, but draws their favourite fruit, flower or portrait {pct(fwd)} of the time without "
        f"CoT and {pct(fwd_cot)} with CoT (inverse prompts: {pct(inv)} without, {pct(inv_cot)} with)."
    )
    gap = (und or 0) - (fwd or 0)
    text += (
        " Understanding does not transfer to generation without an explicit reasoning step."
        if gap > 0.3 and (fwd_cot or 0) - (fwd or 0) > 0.3
        else f" The understanding–generation gap after injection is {100 * gap:.0f} points."
    )
    g_fwd, g_und = _get(g, FORWARD, "generation"), _get(g, FORWARD, "understanding")
    text += (
        f" The other direction: taught by drawing only, it draws the trained forward prompts {pct(g_fwd)} "
        f"of the time and answers questions about the same facts {pct(g_und)} of the time"
        f" (inverse drawing: {pct(_get(g, INVERSE, 'generation'))})."
    )
    o0, ou, og = (m["original"] for m in (result["before"], u, g))
    text += (
        f" Cost on the original suite: the pre-trained characters' facts are answered "
        f"{pct(o0['knowledge_understanding'])} before, {pct(ou['knowledge_understanding'])} after "
        f"understanding-only and {pct(og['knowledge_understanding'])} after generation-only injection; "
        f"direct drawing {pct(o0['direct_generation'])}, {pct(ou['direct_generation'])}, "
        f"{pct(og['direct_generation'])}."
    )
    return text


def _best(rows: list[dict], role_part: str) -> dict | None:
    sel = [r for r in rows if role_part in r["role"]]
    return max(sel, key=lambda r: r["accuracy"]) if sel else None


def _acc(r: dict) -> str:
    return f"{pct(r['accuracy'])} [{pct(r.get('ci_low'))}, {pct(r.get('ci_high'))}]"


def maps_paragraph(result: dict) -> str:
    """Probe and patching headline before vs after understanding-only injection."""
    parts = []
    for when in ("before", "after"):
        m = result["maps"][when]
        gen_role = "query" if result["model_arch"] == "query" else "image_gen"
        best_gen, best_boi = _best(m["probe"], gen_role), _best(m["probe"], "text")
        grid = m["patch"]["grid"]
        slot = max(row[-1] for row in grid)
        name = max(row[0] for row in grid)
        parts.append(
            f"{when} injection, a probe trained on the pre-trained characters reads the new characters' "
            f"favourite at best {_acc(best_gen)} at the {gen_role} positions (layer {best_gen['layer']}) "
            f"and {_acc(best_boi)} at <boi> (layer {best_boi['layer']}), chance "
            f"{pct(best_gen.get('chance'))}, n = {best_gen.get('n_test')}; patching the understanding run "
            f"into the drawing run recovers at most {name:.2f} of the clean drawing's log-probability at "
            f"the name and {slot:.2f} at the answer slot"
        )
    return "Probe and patching maps (understanding-only injection): " + "; ".join(parts) + "."


def plot_accuracy(result: dict, path: Path) -> None:
    """Grouped bars: each stage's accuracies on the new characters."""
    stages = _stages(result)
    fig, ax = plt.subplots(figsize=(9, 3.2))
    width = 0.8 / len(stages)
    for k, (name, m) in enumerate(stages):
        vals = [_get(m, kind, metric) or 0.0 for kind, metric, _ in COLUMNS]
        ax.bar([i + k * width for i in range(len(COLUMNS))], vals, width, label=name)
    ax.set_xticks([i + width * (len(stages) - 1) / 2 for i in range(len(COLUMNS))])
    ax.set_xticklabels([c[2] for c in COLUMNS], fontsize=7, rotation=15)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=7)
    ax.set_title(f"sandbox-{result['model_arch']}: knowledge injection", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
