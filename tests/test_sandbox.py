"""Tests of the sandbox models: streams and roles, padding, training, checkpoints, shipped weights."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from uniprobe.experiments.sandbox import ChecksumError, build_model, load_sandbox, save_sandbox
from uniprobe.experiments.sandbox.checkpoint import SHIPPED
from uniprobe.experiments.sandbox.evaluate import evaluate_items, format_gap_table, gap_table
from uniprobe.experiments.sandbox.train import accumulate_step, length_chunks, train_sandbox
from uniprobe.experiments.tasks import Prompt, Suite, world

TINY = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
}
ARCHS = ("ar", "query")


@pytest.fixture(scope="module")
def suite() -> Suite:
    return Suite(0)


def tiny(arch: str):
    torch.manual_seed(0)
    kw = {"n_queries": 4, "decoder_hidden": 32} if arch == "query" else {}
    return build_model(arch, backbone=TINY, **kw).eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_module_paths(arch: str) -> None:
    m = tiny(arch)
    names = dict(m.named_modules())
    for path in (
        "lm.model.layers.0",
        "lm.model.layers.1",
        "lm.model.norm",
        "lm.lm_head",
        "lm.model.embed_tokens",
        "img_embed",
    ):
        assert path in names, path
    if arch == "ar":
        assert "gen_head" in names
    else:
        assert "connector" in names and "decoder" in names and m.queries.shape == (4, 32)


@pytest.mark.parametrize("arch", ARCHS)
def test_layout_roles_and_embeddings(arch: str, suite: Suite) -> None:
    m = tiny(arch)
    count_item = next(it for it in suite.items if it.category == "direct" and it.task == "count")
    und = m.prompt_layout([count_item.und_prompt], mode="understand")
    roles = und.roles[0]
    assert roles.count("image_und") == world.N_CELLS and roles[-1] == "text"
    assert und.image_tokens[0][und.image_mask[0]].tolist() == list(count_item.question_images[0])
    emb = m.embed_inputs(und.input_ids, und.image_tokens, und.image_mask)
    pos = roles.index("image_und")
    assert torch.equal(emb[0, pos], m.img_embed.weight[count_item.question_images[0][0]])
    items = [it for it in suite.items if it.category == "arithmetic"][:2]
    gen = m.prompt_layout(
        [it.draw_prompt for it in items], mode="generate", targets=[it.target for it in items]
    )
    want = "image_gen" if arch == "ar" else "query"
    n = world.N_CELLS if arch == "ar" else m.n_queries
    assert all(r[-n:] == [want] * n for r in gen.roles)
    if arch == "query":
        emb = m.embed_inputs(gen.input_ids, gen.image_tokens, gen.image_mask)
        assert torch.equal(emb[0, -n:], m.queries.detach())
    grids, batches = m.generate_image([it.draw_prompt for it in items], cot=True, return_batch=True)
    assert all(g.shape == (world.GRID, world.GRID) for g in grids)
    assert "cot" in batches[0].roles[0]
    with pytest.raises(ValueError, match="CoT plan"):
        m.generate_image(["draw 2 red cup"], cot=True)


@pytest.mark.parametrize("arch", ARCHS)
def test_left_padding_does_not_change_outputs(arch: str) -> None:
    m = tiny(arch)
    short, long = Prompt("draw 2 red cup"), Prompt("k = 3 , m = k ; draw as many blue star as m")
    alone = m.run(m.prompt_layout([short], targets=[[1] * world.N_CELLS]))
    both = m.run(m.prompt_layout([long, short], targets=[[1] * world.N_CELLS] * 2))
    n = alone.text_logits.shape[1]
    torch.testing.assert_close(both.text_logits[1, -n:], alone.text_logits[0], atol=1e-4, rtol=1e-4)
    img = both.image_logits[1, -n:] if arch == "ar" else both.image_logits[1]
    torch.testing.assert_close(img, alone.image_logits[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_few_steps_make_the_loss_fall(arch: str, tmp_path) -> None:
    train_sandbox(
        arch,
        tmp_path,
        steps=40,
        batch_size=16,
        lr=3e-3,
        warmup=5,
        backbone=TINY,
        time_budget_s=None,
        log_every=1,
        progress=False,
        seed=0,  # not the arch's default: the few-step threshold below was set on seed 0
    )
    losses = [json.loads(line)["loss"] for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "SHA256SUMS").exists()


def test_length_chunks_cap_rows_and_padded_tokens() -> None:
    lengths = [5, 30, 6, 7, 29, 8, 40, 5]
    chunks = length_chunks(lengths, max_rows=3, max_tokens=60)
    assert sorted(i for c in chunks for i in c) == list(range(len(lengths)))
    for c in chunks:
        assert len(c) <= 3 and (len(c) == 1 or len(c) * max(lengths[i] for i in c) <= 60)
    assert [lengths[i] for c in chunks for i in c] == sorted(lengths)


@pytest.mark.parametrize("arch", ARCHS)
def test_micro_batching_does_not_change_the_gradient(arch: str, suite: Suite) -> None:
    examples = list(itertools.islice(suite.training_examples(0, prefix_p=0.5), 24))
    grads = []
    for micro_batch, max_tokens in ((24, None), (5, None), (24, 120)):
        m = tiny(arch)
        loss, _ = accumulate_step(m, examples, micro_batch, max_tokens)
        grads.append((loss, [p.grad.clone() for p in m.parameters() if p.grad is not None]))
    for loss, g in grads[1:]:
        torch.testing.assert_close(loss, grads[0][0], atol=1e-5, rtol=1e-5)
        for a, b in zip(g, grads[0][1], strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip(arch: str, tmp_path, suite: Suite) -> None:
    m = tiny(arch)
    save_sandbox(m, tmp_path)
    m2 = load_sandbox(tmp_path, verify=True)
    assert type(m2) is type(m) and not m2.training
    items = suite.items[:4]
    batch = m.prompt_layout([it.draw_prompt for it in items], targets=[it.target for it in items])
    a, b = m.run(batch), m2.run(batch)
    assert torch.equal(a.text_logits, b.text_logits) and torch.equal(a.image_logits, b.image_logits)
    assert m2.tokenizer.vocab == m.tokenizer.vocab


def test_sha256_mismatch_raises(tmp_path) -> None:
    save_sandbox(tiny("ar"), tmp_path)
    with (tmp_path / "model.safetensors").open("r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    with pytest.raises(ChecksumError, match="model.safetensors"):
        load_sandbox(tmp_path, verify=True)
    load_sandbox(tmp_path, verify=False)  # still loadable when asked not to check


def test_gap_table_shapes(suite: Suite) -> None:
    m = tiny("query")
    items = [it for it in suite.items if it.category == "mapping"][:4] + suite.items[:2]
    results = evaluate_items(m, items)
    rows = gap_table(m, results=results)
    assert {r["category"] for r in rows} == {"mapping", "direct"}
    assert sum(r["n"] for r in rows if r["category"] == "mapping") == 2  # A/B groups count once
    assert "| direct |" in format_gap_table(rows)


@pytest.mark.parametrize("name", list(SHIPPED))
def test_shipped_checkpoints_draw_direct_prompts(name: str, suite: Suite) -> None:
    if not (SHIPPED[name] / "model.safetensors").exists():
        pytest.skip(f"{SHIPPED[name]} not shipped")
    m = load_sandbox(name, verify=True)
    items = [it for it in suite.items if it.category == "direct"][::3]
    grids = m.generate_image([it.draw_prompt for it in items])
    acc = sum(world.satisfies(g, it.criterion) for g, it in zip(grids, items, strict=True)) / len(items)
    assert acc >= 0.9, f"{name}: direct generation {acc:.0%}"
