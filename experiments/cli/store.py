"""``uniprobe points | capture | inspect | demo``: a model's hook points, capturing a store, reading it.

uniprobe points  --model SPEC
uniprobe capture --model SPEC --prompts FILE.jsonl --points GLOB [--roles ...] --out DIR
                 [--mode generate [--num-inference-steps N --guidance-scale S --seed K --no-latents]]
uniprobe inspect DIR
uniprobe demo
"""

from __future__ import annotations

import argparse
from typing import Any

from uniprobe.experiments.cli._args import positive_int
from uniprobe.experiments.cli._choices import DTYPE_NAMES, ROLES
from uniprobe.hooks.errors import UsageError


def cmd_points(args: argparse.Namespace) -> int:
    from uniprobe.experiments.models import load_model

    loaded = load_model(args.model, args.adapter)
    a = loaded.adapter
    print(
        f"{args.model}: {type(loaded.model).__name__}, adapter {a.name!r}, {a.n_layers(loaded.model)} blocks"
    )
    for p in a.points(loaded.model):
        site = a.site(loaded.model, p)
        print(f"  {p:<28} {site.io} of {site.module}")
    from uniprobe.hooks.attention import attention_module
    from uniprobe.hooks.errors import UniprobeError

    n = a.n_layers(loaded.model)
    try:  # only where the blocks hold transformers-style attention (the interception needs it)
        attention_module(loaded.model, a, 0)
    except (UniprobeError, AttributeError):
        return 0
    print(
        f"  blocks.{{0..{n - 1}}}.attn.{{q,k,v,scores,pattern,z,head_out}}  attention internals (intercepted "
        "attention function; z / head_out at the o_proj input)"
    )
    return 0


def cmd_capture(args: argparse.Namespace) -> int:
    from uniprobe.experiments.models import load_model
    from uniprobe.experiments.prompts_file import read_prompts
    from uniprobe.hooks.dtypes import dtype_of
    from uniprobe.hooks.pipeline import capture_dataset

    loaded = load_model(args.model, args.adapter, device_map=args.device_map)
    examples = read_prompts(args.prompts, loaded)  # every line checked before the store is created
    settings = {"num_inference_steps": args.num_inference_steps, "guidance_scale": args.guidance_scale}
    settings["seed"] = args.seed
    generate_kwargs = {k: v for k, v in settings.items() if v is not None}  # only what was given
    if generate_kwargs and args.mode != "generate":
        flags = ", ".join("--" + k.replace("_", "-") for k in generate_kwargs)
        raise UsageError(f"{flags} set how images are generated: add --mode generate")
    store = capture_dataset(
        loaded.model, examples, args.points, args.out, adapter=loaded.adapter, roles=args.roles,
        mode=args.mode, batch_size=args.batch_size, shard_size=args.shard_size, backend=args.backend,
        dtype=dtype_of(args.dtype), overwrite=args.overwrite, resume=args.resume,
        model_info={"spec": args.model}, generate_kwargs=generate_kwargs or None,
        save_latents=not args.no_latents,
    )  # fmt: skip
    print(store.summary())
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from uniprobe.hooks.store import ActivationStore

    store = ActivationStore.open(args.store, verify="full" if args.verify else "lazy")
    print(store.summary())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from uniprobe.experiments.demo import run_demo

    return run_demo(args.out, models=args.models)


def add_parsers(sub: Any) -> None:
    """Register ``points``, ``capture``, ``inspect`` and ``demo``."""
    p = sub.add_parser("points", help="list a model's hook points")
    p.add_argument("--model", required=True, help="built-in name or local model folder")
    p.add_argument("--adapter", help="adapter spec file (JSON/YAML) for a query-based checkpoint")
    p.set_defaults(func=cmd_points)

    p = sub.add_parser("capture", help="capture activations over a prompts file into a store")
    p.add_argument("--model", required=True)
    p.add_argument("--adapter")
    p.add_argument("--prompts", required=True, help="JSON lines: {'text' or 'input_ids', 'labels', ...}")
    p.add_argument("--points", default="blocks.*.resid_post", help="names, globs or TransformerLens aliases")
    p.add_argument("--roles", nargs="+", choices=ROLES, help="keep only positions with these roles")
    p.add_argument(
        "--mode",
        choices=("understanding", "generation", "generate"),
        default="understanding",
        help="generation: teacher-forced image tokens; generate: run image generation, capture every step",
    )
    p.add_argument("--backend", choices=("torch", "nnsight", "transformer_lens"), default="torch")
    p.add_argument("--dtype", choices=DTYPE_NAMES)
    gen = p.add_argument_group("generation (--mode generate, a model with a diffusion decoder)")
    gen.add_argument("--num-inference-steps", type=positive_int, help="denoising steps (adapter default: 4)")
    gen.add_argument("--guidance-scale", type=float, help="classifier-free guidance scale (default 1: none)")
    gen.add_argument("--seed", type=int, help="seed of the initial noise (default 0)")
    gen.add_argument(
        "--no-latents", action="store_true", help="do not store the generated latents (only the activations)"
    )
    p.add_argument(
        "--device-map",
        help="model folder only: transformers device_map ('auto', 'cpu', 'cuda:0', ...); needs accelerate",
    )
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument(
        "--shard-size", type=positive_int, default=None,
        help="examples per shard file (default: batch size × k, up to 256 examples or ~64 MiB per shard)",
    )  # fmt: skip
    p.add_argument("--out", required=True)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue an interrupted capture")
    g.add_argument("--overwrite", action="store_true", help="replace an existing store")
    p.set_defaults(func=cmd_capture)

    p = sub.add_parser("inspect", help="summarise a store")
    p.add_argument("store")
    p.add_argument("--verify", action="store_true", help="check every shard's sha256 now")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("demo", help="run the built-in demo (writes artifacts/demo/report.md)")
    p.add_argument("--out", default="artifacts/demo")
    p.add_argument(
        "--models", nargs="+", metavar="NAME",
        help="run only these models' columns (default: all three, sandbox-ar sandbox-query sandbox-mot)",
    )  # fmt: skip
    p.set_defaults(func=cmd_demo)
