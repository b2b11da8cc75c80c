"""GLM-Image (transformers GlmImageForConditionalGeneration, tiny config built offline): the adapter's
understanding (source image → codebook ids at the placeholders) and autoregressive image-token
generation, with roles and steps, against the model's own forward and generate."""

from __future__ import annotations

import pytest
import torch
from uniprobe.experiments.tiny import tiny_glm_image
from uniprobe.hooks.adapters import adapter_for
from uniprobe.hooks.adapters.glm_image import model_kwargs
from uniprobe.hooks.capture import capture
from uniprobe.hooks.errors import UsageError
from uniprobe.hooks.layout import ROLE_ID

I2I = [32, 90, 90, 90, 90, 33, 40, 41, 32]  # <start> 4 placeholders <end> text text <start>
T2I = [40, 42, 32]


@pytest.fixture(scope="module")
def glm():
    model, info = tiny_glm_image()
    torch.manual_seed(5)
    source = {
        "input_ids": I2I,
        "pixel_values": torch.randn(4, info["patch_dim"]),
        "image_grid_thw": [[1, 2, 2]],
    }
    return model, info, adapter_for(model), source


def test_adapter_and_points(glm):
    model, _, adapter, _ = glm
    assert adapter.name == "glm_image"
    pts = adapter.points(model)
    assert pts[0] == "embed" and "blocks.1.resid_post" in pts and pts[-1] == "lm_head.in"
    assert (
        model.get_submodule(adapter.site(model, "blocks.1.mlp_out").module)
        is model.model.language_model.layers[1].mlp
    )


def test_understanding_capture_equals_the_models_hidden_states(glm):
    model, _, adapter, source = glm
    inputs = adapter.prepare(model, [source, {"input_ids": T2I}])
    roles = inputs.layout.roles
    assert (
        roles[0, 1:5].tolist() == [ROLE_ID["image_und"]] * 4 and roles[1, 3:].tolist() == [ROLE_ID["pad"]] * 6
    )
    with torch.no_grad(), capture(model, "blocks.*.resid_post", adapter=adapter, layout=inputs.layout) as cap:
        out = adapter.run(model, inputs)
    with torch.no_grad():
        ref = model(**model_kwargs(inputs.kwargs), output_hidden_states=True)
    torch.testing.assert_close(out.logits, ref.logits)
    torch.testing.assert_close(cap["blocks.0.resid_post"], ref.hidden_states[1])
    und = cap.rows("blocks.0.resid_post").select(cap.rows("blocks.0.resid_post").role == ROLE_ID["image_und"])
    assert und.example.tolist() == [0] * 4 and und.pos.tolist() == [1, 2, 3, 4]
    # the placeholders were read as the VQ codebook ids of the source image (not the placeholder id)
    with torch.no_grad():
        feats = model.get_image_features(source["pixel_values"], torch.tensor([[1, 2, 2]])).pooler_output
        codes = model.model.get_image_tokens(feats)
        embeds = model.model.language_model.embed_tokens(codes.view(1, -1))
    with (
        torch.no_grad(),
        capture(model, "embed", adapter=adapter, layout=inputs.layout, roles=["image_und"]) as cap,
    ):
        adapter.run(model, inputs)
    torch.testing.assert_close(cap.rows("embed").values, embeds[0])


def test_generation_tokens_steps_and_roles(glm):
    model, info, adapter, source = glm
    inputs = adapter.prepare(model, [source, {"input_ids": T2I}], mode="generation")
    points = "blocks.*.resid_post"
    with (
        torch.no_grad(),
        capture(model, points, adapter=adapter, layout=inputs.layout, expect="generation") as cap,
    ):
        tokens = adapter.generate(model, inputs)
    assert tokens.shape == (2, 4) and int(tokens.max()) < len(info["image_token_ids"])
    assert [c.step for c in cap.calls] == [0, 1, 2, 3] and [c.length for c in cap.calls] == [9, 1, 1, 1]
    gen = cap.rows("blocks.1.resid_post", step=2)
    assert gen.role.tolist() == [ROLE_ID["image_gen"]] * 2 and gen.pos.tolist() == [10, 10]
    # the same as the model's own generate, and each row as it would run alone (left padding is inert)
    with torch.no_grad():
        ref = model.generate(
            **model_kwargs(inputs.kwargs),
            max_new_tokens=4,
            min_new_tokens=4,
            do_sample=False,
            suppress_tokens=list(range(32, 40)),
            pad_token_id=95,
        )
        alone = adapter.generate(model, adapter.prepare(model, [{"input_ids": T2I}], mode="generation"))
    assert torch.equal(tokens, ref[:, -4:])
    assert torch.equal(tokens[1:], alone)


def test_bad_examples_are_named(glm):
    model, _, adapter, source = glm
    with pytest.raises(UsageError, match="4 image placeholders.*1 patches"):
        adapter.prepare(model, [{**source, "image_grid_thw": [[1, 1, 1]]}])
    with pytest.raises(UsageError, match="without pixel_values"):
        adapter.prepare(model, [{"input_ids": I2I, "image_grid_thw": [[1, 2, 2]]}])
    inputs = adapter.prepare(
        model, [{"input_ids": T2I, "target_grid": [2, 2]}, {"input_ids": T2I, "target_grid": [1, 2]}]
    )
    with pytest.raises(UsageError, match="one target grid"):
        adapter.generate(model, inputs)


def test_glm_image_dit_flow_loss_from_the_ar_tokens(glm):
    """AR tokens of the tiny GLM-Image → its diffusers DiT (built from a config): the flow-matching
    denoising loss equals the hand-written one and depends on the tokens."""
    pytest.importorskip("diffusers")
    from diffusers import GlmImagePipeline
    from uniprobe.experiments.tiny_diffusion import glm_prior_token_ids, tiny_glm_image_dit
    from uniprobe.hooks.diffusion import decoder_call, prediction_type_of
    from uniprobe.probes.patching.denoising import DenoisingLoss

    model, _, adapter, _ = glm
    with torch.no_grad():
        tokens = adapter.generate(model, adapter.prepare(model, [{"input_ids": T2I}], mode="generation"))
    prior = glm_prior_token_ids(tokens, 2, 2)
    assert torch.equal(prior, GlmImagePipeline._upsample_token_ids(tokens, 2, 2))  # diffusers' own helper
    dit, scheduler, info = tiny_glm_image_dit()
    assert prediction_type_of(scheduler) == "flow"
    torch.manual_seed(0)
    x0, glyphs = torch.randn(1, *info["latent_shape"]), torch.randn(1, 3, info["glyph_dim"])
    extra = {"target_size": torch.tensor([[64.0, 64.0]]), "crop_coords": torch.zeros(1, 2)}

    def predict_with(prior_ids):
        def predict(x_t, t, cond):  # GLM-Image's pipeline feeds the DiT t·1000 − 1
            drop = torch.zeros_like(prior_ids, dtype=torch.bool)
            return decoder_call(
                dit, x_t, t * 1000 - 1, cond, prior_token_id=prior_ids, prior_token_drop=drop, **extra
            )

        return predict

    metric = DenoisingLoss.from_scheduler(
        predict_with(prior), x0, scheduler, k=3, seed=1, cond_fn=lambda out: out
    )
    with torch.no_grad():
        got = metric(glyphs)
        ref = 0.0
        for t, eps in zip(metric.timesteps, metric.noises, strict=True):
            x_t = (1 - t) * x0 + t * eps
            v = dit(
                hidden_states=x_t,
                encoder_hidden_states=glyphs,
                prior_token_id=prior,
                prior_token_drop=torch.zeros_like(prior, dtype=torch.bool),
                timestep=(t * 1000 - 1).view(1),
                **extra,
            ).sample
            ref += ((v - (eps - x0)) ** 2).mean()
        other = DenoisingLoss.from_scheduler(
            predict_with((prior + 1) % 32), x0, scheduler, k=3, seed=1, cond_fn=lambda out: out
        )(glyphs)
    torch.testing.assert_close(got, (ref / 3).view(1), rtol=1e-5, atol=1e-6)
    assert float(other) != pytest.approx(float(got))


def test_teacher_forced_logits_are_generations_logits(glm):
    """The prompt + target tokens + image_end in one forward: the codebook logits of every step
    equal those the model's own generate computed (same 2-D positions), for a batch mixing an
    image-to-image row and a left-padded text-to-image row."""
    model, info, adapter, source = glm
    prompt = adapter.prepare(model, [source, {"input_ids": T2I}], mode="generation")
    with torch.no_grad():
        gen = model.generate(
            **model_kwargs(prompt.kwargs), max_new_tokens=4, min_new_tokens=4, do_sample=False,
            suppress_tokens=list(range(32, 40)), pad_token_id=95,
            output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
        tokens = gen.sequences[:, -4:]
        forced = adapter.teacher_forced(prompt, tokens)
        logits = adapter.image_forward(model, forced)
    assert forced.layout.length == 9 + 4 + 1 and forced.layout.names(1)[-5:] == ["image_gen"] * 5
    assert logits.shape == (2, 4, 32)
    torch.testing.assert_close(logits, torch.stack(gen.logits, dim=1)[..., :32], atol=1e-5, rtol=1e-5)
    assert torch.equal(logits.argmax(-1), tokens)


def test_patching_with_a_source_image_equals_one_forward_per_site(glm):
    """The batched engine stacks GLM-Image's batch-first image inputs row by row: an understanding
    sweep and a teacher-forced image-token sweep equal the one-forward-per-site reference."""
    from uniprobe.probes.patching import (
        LogitDiff,
        SequenceLogProb,
        collect_states,
        grid_sites,
        patch_sweep,
        run_sites_reference,
    )

    model, _, adapter, source = glm
    corrupted_ex = {**source, "input_ids": [32, 90, 90, 90, 90, 33, 40, 44, 32]}
    clean, corrupted = adapter.prepare(model, [source]), adapter.prepare(model, [corrupted_ex])
    sites = grid_sites(adapter.n_layers(model), clean.layout.length, kinds=("mlp_out",))
    metric = LogitDiff(5, 6)
    res = patch_sweep(model, clean, corrupted, sites, metric)
    _, states = collect_states(model, adapter, clean, [s.point for s in sites.sites])
    ref = run_sites_reference(model, adapter, corrupted, sites.sites, states, metric)
    assert float((res.values - ref).abs().max()) <= 1e-5
    # teacher-forced: does the clean prompt's state make the corrupted run write the clean drawing?
    g_clean = adapter.prepare(model, [source], mode="generation")
    g_corrupt = adapter.prepare(model, [corrupted_ex], mode="generation")
    with torch.no_grad():
        target = adapter.generate(model, g_clean)[0]
    tf_clean, tf_corrupt = adapter.teacher_forced(g_clean, target), adapter.teacher_forced(g_corrupt, target)
    seq = SequenceLogProb(target, logits_fn=lambda out: out)
    prompt_pos = list(range(g_clean.layout.length))  # the prompt's positions, where the runs differ
    sites = grid_sites(
        adapter.n_layers(model), tf_clean.layout.length, kinds=("resid_pre",), positions=prompt_pos
    )
    res = patch_sweep(model, tf_clean, tf_corrupt, sites, seq, forward=adapter.image_forward)
    _, states = collect_states(
        model, adapter, tf_clean, [s.point for s in sites.sites], forward=adapter.image_forward
    )
    ref = run_sites_reference(
        model, adapter, tf_corrupt, sites.sites, states, seq, forward=adapter.image_forward
    )
    assert float((res.values - ref).abs().max()) <= 1e-4
    assert res.clean != pytest.approx(res.corrupted)
