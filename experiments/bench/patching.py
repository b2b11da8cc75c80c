"""Benchmark: a full resid_pre patching sweep (every layer × every position): uniprobe vs nnsight
and TransformerLens, the two tools a researcher would otherwise pick.

    .venv/bin/python experiments/bench/patching.py [--model SPEC [--clean TEXT --corrupted TEXT]]
                                                  [--layers 12 --d-model 512 --seq 24] [--repeats 3]

Two models, one process, one torch thread, float32, the same weights for every tool: (a) a small
causal LM standing in for the sandbox AR model (``--model SPEC``: any
``uniprobe.experiments.models.load_model`` spec; ``none``: a random sandbox-sized Llama, 4 layers, d 128),
(b) a Llama built from a config (≥ 12 layers, d_model ≥ 512, ≥ 24 tokens, random seeded
weights). On each, the same logit-difference metric (clean top-1 vs corrupted top-1 at the last
position) computed three ways:

- uniprobe's batched exact sweep (:func:`uniprobe.probes.patching.patch_sweep`), clean run included;
- nnsight, as its users batch a sweep: one trace of the clean prompt saving every block's input,
  then per layer one ``trace`` whose batch is the corrupted prompt repeated once per position,
  row ``p`` patching position ``p`` (:func:`nnsight_sweep`; the clean trace is in its time);
- TransformerLens's ``patching.get_act_patch_resid_pre`` on a ``TransformerBridge`` of the same
  weights (the clean ``run_with_cache`` in its time).

Prints each time (median of ``--repeats``), the ratios, the max abs difference of the grids, how
far the engine is from its position-aware limit (the work it reports per site × one forward's
FLOPs, at this machine's measured matmul rate) with a profile of where its time goes, and the
attribution-patching time and its correlation with exact. Targets: ≥ 10× faster than each tool,
grid difference ≤ 1e-4.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")  # TransformerLens's sweep draws a progress bar per call

import torch  # noqa: E402
from uniprobe.hooks.adapters import ModelInputs, adapter_for  # noqa: E402
from uniprobe.hooks.adapters.base import get_module  # noqa: E402
from uniprobe.hooks.backends.tl_backend import bridge_for  # noqa: E402
from uniprobe.probes.patching import (  # noqa: E402
    LogitDiff,
    attribution_patch,
    attribution_vs_exact,
    grid_sites,
    logits_of,
    patch_sweep,
)
from uniprobe.probes.patching.engine import repeat_inputs  # noqa: E402

TARGET_SPEEDUP = 10.0
TARGET_DIFF = 1e-4


def llama(layers: int, d_model: int, vocab: int, seed: int = 0) -> torch.nn.Module:
    """A seeded random ``LlamaForCausalLM`` (eager-free defaults, float32, eval)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=d_model,
        intermediate_size=int(d_model * 8 / 3) // 64 * 64,
        num_hidden_layers=layers,
        num_attention_heads=max(4, d_model // 64),
        num_key_value_heads=max(4, d_model // 64),
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(cfg).eval()


def prompts(vocab: int, seq: int, seed: int = 1) -> tuple[list[int], list[int]]:
    """Clean and corrupted ids of length ``seq`` differing at one position (a third of the way in)."""
    g = torch.Generator().manual_seed(seed)
    clean = [1] + torch.randint(3, vocab, (seq - 1,), generator=g).tolist()
    corrupted = list(clean)
    k = seq // 3
    corrupted[k] = 3 + (clean[k] - 3 + 1 + int(torch.randint(0, vocab - 4, (1,), generator=g))) % (vocab - 3)
    return clean, corrupted


def lm_config(model: torch.nn.Module, adapter: Any) -> Any:
    """The config of the causal LM TransformerLens sees (the model itself, or the adapter's view)."""
    return (adapter.tl_view(model) if adapter.tl_view is not None else model).config


def random_inputs(model: torch.nn.Module, adapter: Any, seq: int) -> tuple[ModelInputs, ModelInputs]:
    """Clean/corrupted inputs from random token ids (one differing a third of the way in)."""
    clean_ids, corrupted_ids = prompts(int(lm_config(model, adapter).vocab_size), seq)
    return adapter.prepare(model, [{"input_ids": clean_ids}]), adapter.prepare(
        model, [{"input_ids": corrupted_ids}]
    )


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def flops_of(fn: Any) -> float:
    """FLOPs of the torch ops ``fn()`` runs in this thread (torch's counter: matmuls, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def forward_flops(model: torch.nn.Module, adapter: Any, inputs: ModelInputs) -> float:
    """FLOPs of one plain forward of ``inputs``."""
    return flops_of(lambda: adapter.run(model, inputs))


def matmul_rate(d_model: int, d_ff: int, rows: int = 512, repeats: int = 15) -> float:
    """This machine's float32 matmul rate now, GFLOP/s: the best median of the block's two shapes
    (``[rows, d] @ [d, d_ff]`` and back) over ``repeats`` runs, in the current torch threads."""
    best = 0.0
    for k, n in ((d_model, d_ff), (d_ff, d_model)):
        a, w = torch.randn(rows, k), torch.randn(k, n)
        a @ w  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ w
            times.append(time.perf_counter() - t0)
        best = max(best, 2 * rows * k * n / median(times) / 1e9)
    return best


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_dot_product_flash_attention_for_cpu")


def time_shares(fn: Any) -> dict[str, float]:
    """One profiled call of ``fn``: the shares of its wall time in matmul ops (matmuls and
    attention kernels), in every other torch op, and outside torch ops (Python, hooks, dispatch)."""
    from torch.profiler import ProfilerActivity, profile

    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    wall = time.perf_counter() - t0
    ops = prof.key_averages()
    mm = sum(e.self_cpu_time_total for e in ops if e.key in MATMUL_OPS) / 1e6
    total = sum(e.self_cpu_time_total for e in ops) / 1e6
    return {"matmul": mm / wall, "other ops": (total - mm) / wall, "outside ops": max(0.0, 1 - total / wall)}


def nnsight_sweep(
    nn_model: Any, adapter: Any, clean: ModelInputs, corrupted: ModelInputs, target: int, foil: int
) -> torch.Tensor:
    """The resid_pre sweep as an nnsight user batches it → ``[layers, positions]``.

    One trace of the clean prompt saves every block's input (resid_pre); then per layer one
    trace whose batch is the corrupted prompt repeated once per position, row ``p`` writing the
    clean state into position ``p`` of that block's input, and the logit difference read at the
    last position.
    """
    import nnsight

    blocks = nn_model
    for part in adapter.blocks.split("."):
        blocks = getattr(blocks, part)
    n_layers = len(get_module(nn_model._module, adapter.blocks))
    seq = corrupted.layout.length
    rows = torch.arange(seq)
    batch = repeat_inputs(corrupted, seq).kwargs  # the corrupted prompt, once per position
    with torch.no_grad():
        states: list[torch.Tensor] = []
        with nn_model.trace(**clean.kwargs):
            for layer in range(n_layers):
                states.append(blocks[layer].input)
            nnsight.save(states)
        grid = []
        for layer in range(n_layers):
            with nn_model.trace(**batch):
                blocks[layer].input[rows, rows] = states[layer][0, rows]
                logits = logits_of(nn_model.output)[:, -1]
                diff = nnsight.save(logits[:, target] - logits[:, foil])
            grid.append(diff)
    return torch.stack(grid)


def bench(
    name: str,
    model: torch.nn.Module,
    adapter: Any,
    clean: ModelInputs,
    corrupted: ModelInputs,
    repeats: int = 1,
    tools: tuple[str, ...] = ("nnsight", "transformer_lens"),
    extras: bool = True,
) -> dict[str, Any]:
    """Run the three sweeps (and attribution) on ``model``; print and return the figures.

    The metric is the logit difference of the clean and the corrupted run's top tokens at the
    last position; the sweep covers every layer × every position of the prepared inputs. Each
    tool is timed ``repeats`` times (medians reported); uniprobe and nnsight alternate, then
    TransformerLens (booting its bridge wraps the model's modules, so it comes last).
    ``extras``: also time the engine ablations, profile the engine and run attribution.
    """
    cfg = lm_config(model, adapter)
    seq = clean.layout.length
    with torch.no_grad():
        lc = logits_of(adapter.run(model, clean))[0, -1]
        lr = logits_of(adapter.run(model, corrupted))[0, -1]
    target = int(lc.argmax())
    foil = int(lr.argmax()) if int(lr.argmax()) != target else int(lc.topk(2).indices[1])
    metric = LogitDiff(target, foil)
    n_layers = adapter.n_layers(model)
    sites = grid_sites(n_layers, seq, ("resid_pre",))
    flops = forward_flops(model, adapter, corrupted)
    d = cfg.hidden_size
    d_ff = getattr(cfg, "intermediate_size", None) or 4 * d

    def ours_run() -> Any:
        return patch_sweep(model, clean, corrupted, sites, metric)

    times: dict[str, list[float]] = defaultdict(list)
    grids: dict[str, torch.Tensor] = {}
    patch_sweep(model, clean, corrupted, grid_sites(1, 2, ("resid_pre",)), metric)  # warm-up
    nn_model = None
    if "nnsight" in tools:
        from nnsight import NNsight

        nn_model = NNsight(model)  # wrapping is setup, like booting TransformerLens's bridge
        nnsight_sweep(nn_model, adapter, clean, corrupted, target, foil)  # warm-up
    for _ in range(repeats):
        t0 = time.perf_counter()
        ours = ours_run()
        times["uniprobe"].append(time.perf_counter() - t0)
        if nn_model is not None:
            t0 = time.perf_counter()
            grids["nnsight"] = nnsight_sweep(nn_model, adapter, clean, corrupted, target, foil)
            times["nnsight"].append(time.perf_counter() - t0)
    our_grid = ours.as_grid(normalised=False)[0]
    t_ours = median(times["uniprobe"])
    rate = matmul_rate(d, d_ff)
    info = ours.info
    limit = info["work_fraction"] * len(sites) * flops / (rate * 1e9)
    executed = {"uniprobe": flops_of(ours_run)}  # every op it runs: clean and target runs included
    if nn_model is not None:  # the clean trace + one forward per layer of `seq` rows
        executed["nnsight"] = flops + n_layers * forward_flops(model, adapter, repeat_inputs(corrupted, seq))
    executed["transformer_lens"] = (len(sites) + 1) * flops  # run_with_cache + one forward per site

    ablations: dict[str, tuple[float, float]] = {}
    shares: dict[str, float] = {}
    attr_t, agree = None, {}
    if extras:
        for label, kw in (
            ("without the no-op skip", {"skip_noops": False}),
            ("layer resume only (no position reuse, no no-op skip)", {"suffix": False, "skip_noops": False}),
        ):
            t0 = time.perf_counter()
            res = patch_sweep(model, clean, corrupted, sites, metric, **kw)
            ablations[label] = (time.perf_counter() - t0, float((res.values - ours.values).abs().max()))
        shares = time_shares(ours_run)
        t0 = time.perf_counter()
        attr = attribution_patch(model, clean, corrupted, sites, metric)
        attr_t = time.perf_counter() - t0
        agree = attribution_vs_exact(attr, ours)

    if "transformer_lens" in tools:
        from transformer_lens import patching

        bridge = bridge_for(model, adapter).eval()  # after our runs: booting wraps the model's modules
        clean_t, corrupted_t = clean.kwargs["input_ids"], corrupted.kwargs["input_ids"]
        if clean_t.shape[1] != seq:
            raise ValueError(
                f"{name}: the model appends positions TransformerLens does not see; no comparison"
            )

        def tl_metric(logits: torch.Tensor) -> torch.Tensor:
            return logits[0, -1, target] - logits[0, -1, foil]

        with torch.no_grad():
            _, short = bridge.run_with_cache(clean_t[:, :2])  # warm-up: a sweep over 2 tokens
            patching.get_act_patch_resid_pre(bridge, corrupted_t[:, :2], short, tl_metric)
            for _ in range(repeats):
                t0 = time.perf_counter()
                _, cache = bridge.run_with_cache(clean_t)
                grids["transformer_lens"] = patching.get_act_patch_resid_pre(
                    bridge, corrupted_t, cache, tl_metric
                )
                times["transformer_lens"].append(time.perf_counter() - t0)

    n_params = sum(p.numel() for p in model.parameters())
    print(f"\n== {name}: {n_layers} layers, d_model {d}, {seq} tokens, {n_params / 1e6:.1f}M params")
    print(
        f"  sweep: {n_layers} x {seq} = {len(sites)} resid_pre sites, "
        f"metric logit[{target}] - logit[{foil}]; median of {repeats} run(s) per tool"
    )
    print(f"  baselines: clean {ours.clean:.5f}, corrupted {ours.corrupted:.5f}")
    spread = "" if repeats == 1 else f"  [runs {', '.join(f'{t:.3f}' for t in times['uniprobe'])}]"
    print(
        f"  uniprobe exact:   {t_ours:8.3f} s  ({info['strategy']}, suffix {info['suffix']}, "
        f"{info['chunks']} chunks, {info['rows']} rows){spread}"
    )
    if info["suffix_reason"] or info["reason"]:
        print(f"    fast path off: {info['reason'] or info['suffix_reason']}")
    print(
        f"    of which {info['noops']} sites are no-ops (clean = corrupted there); "
        f"work {info['work_fraction']:.3f} of one full forward per site"
    )
    print(
        f"    engine {t_ours:.3f} s; limit {limit:.3f} s (work fraction {info['work_fraction']:.3f} x "
        f"{len(sites)} sites x one forward {flops / (rate * 1e9) * 1e3:.2f} ms = {flops / 1e9:.3f} GFLOP "
        f"at the measured {rate:.0f} GFLOP/s matmul rate) -> {t_ours / limit:.1f}x from the limit"
    )
    our_rate = executed["uniprobe"] / t_ours / 1e9
    print(
        f"    it executes {executed['uniprobe'] / 1e9:.1f} GFLOP (clean and target runs included) = "
        f"{executed['uniprobe'] / (rate * 1e9):.3f} s at that rate; it runs them at {our_rate:.0f} GFLOP/s"
    )
    if shares:
        print(
            "    engine time (torch.profiler, one run): "
            + ", ".join(f"{v:.0%} {k}" for k, v in shares.items())
        )
        print(
            "    bound: "
            + (
                "matmul throughput (compute-bound: against a tool, the speed-up is its FLOPs over "
                "ours times our matmul efficiency over its)"
                if shares["matmul"] >= 0.5
                else "per-forward overhead (Python, hooks, dispatch): too small a model for its "
                "matmuls to dominate"
            )
        )
    for label, (t, dd) in ablations.items():
        print(f"  uniprobe exact, {label}: {t:.3f} s (max diff to default {dd:.1e})")
    results: dict[str, Any] = {"name": name, "ours": t_ours, "limit": limit, "rate": rate, "info": info}
    results["flops"] = executed["uniprobe"]
    labels = {
        "nnsight": "one trace per layer, corrupted prompt x positions as the batch",
        "transformer_lens": "get_act_patch_resid_pre on TransformerBridge",
    }
    ok_all = True
    for tool, grid in grids.items():
        t = median(times[tool])
        ratio = t / t_ours
        diff = float((our_grid - grid.detach().float().cpu()).abs().max())
        fast = "met" if ratio >= TARGET_SPEEDUP else "MISSED"
        ok = "met" if diff <= TARGET_DIFF else "MISSED"
        ok_all &= fast == "met" and ok == "met"
        spread = "" if repeats == 1 else f"  [runs {', '.join(f'{x:.3f}' for x in times[tool])}]"
        print(f"  {tool + ':':17} {t:8.3f} s  ({labels[tool]}){spread}")
        print(
            f"    speed-up {ratio:.1f}x (target >= {TARGET_SPEEDUP:.0f}x: {fast}); "
            f"max |grid diff| {diff:.2e} (target <= {TARGET_DIFF:.0e}: {ok})"
        )
        f_ratio = executed[tool] / executed["uniprobe"]
        print(
            f"    it executes {executed[tool] / 1e9:.1f} GFLOP ({f_ratio:.1f}x uniprobe's) at "
            f"{executed[tool] / t / 1e9:.0f} GFLOP/s: speed-up = {f_ratio:.1f}x the FLOPs x "
            f"{ratio / f_ratio:.2f} our rate over its"
        )
        results[tool] = {
            "seconds": t, "ratio": ratio, "diff": diff, "runs": times[tool], "flops": executed[tool]
        }  # fmt: skip
    if attr_t is not None:
        print(f"  attribution:      {attr_t:8.3f} s  correlation with exact {agree['correlation']:.3f}")
        results.update({"attr": attr_t, **agree})
    results["targets_met"] = ok_all
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        default="sandbox-ar",
        help="model spec for (a) (default: the shipped sandbox AR model; 'none': a random small Llama)",
    )
    parser.add_argument("--clean", default="what is 2 + 1 ?", help="clean prompt text for --model")
    parser.add_argument(
        "--corrupted", default="what is 3 + 1 ?", help="corrupted prompt text for --model (same token count)"
    )
    parser.add_argument("--small-seq", type=int, default=16)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--seq", type=int, default=24)
    parser.add_argument("--skip-large", action="store_true")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per tool (medians are printed)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: stable timings on a shared 2-core machine)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.model and args.model != "none":
        from uniprobe.experiments.models import load_model
        from uniprobe.experiments.patching import example

        loaded = load_model(args.model)
        model, adapter = loaded.model, loaded.adapter
        if loaded.info.get("text_prompts") and not (args.clean and args.corrupted):
            parser.error(
                f"{args.model} builds its batches from text: pass --clean and --corrupted "
                "(e.g. --clean 'what is 2 + 1 ?' --corrupted 'what is 3 + 1 ?')"
            )
        if args.clean and args.corrupted:
            clean, corrupted = (
                adapter.prepare(model, [example(loaded, t)]) for t in (args.clean, args.corrupted)
            )
        else:
            clean, corrupted = random_inputs(model, adapter, args.small_seq)
        bench(f"(a) {args.model}", model, adapter, clean, corrupted, repeats=args.repeats)
    else:
        model = llama(4, 128, 64)
        adapter = adapter_for(model)
        bench(
            "(a) sandbox-sized Llama (stand-in for the sandbox AR model)",
            model,
            adapter,
            *random_inputs(model, adapter, args.small_seq),
            repeats=args.repeats,
        )
    if not args.skip_large:
        model = llama(args.layers, args.d_model, args.vocab)
        adapter = adapter_for(model)
        bench(
            "(b) Llama from config",
            model,
            adapter,
            *random_inputs(model, adapter, args.seq),
            repeats=args.repeats,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
