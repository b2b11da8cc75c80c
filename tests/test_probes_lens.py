"""Logit lens and tuned lens: the last layer decodes to the model's own logits (text and query
positions), image-generation positions decode too, the tuned lens lowers KL, the CLI runs."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from uniprobe.experiments.tiny import tiny_janus, tiny_llama, tiny_query
from uniprobe.hooks.adapters import adapter_for
from uniprobe.hooks.pipeline import capture_dataset
from uniprobe.probes.lens import LensResult, logit_lens, logit_lens_store, readout
from uniprobe.probes.tuned_lens import TunedLens, tuned_lens_from_capture, tuned_lens_from_store


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _examples(n: int, length: int = 6, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "id": f"p{i}",
            "input_ids": torch.randint(5, 60, (length - i % 2,), generator=g).tolist(),
            "labels": {"ans": 7 + i % 3},
        }
        for i in range(n)
    ]


def _model_logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs.kwargs)
    return (out[0] if isinstance(out, tuple) else out.logits).float()


@pytest.mark.parametrize("build", [tiny_llama, tiny_query], ids=["llama", "query"])
def test_last_layer_lens_equals_the_models_logits(build):
    model, _ = build(layers=3)
    adapter = adapter_for(model)
    inputs = adapter.prepare(model, _examples(4))
    answers = [7, 9, 33]
    res = logit_lens(model, inputs, answers)
    logits = _model_logits(model, inputs)
    logp = torch.log_softmax(logits, -1)
    last = [r for r in res.rows if r["point"] == "blocks.2.resid_post"]
    roles = {r["role"] for r in last}
    assert roles == ({"text", "query"} if build is tiny_query else {"text"})
    mask = inputs.kwargs["attention_mask"]
    n_pos = int(mask.sum()) + (4 * model.n_queries if build is tiny_query else 0)
    assert len(last) == n_pos * len(answers)  # every real position (no padding), every answer
    for r in last:
        e, pos, tok = r["example"], r["pos"], r["token"]
        assert r["prob"] == pytest.approx(float(logp[e, pos, tok].exp()), abs=1e-6)
        assert r["rank"] == int((logits[e, pos] > logits[e, pos, tok]).sum()) + 1
        assert r["top_token"] == int(logits[e, pos].argmax())
    assert {k["point"]: k["kl"] for k in res.kl}["blocks.2.resid_post"] == pytest.approx(0.0, abs=1e-6)
    if build is tiny_query:  # the latent-CoT question: the lens reads the query positions at every layer
        query_rows = [r for r in res.rows if r["role"] == "query"]
        assert {r["layer"] for r in query_rows} == {0, 1, 2}


def test_rank_and_prob_shapes_and_summary(tmp_path):
    model, info = tiny_llama(layers=2)
    adapter = adapter_for(model)
    inputs = adapter.prepare(model, _examples(3))
    res = logit_lens(model, inputs, [[7], [8, 9], [10]], points="embed,blocks.*.resid_post")
    n_pos = inputs.kwargs["attention_mask"].sum(1).tolist()
    expected = 3 * (n_pos[0] * 1 + n_pos[1] * 2 + n_pos[2] * 1)  # 3 points, per-example answers
    assert len(res.rows) == expected
    assert {r["layer"] for r in res.rows} == {-1, 0, 1}
    assert all(1 <= r["rank"] <= info["vocab_size"] and 0 <= r["prob"] <= 1 for r in res.rows)
    summary = res.summary()
    assert {(s["layer"], s["token"]) for s in summary} == {
        (layer, t) for layer in (-1, 0, 1) for t in (7, 8, 9, 10)
    }
    for s in summary:
        assert set(s) >= {
            "lens",
            "layer",
            "role",
            "token",
            "mean_prob",
            "mean_rank",
            "median_rank",
            "top1",
            "n",
        }
    files = res.save(tmp_path / "lens")
    doc = json.loads(files["json"].read_text())
    assert len(doc["summary"]) == len(summary) and files["map"].stat().st_size > 1000
    assert len((tmp_path / "lens" / "lens_rows.csv").read_text().splitlines()) == expected + 1


def test_image_generation_positions_are_decoded():
    model, info = tiny_janus()
    adapter = adapter_for(model)
    inputs = adapter.prepare(
        model, [{"input_ids": [1, 10 + i, 11, info["boi_token_id"]]} for i in range(2)], mode="generation"
    )
    res = logit_lens(model, inputs, [5], roles=["image_gen"], generate=True)
    gen = [r for r in res.rows if r["role"] == "image_gen"]
    assert gen and {r["step"] for r in gen} == set(range(1, info["num_gen_tokens"]))
    assert {r["layer"] for r in gen} == {0, 1}


def test_store_lens_matches_model_lens_and_tuned_lens_lowers_kl(tmp_path):
    model, _ = tiny_llama(layers=3, hidden=32)
    with (
        torch.no_grad()
    ):  # sharper output distributions than a fresh init, so the lens has something to learn
        model.lm_head.weight.mul_(8.0)
    adapter = adapter_for(model)
    examples = _examples(96, length=8)
    store = capture_dataset(
        model, examples, "blocks.*.resid_post", tmp_path / "s", batch_size=32, progress=False
    )
    inputs = adapter.prepare(model, examples[:32])
    direct = logit_lens(model, inputs, [7])
    stored = logit_lens_store(store, model, "ans")
    probs = {(r["example"], r["point"], r["pos"]): r["prob"] for r in direct.rows}
    same = [r for r in stored.rows if r["token"] == 7 and r["example"] in {ex["id"] for ex in examples[:32]}]
    assert same
    by_id = {ex["id"]: i for i, ex in enumerate(examples)}
    for r in same:
        assert r["prob"] == pytest.approx(probs[(by_id[r["example"]], r["point"], r["pos"])], abs=1e-6)

    untrained = TunedLens(["blocks.0.resid_post", "blocks.1.resid_post"], 32)
    h = torch.randn(5, 32)
    assert torch.equal(untrained.translate("blocks.0.resid_post", h), h)  # zero init: the logit lens

    lens, report = tuned_lens_from_store(store, model, steps=150, lr=3e-3, seed=0)
    held = {(r["lens"], r["point"]): r["kl"] for r in report if r["split"] == "heldout"}
    for point in ("blocks.0.resid_post", "blocks.1.resid_post"):
        assert held[("tuned", point)] < 0.8 * held[("logit", point)], held
    assert held[("logit", "blocks.2.resid_post")] == pytest.approx(0.0, abs=1e-6)

    lens.save(tmp_path / "tl.safetensors")
    back = TunedLens.load(tmp_path / "tl.safetensors")
    assert back.points == lens.points and torch.equal(back.weight, lens.weight)
    both = logit_lens(model, inputs, [7], tuned=back)
    assert {r["lens"] for r in both.rows} == {"logit", "tuned"}
    kl = {(r["lens"], r["point"]): r["kl"] for r in both.kl}
    assert kl[("tuned", "blocks.0.resid_post")] < kl[("logit", "blocks.0.resid_post")]
    again, _ = tuned_lens_from_capture(model, inputs, steps=20, seed=0)
    again2, _ = tuned_lens_from_capture(model, inputs, steps=20, seed=0)
    assert torch.equal(again.weight, again2.weight)  # seeded


def test_readout_uses_the_adapters_final_norm_and_head():
    model, _ = tiny_query()
    read = readout(model)
    assert read.norm is model.lm.model.norm and read.head is model.lm.lm_head
    assert isinstance(LensResult([]).summary(), list)


def _lens_parser() -> argparse.ArgumentParser:
    from uniprobe.experiments.cli.probe import add_lens_parser

    parser = argparse.ArgumentParser()
    add_lens_parser(parser.add_subparsers(dest="command"))
    return parser


def test_lens_cli_end_to_end(tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"text": f"t1 t{5 + i} t{9 + i} t3"}) for i in range(5)) + "\n")
    out = tmp_path / "lens"
    args = _lens_parser().parse_args(
        ["lens", "--model", "tiny-query", "--prompts", str(prompts), "--answers", "t7", "id:12",
         "--tuned-steps", "10", "--out", str(out)]
    )  # fmt: skip
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "answers [7, 12]" in printed and "query" in printed
    for name in ("lens.json", "lens_rows.csv", "lens_map.png", "lens_kl.png", "tuned_lens.safetensors"):
        assert (out / name).exists(), name
    doc = json.loads((out / "lens.json").read_text())
    assert {s["lens"] for s in doc["summary"]} == {"logit", "tuned"}
    assert {s["token"] for s in doc["summary"]} == {7, 12}
    assert {s["token_str"] for s in doc["summary"]} == {"t7", "t12"}

    bad = _lens_parser().parse_args(
        ["lens", "--model", "tiny-llama", "--prompts", str(prompts), "--answers", "banana", "--out", str(out)]
    )
    with pytest.raises(ValueError, match="banana"):
        bad.func(bad)
    far = _lens_parser().parse_args(
        ["lens", "--model", "tiny-llama", "--prompts", str(prompts), "--answers", "id:999", "--out", str(out)]
    )
    with pytest.raises(ValueError, match="outside the vocabulary.*0..63"):
        far.func(far)
