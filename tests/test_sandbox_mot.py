"""sandbox-mot (BAGEL-style mixture of transformers, rectified flow) and the declarative bagel adapter:
packed == batched, roles from packed indexes, text-condition masking == dropping, Euler/CFG sampling ==
a hand-written loop, captures tagged by denoising step / timestep / CFG branch, expert points."""

from __future__ import annotations

import itertools

import pytest
import torch
from uniprobe.experiments.sandbox import build_model, load_sandbox, save_sandbox
from uniprobe.experiments.sandbox.adapter import SANDBOX_MOT, prepare
from uniprobe.experiments.tasks import Suite
from uniprobe.hooks.adapters import adapter_for
from uniprobe.hooks.adapters.bagel import BAGEL_SPEC, bagel_adapter, packed_roles
from uniprobe.hooks.capture import capture
from uniprobe.hooks.layout import ROLE_ID

TINY = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # grouped-query attention, as Qwen2-7B
}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model("mot", backbone=TINY).eval()
    for p in m.parameters():  # twins that differ from their understanding weights
        p.data.add_(0.05 * torch.randn_like(p))
    return m


@pytest.fixture(scope="module")
def mixed_batch(model):
    """Understanding and drawing examples (with CoT-style prefixes) collated left-padded."""
    stream = Suite(0).training_examples(0, gen_fraction=0.5, prefix_p=0.5)
    exs = list(itertools.islice(stream, 10))
    batch = model.training_batch(exs)
    assert model.gen_mask(batch.image_mask).any(-1).sum() >= 2
    return batch


def _draw_inputs(model, batch, seed=0):
    rows = model.gen_mask(batch.image_mask).any(-1)
    g = torch.Generator().manual_seed(seed)
    lat = torch.randn(int(rows.sum()), model.n_cells, model.latent_dim, generator=g)
    t = torch.rand(int(rows.sum()), generator=g)
    full_lat = torch.zeros(len(rows), model.n_cells, model.latent_dim)
    full_t = torch.ones(len(rows))
    full_lat[rows], full_t[rows] = lat, t
    return rows, lat, t, full_lat, full_t


def test_module_names_are_bagels(model) -> None:
    names = dict(model.named_modules())
    layer = "language_model.model.layers.0"
    for suffix in ("", "_moe_gen"):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert f"{layer}.self_attn.{proj}{suffix}" in names
        for mod in ("mlp", "input_layernorm", "post_attention_layernorm"):
            assert f"{layer}.{mod}{suffix}" in names
        assert f"language_model.model.norm{suffix}" in names
    for mod in ("vae2llm", "llm2vae", "time_embedder", "latent_pos_embed", "vit_model"):
        assert mod in names


def test_packed_equals_batched(model, mixed_batch) -> None:
    rows, lat, t, full_lat, full_t = _draw_inputs(model, mixed_batch)
    with torch.no_grad():
        out = model(**mixed_batch.model_inputs(), latents=full_lat, timesteps=full_t)
        pb = model.pack(mixed_batch, lat, t)
        logits, v = model.forward_packed(pb)
    assert len(pb.sample_lens) == mixed_batch.input_ids.shape[0]  # every example in one packed sequence
    keep = mixed_batch.attention_mask.bool()
    torch.testing.assert_close(out.text_logits[keep], logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.velocity[rows].reshape(-1, model.latent_dim), v, atol=1e-5, rtol=1e-5)


def test_packed_indexes_give_the_batch_roles(model, mixed_batch) -> None:
    pb = model.pack(mixed_batch)
    layout = packed_roles(
        pb.sample_lens, pb.packed_text_indexes, pb.packed_vit_token_indexes, pb.packed_vae_token_indexes
    )
    expect = torch.tensor([[ROLE_ID[r] for r in row] for row in mixed_batch.roles])
    assert torch.equal(layout.roles, expect)
    with pytest.raises(ValueError, match="in no index tensor"):
        packed_roles(pb.sample_lens, pb.packed_text_indexes)


def test_masking_the_text_condition_equals_dropping_it(model, mixed_batch) -> None:
    """The uncond_text pass masks the prompt (batched); training drops those tokens (packed)."""
    rows, lat, t, full_lat, full_t = _draw_inputs(model, mixed_batch, seed=1)
    drop = model.text_condition(mixed_batch, rows)
    kw = {**mixed_batch.model_inputs(), "attention_mask": mixed_batch.attention_mask * ~drop}
    with torch.no_grad():
        out = model(**kw, latents=full_lat, timesteps=full_t)
        _, v = model.forward_packed(model.pack(mixed_batch, lat, t, drop_text=rows.tolist()))
    torch.testing.assert_close(out.velocity[rows].reshape(-1, model.latent_dim), v, atol=1e-5, rtol=1e-5)


def test_sampling_equals_a_hand_written_euler_loop(model) -> None:
    batch = model.prompt_layout(["draw 3 red apple", "draw 1 blue cup"], mode="generate")
    saved = model.cfg_text_scale, model.n_steps, model.shift
    model.cfg_text_scale, model.n_steps, model.shift = 2.5, 3, 2.0
    try:
        noise = torch.randn(2, model.n_cells, model.latent_dim, generator=torch.Generator().manual_seed(3))
        got = model.sample(batch, noise)
        kw = batch.model_inputs()
        drop = model.text_condition(batch, torch.ones(2, dtype=torch.bool))
        unc = {**kw, "attention_mask": kw["attention_mask"] * ~drop}
        ts = [1.0, 2 * (2 / 3) / (1 + 2 / 3), 2 * (1 / 3) / (1 + 1 / 3), 0.0]  # shift 2
        x = noise.clone()
        with torch.no_grad():
            for i in range(3):
                t = torch.full((2,), ts[i])
                vc = model(**kw, latents=x, timesteps=t).velocity
                vu = model(**unc, latents=x, timesteps=t).velocity
                x = x - (ts[i] - ts[i + 1]) * (vu + 2.5 * (vc - vu))
    finally:
        model.cfg_text_scale, model.n_steps, model.shift = saved
    torch.testing.assert_close(got, x, atol=1e-5, rtol=1e-5)


def test_capture_tags_denoising_steps_timesteps_and_branches(model) -> None:
    adapter = adapter_for(model)
    assert adapter is SANDBOX_MOT and adapter.timestep_module == "time_embedder"
    inputs = prepare(model, [{"prompt": "draw 2 red apple"}, {"prompt": "draw 4 green star"}], "generation")
    saved = model.cfg_text_scale, model.n_steps
    model.cfg_text_scale, model.n_steps = 3.0, 4
    try:
        with (
            torch.no_grad(),
            capture(
                model, ["blocks.1.resid_post", "llm2vae.out"], layout=inputs.layout, roles=["image_gen"]
            ) as cap,
        ):
            tiles = adapter.generate(model, inputs)
    finally:
        model.cfg_text_scale, model.n_steps = saved
    assert tiles.shape == (2, model.n_cells)
    r = cap.rows("blocks.1.resid_post")
    assert sorted(set(r.step.tolist())) == [0, 1, 2, 3]
    assert set(r.role.tolist()) == {ROLE_ID["image_gen"]}
    assert sorted(cap.timesteps) == [0, 1, 2, 3]
    assert [round(cap.timesteps[k], 6) for k in range(4)] == [1.0, 0.75, 0.5, 0.25]
    for branch in ("cond", "uncond_text"):
        part = cap.rows("blocks.1.resid_post", step=2, branch=branch)
        assert len(part) == 2 * model.n_cells  # two prompts x nine latents
    assert len(cap.rows("blocks.1.resid_post", branch="uncond_image")) == 0
    v = cap.rows("llm2vae.out", step=0, branch="cond")
    assert v.values.shape == (2 * model.n_cells, model.latent_dim)


def test_a_skipped_pass_does_not_shift_the_branch_tags(model, monkeypatch) -> None:
    """Image guidance without text guidance runs cond then uncond_image: the second pass is tagged
    uncond_image (2), not uncond_text by its place in the order."""
    inputs = prepare(model, [{"prompt": "draw 2 red apple"}], "generation")
    real = model.branch_inputs

    def cond_and_image(batch):  # what branch_inputs gives with cfg_text_scale 1 and an und image
        cond = real(batch)["cond"]
        return {"cond": cond, "uncond_image": dict(cond)}

    monkeypatch.setattr(model, "branch_inputs", cond_and_image)
    monkeypatch.setattr(model, "n_steps", 2)
    with (
        torch.no_grad(),
        capture(model, ["blocks.1.resid_post"], layout=inputs.layout, roles=["image_gen"]) as cap,
    ):
        SANDBOX_MOT.generate(model, inputs)
    assert model.flow_passes == ("cond", "uncond_image")
    r = cap.rows("blocks.1.resid_post")
    assert sorted(set(r.branch.tolist())) == [0, 2]
    assert len(cap.rows("blocks.1.resid_post", branch="uncond_text")) == 0
    assert len(cap.rows("blocks.1.resid_post", step=1, branch="uncond_image")) == model.n_cells


def test_a_pass_the_sampler_did_not_declare_is_an_error() -> None:
    from uniprobe.hooks.calls import CallLog, CallPatternError

    log = CallLog()
    log.note_timestep(1.0, 2, ("cond", "uncond_image"))
    assert [log.begin(0, 5) and log.branch, log.begin(0, 5) and log.branch] == [0, 2]
    with pytest.raises(CallPatternError, match="not among the declared passes"):
        log.begin(0, 5)


def test_expert_points_join_to_the_block_points(model) -> None:
    inputs = prepare(model, [{"prompt": "draw 2 red apple"}, {"prompt": "how many apple ?"}], "generation")
    pts = ["blocks.0.mlp_out", "blocks.0.mlp_und.out", "blocks.0.mlp_gen.out", "blocks.0.attn_out"]
    pts += ["blocks.0.attn_und.out", "blocks.0.attn_gen.out"]
    with torch.no_grad(), capture(model, pts, layout=inputs.layout) as cap:
        model(**inputs.kwargs)
    gen = inputs.layout.roles == ROLE_ID["image_gen"]
    assert gen.any()
    for joined, und, gen_pt in (
        ("blocks.0.mlp_out", "blocks.0.mlp_und.out", "blocks.0.mlp_gen.out"),
        ("blocks.0.attn_out", "blocks.0.attn_und.out", "blocks.0.attn_gen.out"),
    ):
        torch.testing.assert_close(cap[joined][gen], cap[gen_pt][gen])
        torch.testing.assert_close(cap[joined][~gen], cap[und][~gen])


def test_spec_errors_name_the_keys() -> None:
    with pytest.raises(ValueError, match="missing keys \\['llm2vae'\\]"):
        bagel_adapter({k: v for k, v in BAGEL_SPEC.items() if k != "llm2vae"})
    with pytest.raises(ValueError, match="projections"):
        bagel_adapter({**BAGEL_SPEC, "projections": {"w": "w_proj"}})


def test_checkpoint_round_trip(model, tmp_path) -> None:
    save_sandbox(model, tmp_path / "mot")
    back = load_sandbox(tmp_path / "mot")
    assert back.arch == "mot" and back.latent_dim == model.latent_dim
    for (k, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_training_loss_backpropagates_through_the_packed_path(model, mixed_batch) -> None:
    model.train()
    try:
        model.zero_grad()
        total, n, parts = model.loss_sums(mixed_batch)
        (total / n).backward()
    finally:
        model.eval()
    assert parts["n_image"] == model.n_cells * int(model.gen_mask(mixed_batch.image_mask).any(-1).sum())
    assert model.llm2vae.weight.grad.abs().sum() > 0
    assert model.language_model.model.layers[0].mlp_moe_gen.down_proj.weight.grad.abs().sum() > 0


def test_shipped_checkpoint_is_verified_and_draws() -> None:
    """sandbox-mot ships sha256-verified; a sample of direct items is understood and drawn."""
    from uniprobe.experiments.sandbox.checkpoint import SHIPPED, verify_checkpoint
    from uniprobe.experiments.sandbox.evaluate import evaluate_items

    verify_checkpoint(SHIPPED["sandbox-mot"])
    shipped = load_sandbox("sandbox-mot")
    assert shipped.arch == "mot" and shipped.training_recipe["source"] == "sandbox-query"
    items = [it for it in Suite(0).items if it.category == "direct" and it.task == "count"][::5]
    res = evaluate_items(shipped, items, cot=False, progress=False)
    assert sum(r["generation"] for r in res) >= 0.8 * len(res)
    assert sum(r["understanding"] for r in res) >= 0.8 * len(res)
