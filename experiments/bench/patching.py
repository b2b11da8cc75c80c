"""Benchmark: a full resid_pre patching sweep (every layer × every position), uniprobe vs TransformerLens.

    .venv/bin/python experiments/bench/patching.py [--model SPEC [--clean TEXT --corrupted TEXT]]
                                                  [--layers 12 --d-model 512 --seq 24]

Two models, one process: (a) a small causal LM standing in for the sandbox AR model (``--model
SPEC``: any ``experiments.models.load_model`` spec; default a sandbox-sized Llama: 4 layers,
d 128), (b) a Llama built from a config (≥ 12 layers, d_model ≥ 512, ≥ 24 tokens, random seeded
weights). On each: the same logit-difference metric (clean top-1 vs corrupted top-1 at the last
position), uniprobe's batched exact sweep (:func:`probes.patching.patch_sweep`) against
TransformerLens's ``patching.get_act_patch_resid_pre`` on a ``TransformerBridge`` of the same
weights (clean cache from ``run_with_cache`` included in its time, as ours includes the clean
run). Prints both times, the ratio, the max abs difference of the grids, and the attribution-
patching time and its correlation with exact. Targets: ≥ 10× faster, difference ≤ 1e-4.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")  # TransformerLens's sweep draws a progress bar per call

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from hooks.adapters import ModelInputs, adapter_for  # noqa: E402
from hooks.backends.tl_backend import bridge_for  # noqa: E402
from probes.patching import (  # noqa: E402
    LogitDiff,
    attribution_patch,
    attribution_vs_exact,
    grid_sites,
    logits_of,
    patch_sweep,
)

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


def bench(
    name: str, model: torch.nn.Module, adapter: Any, clean: ModelInputs, corrupted: ModelInputs
) -> dict[str, Any]:
    """Run both sweeps and attribution on ``model``; print and return the figures.

    The metric is the logit difference of the clean and the corrupted run's top tokens at the
    last position; the sweep covers every layer × every position of the prepared inputs.
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

    patch_sweep(model, clean, corrupted, grid_sites(1, 2, ("resid_pre",)), metric)  # warm-up
    t0 = time.perf_counter()
    ours = patch_sweep(model, clean, corrupted, sites, metric)
    t_ours = time.perf_counter() - t0
    ablations = {}
    for label, kw in (
        ("without the no-op skip", {"skip_noops": False}),
        ("layer resume only (no position reuse, no no-op skip)", {"suffix": False, "skip_noops": False}),
    ):
        t0 = time.perf_counter()
        res = patch_sweep(model, clean, corrupted, sites, metric, **kw)
        ablations[label] = (time.perf_counter() - t0, float((res.values - ours.values).abs().max()))
    t0 = time.perf_counter()
    attr = attribution_patch(model, clean, corrupted, sites, metric)
    t_attr = time.perf_counter() - t0
    agree = attribution_vs_exact(attr, ours)

    from transformer_lens import patching

    bridge = bridge_for(model, adapter).eval()  # after our runs: booting wraps the model's modules
    clean_t, corrupted_t = clean.kwargs["input_ids"], corrupted.kwargs["input_ids"]
    if clean_t.shape[1] != seq:
        raise ValueError(f"{name}: the model appends positions TransformerLens does not see; no comparison")

    def tl_metric(logits: torch.Tensor) -> torch.Tensor:
        return logits[0, -1, target] - logits[0, -1, foil]

    with torch.no_grad():
        bridge(corrupted_t)  # warm-up
        t0 = time.perf_counter()
        _, cache = bridge.run_with_cache(clean_t)
        tl_grid = patching.get_act_patch_resid_pre(bridge, corrupted_t, cache, tl_metric)
        t_tl = time.perf_counter() - t0
    our_grid = ours.as_grid(normalised=False)[0]
    diff = float((our_grid - tl_grid.cpu()).abs().max())
    ratio = t_tl / t_ours
    n_params = sum(p.numel() for p in model.parameters())
    d = cfg.hidden_size
    print(f"\n== {name}: {n_layers} layers, d_model {d}, {seq} tokens, {n_params / 1e6:.1f}M params")
    print(
        f"  sweep: {n_layers} x {seq} = {len(sites)} resid_pre sites, metric logit[{target}] - logit[{foil}]"
    )
    print(f"  baselines: clean {ours.clean:.5f}, corrupted {ours.corrupted:.5f}")
    print(
        f"  uniprobe exact:   {t_ours:8.3f} s  ({ours.info['strategy']}, {ours.info['chunks']} chunks, "
        f"{ours.info['rows']} rows)"
    )
    info = ours.info
    print(
        f"    of which {info['noops']} sites are no-ops (clean = corrupted there), suffix reuse "
        f"{info['suffix']}; work {info['work_fraction']:.3f} of one full forward per site"
    )
    for label, (t, d) in ablations.items():
        print(f"  uniprobe exact, {label}: {t:.3f} s ({t_tl / t:.1f}x vs TL; max diff to default {d:.1e})")
    print(f"  TransformerLens:  {t_tl:8.3f} s  (get_act_patch_resid_pre on TransformerBridge)")
    fast = "met" if ratio >= TARGET_SPEEDUP else "MISSED"
    print(f"  speed-up: {ratio:.1f}x (target >= {TARGET_SPEEDUP:.0f}x: {fast})")
    ok = "met" if diff <= TARGET_DIFF else "MISSED"
    print(f"  max |grid diff|: {diff:.2e} (target <= {TARGET_DIFF:.0e}: {ok})")
    print(f"  attribution:      {t_attr:8.3f} s  correlation with exact {agree['correlation']:.3f}")
    return {"name": name, "ours": t_ours, "tl": t_tl, "ratio": ratio, "diff": diff, "attr": t_attr, **agree}


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
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: stable timings on a shared 2-core machine)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.model and args.model != "none":
        from experiments.models import load_model
        from experiments.patch_commands import example

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
        bench(f"(a) {args.model}", model, adapter, clean, corrupted)
    else:
        model = llama(4, 128, 64)
        adapter = adapter_for(model)
        bench(
            "(a) sandbox-sized Llama (stand-in for the sandbox AR model)",
            model,
            adapter,
            *random_inputs(model, adapter, args.small_seq),
        )
    if not args.skip_large:
        model = llama(args.layers, args.d_model, args.vocab)
        adapter = adapter_for(model)
        bench("(b) Llama from config", model, adapter, *random_inputs(model, adapter, args.seq))
    return 0


if __name__ == "__main__":
    sys.exit(main())
