"""UniSandbox's latent-CoT experiment: drawing level-1 expressions is trained, are levels 2-3 drawn?

The training variant (``Suite.training_examples(reasoning_draw=p)``) teaches a share ``p`` of drawing
examples as *level-1* arithmetic drawings of training-split expressions ("draw as many red cup as
7 - 3"), never levels 2-3, never a test expression. Drawing without CoT is then judged per level on
the held-out test expressions, next to understanding of the same expressions, over seeds and against
a control trained without the variant. Per level, the maps ask where (if anywhere) the answer is
computed inside the drawing run:

- probe: is the answer linearly readable at ``<boi>`` (the last prompt position) and at the drawing
  positions (mean over them), best layer, grouped cross-validation over the drawn object;
- logit lens: at which layer, if any, does the answer word become the top token at ``<boi>``;
- patching (level-2 pairs, :func:`uniprobe.experiments.demo_sections.run_patching`, per checkpoint):
  how much of the drawing the understanding run's states restore, at its largest (layer, position).

``level_maps`` computes the per-level maps of one checkpoint; ``latent_cot_table`` pools seeds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from uniprobe.experiments.tasks.prompts import Item
from uniprobe.hooks.jsonio import read_json, write_json

LEVELS = (1, 2, 3)
PROBES = ("probe_boi", "probe_drawing")


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of ``k`` successes in ``n`` trials (what a rate over few items can say)."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def level_maps(model: Any, items: Sequence[Item], out: str | Path) -> dict[str, dict]:
    """Per arithmetic level of ``items``: the best probe layer/accuracy of the answer in the drawing run
    at ``<boi>`` and at the drawing positions, and per layer the share of items whose answer word is the
    logit lens's top token at ``<boi>``. Returns ``{"L1": {...}, ...}``; writes ``maps.json``."""
    from uniprobe.experiments import demo_sections as sections
    from uniprobe.experiments.demo_text import best_probe
    from uniprobe.hooks.adapters import adapter_for
    from uniprobe.probes.lens import logit_lens
    from uniprobe.probes.linear import probe_store
    from uniprobe.probes.splits import ProbeInputError

    out = Path(out)
    arch, tok = model.arch, model.tokenizer
    gen_role = sections.GEN_ROLE[arch]
    arith = [it for it in items if it.category == "arithmetic"]
    store = sections.capture_stores(model, arith, out, arch)["gen"]
    adapter = adapter_for(model)
    result: dict[str, dict] = {}
    for level in LEVELS:
        chosen = [it for it in arith if it.level == level]
        if not chosen:
            continue
        view = store.subset(i for i, ex in enumerate(store.examples) if ex["labels"]["level"] == level)
        rec: dict[str, Any] = {"n": len(chosen)}
        for role, reduce, name in (("text", "last", "probe_boi"), (gen_role, "mean", "probe_drawing")):
            try:
                res = probe_store(
                    view, "answer", roles=[role], reduce=reduce, group_by="entity", folds=3, n_boot=200
                )
            except ProbeInputError as err:  # too few items of some answer at this level (level 1: 16)
                rec[name] = {"layer": None, "accuracy": None, "readable": False, "skipped": str(err)}
                continue
            top, ok = best_probe(res.rows)
            rec[name] = {
                "layer": top["layer"], "accuracy": top["accuracy"], "readable": ok,
                "ci": [top.get("ci_low"), top.get("ci_high")], "chance": top.get("chance"),
            }  # fmt: skip
        inputs = adapter.prepare(model, sections.examples_of(chosen, "gen"), mode="generation")
        lens = logit_lens(
            model, inputs, [[tok[it.answer]] for it in chosen], adapter=adapter, roles=["text"], generate=True
        )
        last = sections._last_text_positions(lens.rows)  # each example's <boi>, where drawing begins
        top1 = [r for r in lens.rows if r["lens"] == "logit" and r["pos"] == last[r["example"]]]
        by_layer = {
            layer: float(np.mean([r["rank"] == 1 for r in top1 if r["layer"] == layer]))
            for layer in sorted({r["layer"] for r in top1})
        }
        rec["lens_boi_top1"] = by_layer
        result[f"L{level}"] = rec
    write_json(out / "maps.json", result)
    return result


def drawing_rates(gap_rows: Sequence[dict], results: Sequence[dict] = (), items: Sequence[Item] = ()) -> dict:
    """``{"L1": {"n", "understanding", "drawing", "chance"}, ...}`` from a gap table's arithmetic rows.

    ``chance`` (given the per-item ``results`` of
    :func:`~uniprobe.experiments.sandbox.evaluate.evaluate_items` and their ``items``): the rate a
    drawer with the same distribution of drawn counts would reach if its counts were unrelated to
    the expressions, ``Σ_k P(drawn = k) · P(answer = k)``: the baseline a model that draws varied
    counts without computing them must beat (a blind uniform guess: 20%).
    """
    from uniprobe.experiments.tasks import world

    out = {}
    for r in gap_rows:
        if r["category"] == "arithmetic":
            rate = {"n": r["n"], "understanding": r["understanding"], "drawing": r["generation"]}
            out[f"L{r['level']}"] = rate
    answer = {it.id: int(it.answer) for it in items}
    for level, rate in out.items():
        rows = [x for x in results if x["category"] == "arithmetic" and f"L{x['level']}" == level]
        if rows and all(x["id"] in answer for x in rows):
            drawn = np.array([int((np.asarray(x["grid"]) != world.EMPTY).sum()) for x in rows])
            truth = np.array([answer[x["id"]] for x in rows])
            counts = set(drawn) | set(truth)
            rate["chance"] = float(sum(np.mean(drawn == k) * np.mean(truth == k) for k in counts))
    return out


def latent_cot_table(groups: dict[str, Sequence[dict]]) -> str:
    """Markdown: per group of runs (e.g. ``{"latent-CoT": [...], "control": [...]}``, each run
    ``{"seed", "rates": drawing_rates(...), "maps": level_maps(...)}``) and level: drawing without CoT
    pooled over seeds with its 95% Wilson interval, each seed's value, understanding, and the maps."""
    lines = [
        "| recipe | level | seeds | drawing without CoT, pooled [95% CI] | per seed "
        "| chance at its own counts | understanding "
        "| probe at <boi> (best layer) | probe at drawing positions "
        "| lens: answer top-1 at <boi> (best layer) |",
        "| --- | ---: | --- | ---: | --- | --- | ---: | --- | --- | --- |",
    ]
    for name, runs in groups.items():
        for level in (f"L{k}" for k in LEVELS):
            rates = [r["rates"][level] for r in runs if level in r["rates"]]
            if not rates:
                continue
            k = sum(round(x["drawing"] * x["n"]) for x in rates)
            n = sum(x["n"] for x in rates)
            lo, hi = wilson(k, n)
            per_seed = " / ".join(f"{100 * x['drawing']:.0f}%" for x in rates)
            und = " / ".join(f"{100 * x['understanding']:.0f}%" for x in rates)
            chance = " / ".join(f"{100 * x['chance']:.0f}%" if "chance" in x else "—" for x in rates)
            maps = [r["maps"][level] for r in runs if level in r.get("maps", {})]

            probe = {key: " / ".join(_probe_cell(m[key]) for m in maps) or "—" for key in PROBES}
            lens = " / ".join(_lens_cell(m["lens_boi_top1"]) for m in maps) or "—"
            lines.append(
                f"| {name} | {level[1:]} | {', '.join(str(r['seed']) for r in runs)} | "
                f"{100 * k / n:.0f}% [{100 * lo:.0f}–{100 * hi:.0f}%] | {per_seed} | {chance} | {und} | "
                f"{probe['probe_boi']} | {probe['probe_drawing']} | {lens} |"
            )
    return "\n".join(lines) + "\n"


def _probe_cell(p: dict) -> str:
    if p["accuracy"] is None:
        return "too few items"
    ci = p.get("ci") or [None, None]
    span = "" if ci[0] is None else f" [{100 * ci[0]:.0f}–{100 * ci[1]:.0f}]"
    return f"{100 * p['accuracy']:.0f}%{span} (L{p['layer']}{'' if p['readable'] else ', not above control'})"


def _lens_cell(top1: dict) -> str:
    layer, share = max(top1.items(), key=lambda kv: (kv[1], -int(kv[0])))  # ties: the earlier layer
    return f"{100 * share:.0f}% (L{layer})"


def _drawing_stream(path: str | Path) -> dict | None:
    """A sandbox-mot checkpoint's drawing stream (``training.json``'s ``generation_data``), else None."""
    rec = Path(path) / "training.json"
    return read_json(rec).get("generation_data") if rec.is_file() else None


def analyse_checkpoint(path: str | Path, out: str | Path, seed: int | None = None) -> dict:
    """One trained checkpoint: arithmetic understanding and drawing without CoT per level (the gap
    table's rows), :func:`level_maps`, the demo's attention knockout of drawing → expression in the
    run without CoT (:func:`uniprobe.experiments.demo_attention.run_attention`, level-2 items) and its
    understanding → generation patching peak (``patching``, level-2 pairs).

    ``out/run.json`` is kept: a later call on weights with the same SHA-256 returns it unchanged, so a
    rerun that adds groups or seeds analyses only the new checkpoints (other weights are analysed anew).
    A reused run records ``path`` as its checkpoint: a copy of the weights elsewhere (the shipped folder
    retrained, its old weights kept in a seed's folder) keeps the run and names where they are now.
    """
    from uniprobe.experiments.demo_attention import run_attention
    from uniprobe.experiments.sandbox.checkpoint import load_sandbox, sha256_file
    from uniprobe.experiments.sandbox.evaluate import evaluate_items, gap_table
    from uniprobe.experiments.tasks.suite import Suite

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights = sha256_file(Path(path) / "model.safetensors")
    done = out / "run.json"
    if done.is_file():  # a rerun with more groups or seeds: a finished run of the same weights is kept
        prev = read_json(done)  # a truncated or edited run.json is named, not silently redone
        if prev.get("weights_sha256") == weights:
            if prev.get("checkpoint") != str(path):  # the same weights, now read from another folder
                prev = {**prev, "checkpoint": str(path)}
                write_json(done, prev)
            stream = _drawing_stream(path)
            if stream is not None and prev.get("generation_data") != stream:  # a MoT run from before it
                prev = {**prev, "generation_data": stream}
                write_json(done, prev)
            if "answer_slot" not in prev.get("patching", {}):  # a run from before patching: add only that
                prev = {**prev, "patching": _patching(load_sandbox(path, verify=False), out)}
                write_json(done, prev)
            return prev
    model = load_sandbox(path, verify=False)  # a trial's checkpoint: its SHA256SUMS is its own
    suite = Suite(0)
    arith = [it for it in suite.items if it.category == "arithmetic"]
    results = evaluate_items(model, arith, cot=False, progress=False)
    rows = gap_table(model, suite=suite, results=results)
    recipe = model.training_recipe or {}
    run = {
        "checkpoint": str(path),
        "weights_sha256": weights,  # what a rerun compares before reusing this run
        "seed": recipe.get("seed", seed),
        "arch": model.arch,
        "data": recipe.get("data"),
        # sandbox-mot: "data" is its understanding expert's stream; its drawing stream (where the
        # latent-CoT variant's reasoning_draw is) is recorded beside it
        **({"generation_data": recipe["generation_data"]} if recipe.get("generation_data") else {}),
        "rates": drawing_rates(rows, results, arith),
        "maps": level_maps(model, suite.items, out),
    }
    try:
        attn = run_attention(model, suite.items, model.arch, out)["direct_knockout"]
        run["attention"] = {
            "clean": attn["clean"],
            "expression": attn["expression"],
            "prompt": attn["whole prompt"],
        }
    except ValueError as err:  # no level-2 item understood: nothing to trace
        run["attention"] = {"skipped": str(err)}
    run["patching"] = _patching(model, out)
    write_json(out / "run.json", run)
    return run


def _patching(model: Any, out: Path) -> dict:
    """Understanding → generation patching on level-2 pairs (the demo's, ``out/patch-<arch>.json``):
    its largest normalised effect ``{"effect", "layer", "column"}`` and ``answer_slot``, the largest
    over layers of the understanding run's ``<answer>`` state written over ``<boi>`` (where a computed
    answer would be handed to the drawing; the largest cell is often an expression word at layer 0,
    which swaps an input)."""
    from uniprobe.experiments.demo_sections import patch_peak, run_patching
    from uniprobe.experiments.tasks.suite import Suite

    result = run_patching(model, Suite(0).items, model.arch, out)
    slot = np.array(result["grid"], dtype=float)[:, result["columns"].index("answer slot")]
    return {**patch_peak(result), "answer_slot": float(np.nanmax(slot))}


def attention_lines(groups: dict[str, Sequence[dict]]) -> str:
    """One line per run: the drawing's mean log p of the right tiles, clean and with the drawing →
    expression edges knocked out at every layer at once (the last entry of the per-layer list), and
    the largest understanding → generation patching effect (1: as with the answer stated)."""
    lines = []
    for name, runs in groups.items():
        for r in runs:
            a = r["attention"]
            if "skipped" in a:
                line = f"- {name}, seed {r['seed']}: attention not traced ({a['skipped']})"
            else:
                line = (
                    f"- {name}, seed {r['seed']}: log p of the right drawing {a['clean']:.2f}; drawing → "
                    f"expression knocked out at every layer {a['expression'][-1]:.2f}, the whole prompt "
                    f"{a['prompt'][-1]:.2f}"
                )
            if "patching" in r:
                pk = r["patching"]
                line += (
                    f"; understanding → generation patching at most {pk['effect']:.2f} (layer {pk['layer']}, "
                    f"{pk['column']}), from the answer slot at most {pk['answer_slot']:.2f}"
                )
            lines.append(line)
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--group", nargs="+", action="append", required=True, metavar=("NAME", "CHECKPOINT"),
        help="a recipe's name then its checkpoints (one per seed); repeat for the control",
    )  # fmt: skip
    p.add_argument(
        "--out", required=True, help="folder for latent-cot.json / latent-cot.md and each run's maps"
    )
    a = p.parse_args(argv)
    out = Path(a.out)
    groups: dict[str, list[dict]] = {}
    for name, *dirs in a.group:
        groups[name] = [analyse_checkpoint(d, out / name / f"run-{k}") for k, d in enumerate(dirs)]
    md = latent_cot_table(groups) + "\n" + attention_lines(groups)
    write_json(out / "latent-cot.json", groups)
    (out / "latent-cot.md").write_text(md)
    print(md, end="")


if __name__ == "__main__":
    main()
