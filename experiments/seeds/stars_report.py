"""Markdown and figure for STARS; every sentence is computed from the result's numbers."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from uniprobe.experiments.seeds.inject_report import pct  # noqa: E402


def format_stars(result: dict, paragraph: bool = True) -> str:
    """Title, settings line and the per-level table; then (``paragraph``) :func:`stars_paragraph`."""
    s = result["settings"]
    lines = [
        f"### STARS self-training (sandbox-{result['model_arch']})",
        "",
        f"{s['prompts_per_level']} training-split reasoning prompts per level drawn with CoT; samples "
        f"the model's own counting agrees with are kept; {s['steps']} fine-tuning steps (batch "
        f"{s['batch_size']}, lr {s['lr']}, {pct(s['replay'])} replay) on prompt-without-CoT → kept drawing.",
        "",
        "| level | CoT answer right | kept / drawn | right among kept | drawing before | drawing after | "
        "+ CoT before | + CoT after | understanding before | understanding after |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for level, f in result["filter"].items():
        b, a = result["before"][level], result["after"][level]
        prec = f["kept_right"] / f["kept"] if f["kept"] else None
        lines.append(
            f"| {level} | {pct(f['answer_right'] / f['drawn'])} | {f['kept']} / {f['drawn']} | {pct(prec)} | "
            f"{pct(b['generation'])} | "
            f"{pct(a['generation'])} | {pct(b['generation_cot'])} | {pct(a['generation_cot'])} | "
            f"{pct(b['understanding'])} | {pct(a['understanding'])} |"
        )
    if paragraph:
        lines += ["", stars_paragraph(result)]
    return "\n".join(lines)


def _mean(d: dict, metric: str) -> float:
    n = sum(v["n"] for v in d.values())
    return sum(v[metric] * v["n"] for v in d.values()) / max(n, 1)


def stars_paragraph(result: dict) -> str:
    b, a = _mean(result["before"], "generation"), _mean(result["after"], "generation")
    bc, ac = _mean(result["before"], "generation_cot"), _mean(result["after"], "generation_cot")
    change = "rises from" if a > b + 0.02 else "falls from" if a < b - 0.02 else "stays about the same,"
    text = (
        f"Drawing the test reasoning prompts without CoT {change} {pct(b)} to {pct(a)} after "
        f"self-training (with CoT: {pct(bc)} → {pct(ac)})."
    )
    layers = [r for r in result["weight_change"] if r["layer"] is not None and r["part"] != "norm"]
    if layers:
        top = max(layers, key=lambda r: r["relative_change"])
        by_part = {
            p: sum(r["relative_change"] for r in layers if r["part"] == p)
            / max(1, sum(r["part"] == p for r in layers))
            for p in ("attention", "mlp")
        }
        text += (
            f" The largest relative weight change is in layer {top['layer']}'s {top['part']} "
            f"({top['relative_change']:.3f}); mean over layers: attention {by_part['attention']:.3f}, "
            f"MLP {by_part['mlp']:.3f}."
        )
    if "maps" in result:
        gen_role = "query" if result["model_arch"] == "query" else "image_gen"
        parts = []
        for when in ("before", "after"):
            rows = [r for r in result["maps"][when]["probe"] if r["role"].endswith(gen_role)]
            best = max(rows, key=lambda r: r["accuracy"]) if rows else None
            slot = max(row[-1] for row in result["maps"][when]["patch"]["grid"])
            parts.append(
                f"{when}: the answer is read at the {gen_role} positions at best "
                f"{pct(best['accuracy'] if best else None)} (layer {best['layer'] if best else '—'}), and "
                f"patching the understanding run's answer slot recovers up to {slot:.2f}"
            )
        text += " Maps: " + "; ".join(parts) + "."
    return text


def plot_stars(result: dict, path: Path) -> None:
    """Left: drawing accuracy without CoT per level, before vs after. Right: relative weight change."""
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(9, 3.2))
    levels = list(result["before"])
    for k, when in enumerate(("before", "after")):
        vals = [result[when][lv]["generation"] for lv in levels]
        ax.bar([i + 0.4 * k for i in range(len(levels))], vals, 0.4, label=f"{when} STARS")
    ax.set_xticks([i + 0.2 for i in range(len(levels))], [f"level {lv}" for lv in levels])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("drawing accuracy, no CoT")
    ax.legend(fontsize=7)
    for part in ("attention", "mlp"):
        rows = sorted(
            (r["layer"], r["relative_change"])
            for r in result["weight_change"]
            if r["layer"] is not None and r["part"] == part
        )
        bx.plot([r[0] for r in rows], [r[1] for r in rows], marker="o", label=part)
    bx.set_xlabel("layer")
    bx.set_ylabel("||ΔW|| / ||W||")
    bx.legend(fontsize=7)
    fig.suptitle(f"sandbox-{result['model_arch']}: STARS self-training", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
