"""A query model with a real diffusers decoder (PixArt DiT + DDPM, built from configs): the denoising
metric against a hand-written loss, patching through it, per-step capture tags, the missing extra."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from uniprobe.hooks.adapters import adapter_for
from uniprobe.hooks.capture import capture
from uniprobe.hooks.diffusion import decoder_predict, denoise, prediction_type_of, require_diffusers
from uniprobe.hooks.errors import MissingDependencyError
from uniprobe.hooks.layout import ROLE_ID
from uniprobe.probes.patching import attribution_patch, patch_sweep, query_sites
from uniprobe.probes.patching.denoising import DenoisingLoss
from uniprobe.probes.patching.sites import point_sites

pytest.importorskip("diffusers")

CLEAN, CORRUPTED = [1, 5, 9, 12], [1, 7, 3, 12]


@pytest.fixture(scope="module")
def tiny():
    from uniprobe.experiments.tiny_diffusion import tiny_diffusion_query

    model, info = tiny_diffusion_query()
    adapter = adapter_for(model)
    clean = adapter.prepare(model, [{"input_ids": CLEAN}])
    corrupted = adapter.prepare(model, [{"input_ids": CORRUPTED}])
    return model, adapter, clean, corrupted


def _metric(model, x0, k=3, seed=0):
    predict = decoder_predict(
        model.decoder,
        prediction_type_of(model.scheduler),
        model.scheduler.config.num_train_timesteps,
        **model.decoder_kwargs,
    )
    return DenoisingLoss.from_scheduler(predict, x0, model.scheduler, k=k, seed=seed)


def test_metric_equals_hand_written_ddpm_loss(tiny):
    model, adapter, clean, _ = tiny
    torch.manual_seed(0)
    x0 = torch.randn(1, *model.latent_shape)
    metric = _metric(model, x0)
    with torch.no_grad():
        out = adapter.run(model, clean)
        got = metric(out)
        cond = out[1]
        abar = model.scheduler.alphas_cumprod
        ref = 0.0
        for t, eps in zip(metric.timesteps, metric.noises, strict=True):  # eps [1, C, H, W]
            x_t = abar[t].sqrt() * x0 + (1 - abar[t]).sqrt() * eps
            pred = model.decoder(
                x_t,
                encoder_hidden_states=cond,
                timestep=t.view(1),
                added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            ).sample
            ref += ((pred - eps) ** 2).mean()
    assert metric.prediction_type == "epsilon" and len(metric.timesteps) == 3
    torch.testing.assert_close(got, (ref / 3).view(1), rtol=1e-5, atol=1e-6)


def test_patching_the_clean_connector_output_restores_the_loss(tiny):
    # float64: the untrained decoder's loss moves little with the prompt (~1e-4), so float32 rounding
    # would blur the normalised effect; in float64 exact restoration reads 1 to 1e-6
    _, adapter, clean, corrupted = tiny
    model = copy.deepcopy(tiny[0]).double()
    torch.manual_seed(0)
    metric = _metric(model, torch.randn(1, *model.latent_shape, dtype=torch.float64))
    n = model.n_queries
    sites = point_sites("connector.out", n=n) + point_sites("connector.out", list(range(n)))
    sites += point_sites("queries", n=n)  # the connector's input: the query tokens' final states
    res = patch_sweep(model, clean, corrupted, sites, metric)
    assert abs(res.clean - res.corrupted) > 1e-5  # the prompts condition the decoder differently
    assert float(res.values[0]) == pytest.approx(res.clean, abs=1e-12)
    torch.testing.assert_close(res.normalised[0], torch.tensor(1.0), atol=1e-6, rtol=0)
    assert not torch.allclose(res.normalised[1 : n + 1], torch.ones(n))  # one query alone is not everything
    torch.testing.assert_close(res.normalised[-1], torch.tensor(1.0), atol=1e-6, rtol=0)
    # the query positions' residual stream before the last block: all query positions together also restore
    grid, _ = query_sites(model, clean.layout, kinds=("resid_post",))
    by_layer = patch_sweep(model, clean, corrupted, grid, metric).normalised
    torch.testing.assert_close(by_layer[-1], torch.tensor(1.0), atol=1e-6, rtol=0)


def test_attribution_through_the_decoder_is_the_first_order_estimate(tiny):
    model, adapter, clean, corrupted = tiny
    torch.manual_seed(0)
    metric = _metric(model, torch.randn(1, *model.latent_shape))
    sites = point_sites("connector.out", n=model.n_queries)
    res = attribution_patch(model, clean, corrupted, sites, metric)
    # by hand: metric(corrupted) + (clean − corrupted) · ∂metric/∂connector.out, through the decoder
    with torch.no_grad():
        c_clean = adapter.run(model, clean)[1]
    out = adapter.run(model, corrupted)
    cond = out[1].detach().requires_grad_(True)
    value = metric((out[0], cond))
    (grad,) = torch.autograd.grad(value.sum(), cond)
    expected = float(value.detach()) + float(((c_clean - cond.detach()) * grad).sum())
    assert float(res.values[0]) == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_per_step_capture_tags_step_timestep_branch(tiny):
    model, adapter, clean, _ = tiny
    points = ["connector.out", "decoder.cond", "decoder.blocks.*", "decoder.out"]
    with torch.no_grad(), capture(model, points, adapter=adapter, layout=clean.layout, cfg_batch=1) as cap:
        cond = adapter.run(model, clean)[1]
        denoise(
            model.decoder,
            model.scheduler,
            cond,
            model.latent_shape,
            steps=3,
            guidance_scale=2.0,
            **model.decoder_kwargs,
        )
    assert cap.timesteps == {j: float(t) for j, t in enumerate(model.scheduler.timesteps)}
    assert [s.rows for s in cap.decoder_steps] == [2, 2, 2]  # [cond; uncond] per step
    blocks = cap.rows("decoder.blocks.1")
    assert sorted(set(blocks.step.tolist())) == [0, 1, 2] and set(blocks.branch.tolist()) == {0, 1}
    assert len(blocks) == 3 * 2 * 16 and bool((blocks.role == ROLE_ID["image_gen"]).all())
    assert blocks.pos.tolist()[:16] == list(range(16))  # the decoder's own 16 latent tokens
    proj = model.decoder.caption_projection
    for step in range(3):  # where the connector output enters: the same conditioning every step
        c = cap.rows("decoder.cond", step=step, branch="cond").values
        u = cap.rows("decoder.cond", step=step, branch="uncond").values
        torch.testing.assert_close(c, proj(cond)[0])
        torch.testing.assert_close(u, proj(torch.zeros_like(cond))[0])
    out = cap.rows("decoder.out", step=2)
    assert out.values.shape == (2, *model.latent_shape) and out.branch.tolist() == [0, 1]
    conn = cap.rows("connector.out")
    assert conn.step.tolist() == [0] * model.n_queries and bool((conn.role == ROLE_ID["query"]).all())


def test_missing_diffusers_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers → ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install 'uniprobe\[diffusion\]'"):
        require_diffusers()


def test_branches_run_as_separate_calls_share_one_step(tiny):
    """A pipeline that runs cond and uncond as two calls at one timestep (GLM-Image's) gets one step each."""
    model, adapter, clean, _ = tiny
    with torch.no_grad():
        cond = adapter.run(model, clean)[1]
    x = torch.randn(1, *model.latent_shape)
    with torch.no_grad(), capture(model, "decoder.out", adapter=adapter, layout=clean.layout) as cap:
        for t in (90, 50):
            for c in (cond, torch.zeros_like(cond)):
                model.decoder(x, encoder_hidden_states=c, timestep=torch.tensor([t]), **model.decoder_kwargs)
    assert [(s.step, s.branch) for s in cap.decoder_steps] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert cap.timesteps == {0: 90.0, 1: 50.0}
    rows = cap.rows("decoder.out")
    assert rows.step.tolist() == [0, 0, 1, 1] and rows.branch.tolist() == [0, 1, 0, 1]


def test_flow_scheduler_metric_equals_hand_written_flow_loss(tiny):
    """The same decoder measured as a rectified-flow model (FlowMatchEulerDiscreteScheduler)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    model, adapter, clean, _ = tiny
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    predict = decoder_predict(model.decoder, "flow", 1000, **model.decoder_kwargs)
    torch.manual_seed(2)
    x0 = torch.randn(1, *model.latent_shape)
    metric = DenoisingLoss.from_scheduler(predict, x0, scheduler, k=2, seed=4)
    with torch.no_grad():
        out = adapter.run(model, clean)
        ref = 0.0
        for t, eps in zip(metric.timesteps, metric.noises, strict=True):
            x_t = (1 - t) * x0 + t * eps
            v = model.decoder(
                x_t, encoder_hidden_states=out[1], timestep=(t * 1000).view(1), **model.decoder_kwargs
            )
            ref += ((v.sample - (eps - x0)) ** 2).mean()
        torch.testing.assert_close(metric(out), (ref / 2).view(1), rtol=1e-5, atol=1e-6)
    assert metric.prediction_type == "flow"


def test_the_docs_page_code_runs(capsys):
    """docs/diffusion-decoders.md: every ```python block, in order, in one namespace."""
    import re
    from pathlib import Path

    page = Path(__file__).resolve().parents[1] / "docs" / "diffusion-decoders.md"
    namespace: dict = {"__name__": "guide"}
    for block in re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S):
        exec(compile(block, str(page), "exec"), namespace)  # noqa: S102 - the page's own code
    out = capsys.readouterr().out
    assert "decoder.blocks.1" in out and "{0: 66.0, 1: 33.0, 2: 0.0}" in out
    assert namespace["last"].values.shape == (2, 16) and namespace["latents"].shape == (1, 4, 8, 8)
    assert namespace["res"].normalised[0] == pytest.approx(1.0, abs=1e-2)


def test_a_unet_decoder_with_v_prediction(tiny):
    """The same query model with a diffusers UNet2DConditionModel decoder (v-prediction): the metric
    equals the hand-written v loss, and capture tags the UNet's down blocks per denoising step."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from uniprobe.experiments.tiny_diffusion import TinyDiffusionQueryModel
    from uniprobe.hooks.adapters import query_adapter

    base, _, clean, _ = tiny
    torch.manual_seed(3)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=4,
    ).eval()
    model = TinyDiffusionQueryModel(
        base.lm, unet, DDPMScheduler(100, prediction_type="v_prediction"), (4, 8, 8)
    )
    model.decoder_kwargs = {}
    adapter = query_adapter(
        {
            "blocks": "lm.model.layers",
            "final_norm": "lm.model.norm",
            "lm_head": "lm.lm_head",
            "queries": "queries",
            "connector": "connector",
            "decoder": "decoder",
            "diffusion": True,
            "decoder_blocks": "decoder.down_blocks",
        }
    )
    x0 = torch.randn(1, 4, 8, 8)
    metric = DenoisingLoss.from_scheduler(
        decoder_predict(unet, "v_prediction", 100), x0, model.scheduler, k=2
    )
    with torch.no_grad():
        out = adapter.run(model, clean)
        ref, abar = 0.0, model.scheduler.alphas_cumprod
        for t, eps in zip(metric.timesteps, metric.noises, strict=True):
            a, s = abar[t].sqrt(), (1 - abar[t]).sqrt()
            pred = unet(a * x0 + s * eps, t.view(1), encoder_hidden_states=out[1]).sample
            ref += ((pred - (a * eps - s * x0)) ** 2).mean()
        torch.testing.assert_close(metric(out), (ref / 2).view(1), rtol=1e-5, atol=1e-6)
        with capture(model, "decoder.blocks.*", adapter=adapter, layout=clean.layout) as cap:
            denoise(unet, model.scheduler, out[1], (4, 8, 8), steps=2)
    assert metric.prediction_type == "v_prediction" and len(cap.timesteps) == 2
    rows = cap.rows("decoder.blocks.1")  # a 4-D feature map per row: one position
    assert rows.step.tolist() == [0, 1] and rows.values.shape == (2, 16, 4, 4)


def test_diffusers_is_imported_only_when_used():
    """The extra stays optional: importing uniprobe's adapters, patching and tiny zoo loads no diffusers."""
    import subprocess

    code = (
        "import sys, uniprobe.hooks.adapters, uniprobe.hooks.diffusion, uniprobe.probes.patching, "
        "uniprobe.experiments.tiny; print('diffusers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
