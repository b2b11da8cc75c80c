"""The demo's understanding → generation patching map pools item pairs as a ratio of means."""

from __future__ import annotations

import numpy as np
from uniprobe.experiments import demo_sections as sections
from uniprobe.experiments.sandbox.checkpoint import load_sandbox
from uniprobe.experiments.tasks import Suite


def test_patch_map_is_the_pairs_mean_normalised_by_their_mean_clean_and_corrupted_runs() -> None:
    from uniprobe.hooks.adapters import adapter_for
    from uniprobe.probes.patching import SequenceLogProb, patch_across

    model = load_sandbox("sandbox-ar")
    arith = [it for it in Suite(0).items if it.category == "arithmetic" and it.level == 2]
    pairs = sections._patch_pairs(arith, 2)
    res = sections.patch_map(model, "ar", pairs, sections._align)
    # the reference: each pair patched alone, raw metric values, then one normalisation of the means
    adapter, raws, cleans, corrupteds = adapter_for(model), [], [], []
    for src, dst in pairs:
        source = adapter.prepare(model, [{"prompt": src.und_prompt}])
        drawing = {"target": list(src.target)}
        target = adapter.prepare(model, [{"prompt": dst.draw_prompt, **drawing}], "generation")
        direct = src.cot_draw.format(*[src.answer] * len(src.cot_questions))
        clean = adapter.prepare(model, [{"prompt": direct, **drawing}], "generation")
        align, _ = sections._align(model, source, target, src)
        n = len(src.target)
        metric = SequenceLogProb(
            src.target, logits_fn=lambda o, n=n: o.image_logits[:, -n - 1 : -1], mean=True
        )
        one = patch_across(
            model, source, target, align.sites(4, kinds=("resid_pre",)), metric, clean_target=clean
        )
        raws.append(one.as_grid(normalised=False)[0].numpy())
        cleans.append(one.clean)
        corrupteds.append(one.corrupted)
    want = (np.mean(raws, axis=0) - np.mean(corrupteds)) / (np.mean(cleans) - np.mean(corrupteds))
    np.testing.assert_allclose(np.array(res["grid"]), want, rtol=1e-5, atol=1e-6)
    assert res["clean"] == np.mean(cleans) and len(res["pairs"]) == 2
