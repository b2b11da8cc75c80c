"""The built-in demo: what ``make demo`` runs.

Until the sandbox models ship, the demo exercises the capture layer on a tiny Janus
(``JanusForConditionalGeneration`` from a config): an understanding store (image + text →
text, roles ``image_und`` / ``text``) and a generation store captured during the model's own
classifier-free-guided image generation (every step, both branches), each inspected.
"""

from __future__ import annotations

from pathlib import Path

import torch

from hooks.pipeline import capture_dataset
from hooks.tiny import tiny_janus


def janus_examples(n: int = 12, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Understanding examples (4 image placeholders + text) and generation prompts (text + BOI)."""
    g = torch.Generator().manual_seed(seed)
    und, gen = [], []
    for i in range(n):
        words = torch.randint(10, 60, (3,), generator=g).tolist()
        und.append(
            {
                "id": f"und-{i}",
                "input_ids": [1, 3, 3, 3, 3, *words],
                "pixel_values": torch.randn(3, 32, 32, generator=g),
                "labels": {"first_word": words[0] % 3},
            }
        )
        gen.append({"id": f"gen-{i}", "input_ids": [1, *words, 4], "labels": {"first_word": words[0] % 3}})
    return und, gen


def run_demo(out: str | Path = "artifacts/demo") -> int:
    """Capture and inspect two stores from a tiny Janus; returns an exit code."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model, _ = tiny_janus()
    und, gen = janus_examples()
    s1 = capture_dataset(
        model, und, "blocks.*.resid_post,final_norm", out / "store-janus-und", batch_size=4, overwrite=True
    )
    s2 = capture_dataset(
        model,
        gen,
        "blocks.*.resid_post,gen_head.in",
        out / "store-janus-gen",
        roles=["image_gen", "text"],
        mode="generate",
        batch_size=4,
        overwrite=True,
    )
    report = ["# uniprobe demo", "", "## Tiny Janus: understanding store", "", "```", s1.summary(), "```"]
    report += ["", "## Tiny Janus: generation store (every step, both guidance branches)", "", "```"]
    report += [s2.summary(), "```", ""]
    (out / "report.md").write_text("\n".join(report))
    print("\n".join(report))
    print(f"wrote {out / 'report.md'}")
    return 0
