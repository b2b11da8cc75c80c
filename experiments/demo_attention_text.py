"""The sentences of the demo's "How does the answer travel?" section, each computed from the numbers of
:func:`uniprobe.experiments.demo_attention.run_attention` (``attention-{arch}.json``).

One threshold decides every "matters" / "does not matter": :data:`MATTERS`, a change of the metric (mean
log p per tile of the right drawing, in nats) of at least 0.1 — stated in the paragraph itself.
"""

from __future__ import annotations

import numpy as np

MATTERS = 0.1
# what the drawing positions hold in the forwards measured, by the model's generation role
TEACHER_FORCED = {
    "image_gen": "the drawing positions hold the right tiles (AR, teacher-forced) or empty latents (MoT)",
    "query": "the query tokens draw every cell in one forward",
}


def largest_change(ko: dict, group: str) -> dict:
    """``{"layer", "value", "delta"}``: the single layer whose knockout of ``group`` moves the metric
    most (by absolute change from ``clean``), plus ``"all"`` / ``"all_delta"``: every layer at once."""
    values = np.asarray(ko[group], dtype=float)
    per_layer = values[:-1] - ko["clean"]
    layer = int(np.argmax(np.abs(per_layer)))
    return {
        "layer": layer,
        "value": float(values[layer]),
        "delta": float(per_layer[layer]),
        "all": float(values[-1]),
        "all_delta": float(values[-1] - ko["clean"]),
    }


def _effect(c: dict) -> str:
    """``"lowers it to -0.76 (-0.75)"`` / ``"changes it by at most +0.00"`` for one knockout."""
    if abs(c["all_delta"]) < MATTERS and abs(c["delta"]) < MATTERS:
        return (
            f"leaves it within {MATTERS} (largest change {c['delta']:+.2f} at layer {c['layer']}, "
            f"{c['all_delta']:+.2f} at every layer)"
        )
    verb = "lowers" if c["all_delta"] < 0 else "raises"
    return (
        f"{verb} it to {c['all']:.2f} at every layer at once ({c['all_delta']:+.2f}); one layer alone moves "
        f"it most at layer {c['layer']} ({c['value']:.2f}, {c['delta']:+.2f})"
    )


def _matters(c: dict) -> bool:
    return abs(c["all_delta"]) >= MATTERS or abs(c["delta"]) >= MATTERS


def mass_sentence(result: dict) -> str:
    mass = np.asarray(result["mass"], dtype=float)
    layer, head = np.unravel_index(np.argmax(mass), mass.shape)
    per_layer = ", ".join(f"{m:.2f}" for m in mass.mean(1))
    return " ".join(
        [
            f"In the CoT run, the {result['gen_role']} positions put {mass.mean():.2f} of their attention on",
            "the CoT answer tokens (`a <eos>`) on average over layers and heads (attending evenly to every",
            f"earlier position would give {result['uniform_share']:.2f}); the most at layer {layer},",
            f"head {head} ({mass[layer, head]:.2f}), and per layer {per_layer}",
            "(layers 0 up; the heatmap).",
        ]
    )


def _loses(c: dict, what: str) -> str:
    """What a knockout of the drawing's edges to ``what`` says about the answer, by the sign of the
    largest change (a knockout may also *raise* the right drawing's probability)."""
    if not _matters(c):
        return f"the drawing does not lose the answer when it cannot see {what}"
    if min(c["delta"], c["all_delta"]) <= -MATTERS:
        at = f"at layer {c['layer']}" if c["delta"] <= -MATTERS else "only with every layer at once"
        return f"without {what} the drawing loses the answer (most {at})"
    return f"without {what} the model draws the right answer more readily, not less"


def cot_knockout_sentence(result: dict) -> str:
    ko = result["cot_knockout"]
    cot, restated = largest_change(ko, "CoT answer"), largest_change(ko, "restated answer")
    return " ".join(
        [
            f"Knocking out the edges from the drawing positions to the CoT answer tokens {_effect(cot)}",
            f"(unknocked {ko['clean']:.2f}; the run without CoT {result['direct_knockout']['clean']:.2f}):",
            f"{_loses(cot, 'the CoT answer tokens')}. Knocking out the edges to the answer as the drawing",
            f"prompt restates it (`draw a ENTITY <boi>`) {_effect(restated)}:",
            f"{_loses(restated, 'the restated answer')}.",
        ]
    )


def direct_knockout_sentence(result: dict) -> str:
    ko = result["direct_knockout"]
    expr, whole = largest_change(ko, "expression"), largest_change(ko, "whole prompt")
    verdict = "matters" if _matters(expr) else "does not matter"
    return " ".join(
        [
            f"In the run without CoT (metric {ko['clean']:.2f}), knocking out the edges from the drawing",
            f"positions to the expression words {_effect(expr)} — it {verdict} at this threshold; to the",
            f"whole prompt, {_effect(whole)}.",
        ]
    )


def steer_sentence(result: dict) -> str:
    s = result["steer"]
    best, n = s["best"], len(result["items"])
    gain = best["metric"] - s["plain"]
    works = gain >= MATTERS or s["drawn_steered"] > s["drawn_plain"]
    layers = ", ".join(p.split(".")[1] for p in s["points"])
    raises = "raises the right drawing" if gain >= MATTERS else "does not raise its probability"
    drawn = f"the model draws {s['drawn_steered']} of {n} items right (unsteered {s['drawn_plain']})"
    verdict = f"steering there {raises} and {drawn}"
    plainly = "" if works else " Nothing in this sweep makes the model draw the answer it knows without CoT."
    where = f"`{s['where']}`" if s["where"].startswith("<") else s["where"]  # HTML would eat <boi>
    return (
        "Steering the run without CoT at "
        f"{where} with alpha × the understanding run's answer direction (the mean `<answer>` state of "
        f"the understanding runs with that answer minus the mean of all; resid_pre of layers {layers}; "
        f"alphas {', '.join(f'{a:g}' for a in s['alphas'])}): the best steered configuration is layer "
        f"{best['layer']} at alpha {best['alpha']:g}, metric {s['plain']:.2f} → {best['metric']:.2f} "
        f"({gain:+.2f}); {verdict}.{plainly}"
    )


def attention_paragraph(result: dict) -> str:
    """The section's text: what was run, (a) mass, (b) CoT knockout, (c) no-CoT knockout, (d) steering."""
    n = len(result["items"])
    return "\n\n".join(
        [
            f"On {n} level-2 arithmetic items the model answers right as questions"
            f" ({', '.join(result['items'])}); {TEACHER_FORCED[result['gen_role']]};"
            f" metric: {result['metric']} (mean over items); a change of at least {MATTERS} counts"
            " as mattering.",
            mass_sentence(result),
            cot_knockout_sentence(result),
            direct_knockout_sentence(result),
            steer_sentence(result),
        ]
    )
