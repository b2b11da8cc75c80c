"""Recipe trials: train a sandbox model on a recipe, measure understanding on held-out reasoning items.

Issue 18 asks for a recipe whose understanding *generalises*: the test arithmetic expressions and
mapping rule sets must occur nowhere in training (``taught_reasoning=0``, checked by
``tests/test_heldout.py``), and understanding of them should still reach 90% while direct drawing
stays at 90%. Each trial appends one JSON line to a log (recipe → held-out understanding per level,
direct drawing, steps, wall time), so negative results are kept too::

    python -m uniprobe.experiments.sandbox.trials --name base --arch ar --steps 1400 \
        --data '{"taught_reasoning": 0}' --log artifacts/sandbox/heldout-trials.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from uniprobe.experiments.sandbox.evaluate import gap_table
from uniprobe.experiments.sandbox.train import DEFAULTS, train_sandbox
from uniprobe.experiments.tasks.suite import Suite


def heldout_scores(model, suite: Suite, progress: bool = False) -> dict[str, float]:
    """Understanding accuracy per reasoning row (``"arith L1"`` ... ``"mapping L3"``), drawing accuracy
    per reasoning row (``"draw arith L1"`` ...) and per direct row (``"draw count"``, ``"draw
    portrait"``, with their understanding ``"und ..."``), without CoT, on ``suite``'s items."""
    items = [it for it in suite.items if it.category in ("direct", "arithmetic", "mapping")]
    rows = gap_table(model, items=items, cot=False, progress=progress)
    out: dict[str, float] = {}
    for r in rows:
        if r["category"] == "direct":
            out[f"draw {r['task']}"] = round(r["generation"], 4)
            out[f"und {r['task']}"] = round(r["understanding"], 4)
        else:  # understanding (the bar), and drawing without CoT (the latent-CoT question)
            out[f"{r['task']} L{r['level']}"] = round(r["understanding"], 4)
            out[f"draw {r['task']} L{r['level']}"] = round(r["generation"], 4)
    return out


def run_trial(
    name: str,
    arch: str,
    steps: int,
    data: dict,
    log: str | Path,
    seed: int | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    time_budget_s: float | None = None,
    out: str | Path | None = None,
    threads: int | None = None,
    backbone: dict | None = None,
    warmup: int = 200,
    init: str | Path | None = None,
) -> dict:
    """Train ``arch`` with the default recipe updated by ``data`` (keys of
    ``Suite.training_examples``), score it with :func:`heldout_scores`, append the record to ``log``.
    ``init``: continue this checkpoint instead of a fresh model (a staged recipe, e.g. from a saved
    learning curve's; the record keeps its path)."""
    t0 = time.time()
    model = train_sandbox(
        arch, out, steps=steps, seed=seed, time_budget_s=time_budget_s, lr=lr, batch_size=batch_size,
        data=data, threads=threads, progress=False, backbone=backbone, warmup=warmup, init=init,
    )  # fmt: skip
    train_s = time.time() - t0
    d = DEFAULTS[arch]
    rec = {
        "name": name,
        "arch": arch,
        "steps": steps,
        "seed": d["seed"] if seed is None else seed,
        "lr": lr or d["lr"],
        "batch_size": batch_size or d["batch_size"],
        "warmup": warmup,
        "backbone": backbone,
        "data": {**d["data"], **data},
        "time_budget_s": time_budget_s,
        "threads": torch.get_num_threads(),
        "train_s": round(train_s, 1),
    }
    if init is not None:
        rec["init"] = str(init)
    log_file = Path(out) / "train_log.jsonl" if out is not None else None
    if log_file is not None and log_file.exists():  # a time budget may stop training early
        last = json.loads(log_file.read_text().splitlines()[-1])
        rec["steps_done"] = last["step"] + 1
        rec["final_loss"] = last["loss"]
    rec["s_per_step"] = round(train_s / rec.get("steps_done", steps), 3)
    with torch.no_grad():
        rec["scores"] = heldout_scores(model, Suite(0))
    rec["eval_s"] = round(time.time() - t0 - train_s, 1)
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    with Path(log).open("a") as f:
        f.write(json.dumps(rec) + "\n")
    return rec


def level1_misses(model, suite: Suite) -> dict[str, list[list[str]]]:
    """The held-out level-1 expressions ``model`` answers wrong, asked as they are ("what is 6 - 1 ?")
    and in level-2 form ("what is 6 - 1 + 0 ?"): ``{"as level 1": [[expr, answer], ...],
    "with + 0": [...]}``. Tells a level-1 fact looked up from one computed like level 2."""
    test = suite.arith_test[1]
    out = {}
    for form, tail in (("as level 1", ""), ("with + 0", " + 0")):
        answers = model.understand([f"what is {e}{tail} ?" for e, _ in test])
        out[form] = [[e, a] for (e, v), a in zip(test, answers, strict=True) if a.strip() != str(v)]
    return out


def portrait_misses(model, suite: Suite, portraits: list[dict] | None = None) -> dict:
    """How ``model`` draws the held-out direct portraits ("draw a portrait of female adult blond pale
    grapes rose", attribute combinations drawn nowhere in training), without CoT: ``{"right": k, "n": n,
    "attributes right": {attr: fraction}, "misses": [{"asked", "drawn", "wrong", "extra tiles",
    "character"}, ...]}``. ``drawn`` reads the portrait cells (``None``: not an attribute tile there),
    ``wrong`` names the attributes drawn otherwise, ``extra tiles`` counts tiles that are not an
    attribute in its own cell, and ``character`` names a taught character whose portrait was drawn
    instead (recall in place of composition), else ``None``. ``portraits``: other attribute sets to
    draw instead (e.g. :func:`training_portraits`, to tell a drawer that cannot compose from one that
    cannot draw)."""
    from uniprobe.experiments.tasks import world
    from uniprobe.experiments.tasks.suite import portrait_prompt, portrait_words

    asked = suite.portrait_test if portraits is None else portraits
    grids = model.generate_image([portrait_prompt(a) for a in asked], cot=False)
    known = {tuple(c.attrs[k] for k in world.ATTRIBUTES): c.name for c in suite.characters}
    right = dict.fromkeys(world.ATTRIBUTES, 0)
    misses = []
    for attrs, grid in zip(asked, grids, strict=True):
        d = world.describe(grid)
        extra = d["n_objects"] - sum(v is not None for v in d["portrait"].values())
        for k in world.ATTRIBUTES:
            right[k] += d["portrait"][k] == attrs[k]
        if not world.satisfies(grid, {"type": "portrait", "attrs": attrs}):
            drawn = tuple(d["portrait"][k] for k in world.ATTRIBUTES)
            misses.append({
                "asked": portrait_words(attrs),
                "drawn": dict(zip(world.ATTRIBUTES, drawn, strict=True)),
                "wrong": [k for k in world.ATTRIBUTES if d["portrait"][k] != attrs[k]],
                "extra tiles": extra,
                "character": known.get(drawn),
            })  # fmt: skip
    n = len(asked)
    return {"right": n - len(misses), "n": n, "attributes right": {k: v / n for k, v in right.items()},
            "misses": misses}  # fmt: skip


def training_portraits(suite: Suite, n: int = 60, seed: int = 0) -> list[dict]:
    """``n`` attribute sets drawn at random from the training split's portraits (every combination
    but the held-out ones and the taught characters', as ``Suite.training_examples`` draws them)."""
    from uniprobe.experiments.tasks.generators import random_attrs

    rng, out = random.Random(seed), []
    while len(out) < n:
        attrs = random_attrs(rng)
        if tuple(attrs.values()) not in suite.portrait_held:
            out.append(attrs)
    return out


def format_trials(log: str | Path) -> str:
    """Markdown table of every trial in ``log``: recipe, steps done, wall time, held-out understanding
    per level, drawing without CoT per arithmetic level (latent-CoT) and direct drawing; "—": not measured."""
    levels = [f"{t} L{k}" for t in ("arith", "mapping") for k in (1, 2, 3)]
    head = [
        "trial",
        "mix",
        "steps done",
        "batch",
        "train min",
        *levels,
        "draw arith L1",
        "draw arith L2",
        "draw arith L3",
        "draw count",
        "draw portrait",
        "und count",
    ]
    lines = ["| " + " | ".join(head) + " |", "| --- | --- |" + " ---: |" * (len(head) - 2)]
    for line in Path(log).read_text().splitlines():
        r = json.loads(line)
        sc = r["scores"]
        cells = [
            r["name"],
            mix_cell(r["data"]) + (f", continuing `{r['init']}`" if r.get("init") else ""),
            str(r.get("steps_done", r["steps"])),
            str(r["batch_size"]),
            f"{r['train_s'] / 60:.0f}",
        ]
        cells += [f"{100 * sc[k]:.0f}%" if k in sc else "—" for k in levels]
        cells += [f"{100 * sc[k]:.0f}%" if k in sc else "—" for k in head[5 + len(levels) :]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def mix_cell(data: dict) -> str:
    """The QA mix and the options a trial added to it (``wide_level1``, ``arith_warmup`` and its
    ``arith_levels`` weights, ``mapping_warmup`` and its ``mapping_one_hop`` share and rehearsal
    shares, ``mapping_chains``, ``reasoning_draw`` and its levels, ``portrait_share``), as the trials
    table shows them."""
    parts = [data["mix"]]
    if data.get("wide_level1"):
        parts.append("level 1 over 0-9")
    if data.get("arith_warmup"):
        levels = data.get("arith_levels")
        share = f" (levels 1-3 at {':'.join(f'{w:g}' for w in levels)})" if levels is not None else ""
        parts.append(f"{data['arith_warmup']} arithmetic questions first{share}")
    if data.get("mapping_warmup"):
        one_hop = data.get("mapping_one_hop")
        share = f" ({100 * one_hop:.0f}% one hop)" if one_hop is not None else ""
        parts.append(f"{data['mapping_warmup']} mapping questions first{share}")
        for key, what in (("mapping_rehearse_arith", "arithmetic"), ("mapping_rehearse_mix", "the mix")):
            if data.get(key):
                parts[-1] += f" ({100 * data[key]:.0f}% more as {what})"
    if data.get("mapping_chains", 2) != 2:
        parts.append(f"{data['mapping_chains']} chains per mapping question")
    if data.get("reasoning_draw"):
        levels = data.get("reasoning_draw_levels", [1])
        which = "level-1" if list(levels) == [1] else f"level-{'/'.join(str(x) for x in levels)}"
        parts.append(f"{100 * data['reasoning_draw']:.0f}% {which} drawings")
    if data.get("portrait_share", 0.25) != 0.25:
        parts.append(f"{100 * data['portrait_share']:.0f}% of direct drawings portraits")
    return " + ".join(parts)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", help="the trial's name (required unless --table)")
    p.add_argument("--arch", default="ar")
    p.add_argument("--steps", type=int, help="training steps (required unless --table)")
    p.add_argument("--table", action="store_true", help="print the log's trials as markdown and stop")
    p.add_argument(
        "--level1", nargs="+", metavar="CHECKPOINT",
        help="print each checkpoint's misses on held-out level 1, as asked and with ' + 0', and stop",
    )  # fmt: skip
    p.add_argument(
        "--portraits", nargs="+", metavar="CHECKPOINT",
        help="print how each checkpoint draws the held-out direct portraits and 60 of the training split's "
        "(no CoT), and stop",
    )  # fmt: skip
    p.add_argument("--data", default="{}", help="JSON: overrides of the arch's data mix")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--backbone", default=None, help="JSON: backbone config overrides")
    p.add_argument("--time-budget", type=float, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="also save the checkpoint here")
    p.add_argument("--init", default=None, help="continue this checkpoint (e.g. a learning curve's --save)")
    p.add_argument("--log", default="artifacts/sandbox/heldout-trials.jsonl")
    a = p.parse_args(argv)
    if a.table:
        print(format_trials(a.log), end="")
        return
    if a.level1:
        from uniprobe.experiments.sandbox import load_sandbox

        for ck in a.level1:
            print(json.dumps({"checkpoint": ck, **level1_misses(load_sandbox(ck), Suite(0))}))
        return
    if a.portraits:
        from uniprobe.experiments.sandbox import load_sandbox

        suite = Suite(0)
        for ck in a.portraits:
            model = load_sandbox(ck)
            held_out = portrait_misses(model, suite)
            training = portrait_misses(model, suite, training_portraits(suite))
            training = {k: training[k] for k in ("right", "n", "attributes right")}
            print(json.dumps({"checkpoint": ck, **held_out, "training split": training}))
        return
    if a.name is None or a.steps is None:
        p.error("--name and --steps are required to run a trial")
    rec = run_trial(
        a.name, a.arch, a.steps, json.loads(a.data), a.log, seed=a.seed, lr=a.lr, batch_size=a.batch_size,
        time_budget_s=a.time_budget, out=a.out, threads=a.threads,
        backbone=json.loads(a.backbone) if a.backbone else None, warmup=a.warmup, init=a.init,
    )  # fmt: skip
    print(json.dumps(rec))


if __name__ == "__main__":
    main()
