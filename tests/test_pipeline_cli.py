"""Dataset capture into a store (resume after interruption, generation mode) and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from uniprobe.experiments.cli import main
from uniprobe.experiments.tiny import tiny_janus, tiny_llama
from uniprobe.hooks.adapters import adapter_for
from uniprobe.hooks.pipeline import capture_dataset
from uniprobe.hooks.store import ActivationStore, StoreExistsError


def _examples(n: int = 10) -> list[dict]:
    return [
        {"id": f"ex{i}", "input_ids": [1, 5 + i % 7, 6 + i % 5, 7][: 2 + i % 3], "labels": {"answer": i % 3}}
        for i in range(n)
    ]


def test_capture_dataset_matches_direct_forward(tmp_path):
    model, _ = tiny_llama()
    examples = _examples()
    store = capture_dataset(
        model, examples, "blocks.0.resid_post,final_norm", tmp_path / "s", batch_size=4, progress=False
    )
    assert store.n_examples == 10 and store.complete
    block0 = store.matrix("blocks.0.resid_post", role="text", reduce="last")
    final = store.matrix("final_norm", role="text", reduce="last")
    for i, ex in enumerate(examples):
        with torch.no_grad():
            hs = model(input_ids=torch.tensor([ex["input_ids"]]), output_hidden_states=True).hidden_states
        # transformers 5: hidden_states[1] is block 0's output, hidden_states[-1] is after the final norm
        torch.testing.assert_close(block0.values[i], hs[1][0, -1], atol=1e-5, rtol=0)
        torch.testing.assert_close(final.values[i], hs[-1][0, -1], atol=1e-5, rtol=0)
    assert block0.labels["answer"] == [i % 3 for i in range(10)]


def test_interrupted_capture_resumes_without_redoing_finished_shards(tmp_path):
    model, _ = tiny_llama()
    examples = _examples()
    calls = {"n": 0}

    def boom(mod, args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated Ctrl-C during batch 3")

    handle = model.model.layers[0].register_forward_pre_hook(boom)
    with pytest.raises(KeyboardInterrupt):
        capture_dataset(
            model, examples, "blocks.*.resid_post", tmp_path / "s", batch_size=4, shard_size=4, progress=False
        )
    handle.remove()
    partial = ActivationStore.create(tmp_path / "s2", model={"x": 1}, points=["p"])  # unrelated store
    del partial
    with pytest.raises(StoreExistsError, match="resume"):
        capture_dataset(
            model, examples, "blocks.*.resid_post", tmp_path / "s", batch_size=4, shard_size=4, progress=False
        )
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "s").glob("shard-*.safetensors")}
    assert len(before) == 2
    ran = {"n": 0}
    handle = model.model.layers[0].register_forward_pre_hook(lambda m, a: ran.__setitem__("n", ran["n"] + 1))
    store = capture_dataset(
        model, examples, "blocks.*.resid_post", tmp_path / "s", batch_size=4, shard_size=4, resume=True,
        progress=False,
    )  # fmt: skip
    handle.remove()
    assert ran["n"] == 1  # only the unfinished batch ran
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "s").glob("shard-*.safetensors")}
    assert all(after[k] == v for k, v in before.items())
    full = capture_dataset(
        model, examples, "blocks.*.resid_post", tmp_path / "ref", batch_size=4, progress=False
    )
    torch.testing.assert_close(
        store.rows("blocks.1.resid_post").values, full.rows("blocks.1.resid_post").values
    )


def test_generate_mode_tags_steps_and_branches(tmp_path):
    model, info = tiny_janus()
    examples = [{"id": str(i), "input_ids": [1, 10 + i, 11, 4], "labels": {"k": i % 2}} for i in range(4)]
    store = capture_dataset(
        model,
        examples,
        "blocks.1.resid_post",
        tmp_path / "g",
        roles=["image_gen"],
        mode="generate",
        batch_size=2,
        progress=False,
    )
    rows = store.rows("blocks.1.resid_post")
    n_gen = info["num_gen_tokens"]
    assert sorted(set(rows.step.tolist())) == list(range(1, n_gen))  # steps 1.. feed the generated tokens
    assert set(rows.branch.tolist()) == {0, 1}
    assert len(rows) == 4 * 2 * (n_gen - 1)
    assert all(len(ex["meta"]["generated"]) == n_gen for ex in store.examples)
    cond = store.rows("blocks.1.resid_post", branch="cond")
    assert len(cond) == 4 * (n_gen - 1)


def test_empty_role_selection_is_an_error(tmp_path):
    model, _ = tiny_llama()
    with pytest.raises(ValueError, match="empty role selection"):
        capture_dataset(model, _examples(), "blocks.*.resid_post", tmp_path / "s", roles=[], progress=False)


# -- CLI ---------------------------------------------------------------------------------------


def _prompts(tmp_path, lines):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_cli_points_lists_family_points(capsys):
    assert main(["points", "--model", "tiny-janus"]) == 0
    out = capsys.readouterr().out
    assert "blocks.1.resid_post" in out and "gen_head.in" in out and "adapter 'janus'" in out


def test_cli_capture_and_inspect(tmp_path, capsys):
    prompts = _prompts(
        tmp_path,
        [
            '{"text": "t1 t5 t6", "labels": {"answer": 1}}',
            '{"input_ids": [1, 7, 8, 9], "labels": {"answer": 2}}',
        ],
    )
    out = tmp_path / "store"
    code = main(
        [
            "capture",
            "--model",
            "tiny-llama",
            "--prompts",
            str(prompts),
            "--points",
            "blocks.1.hook_resid_post,final_norm",
            "--roles",
            "text",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    store = ActivationStore.open(out)
    assert store.points == ["blocks.1.resid_post", "final_norm"]
    assert store.labels("answer") == [1, 2]
    capsys.readouterr()
    assert main(["inspect", str(out), "--verify"]) == 0
    assert "blocks.1.resid_post" in capsys.readouterr().out
    # a second capture into the same folder refuses to overwrite finished work
    code = main(["capture", "--model", "tiny-llama", "--prompts", str(prompts), "--out", str(out)])
    assert code == 2
    assert "--resume" in capsys.readouterr().err


def test_cli_unknown_point_names_near_matches(tmp_path, capsys):
    prompts = _prompts(tmp_path, ['{"input_ids": [1, 2, 3]}'])
    code = main(
        [
            "capture",
            "--model",
            "tiny-llama",
            "--prompts",
            str(prompts),
            "--points",
            "blocks.9.resid_post",
            "--out",
            str(tmp_path / "s"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "blocks.9.resid_post" in err and "2 blocks" in err


def test_cli_malformed_prompt_line_names_the_line(tmp_path, capsys):
    prompts = _prompts(tmp_path, ['{"input_ids": [1, 2]}', '{"input_ids": [1, 2', '{"input_ids": [3]}'])
    code = main(["capture", "--model", "tiny-llama", "--prompts", str(prompts), "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert code == 2 and "prompts.jsonl:2" in err
    assert not (tmp_path / "s").exists()


def test_cli_unknown_model_and_unknown_family(tmp_path, capsys):
    assert main(["points", "--model", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert "tiny-janus" in err and "nothing is downloaded" in err
    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32)).save_pretrained(d)
    assert main(["points", "--model", str(d)]) == 2
    err = capsys.readouterr().err
    assert "GPT2LMHeadModel" in err and "Supported families" in err and "adapter" in err


def test_cli_local_llama_folder(tmp_path, capsys):
    model, _ = tiny_llama()
    model.save_pretrained(tmp_path / "llama")
    assert main(["points", "--model", str(tmp_path / "llama")]) == 0
    assert adapter_for(model).name in capsys.readouterr().out


def test_query_adapter_file_with_a_wrong_path_names_it(tmp_path):
    from uniprobe.experiments.tiny import tiny_query
    from uniprobe.hooks.adapters import load_adapter_file
    from uniprobe.hooks.capture import capture

    spec = {
        "blocks": "lm.model.layers",
        "final_norm": "lm.model.norm",
        "lm_head": "lm.lm_head",
        "queries": "queries",
        "connector": "connectr",
    }
    (tmp_path / "a.json").write_text(json.dumps(spec))
    adapter = load_adapter_file(tmp_path / "a.json")
    model, _ = tiny_query()
    with pytest.raises(AttributeError, match="connectr.*children: .*connector"):
        with capture(model, "queries", adapter=adapter):
            pass
    assert not model.lm.model.layers[0]._forward_pre_hooks  # the tracker was removed again


def test_folder_with_word_level_tokenizer_keeps_multi_digit_words(tmp_path):
    from uniprobe.experiments.models import encode, load_model
    from uniprobe.experiments.tiny import tiny_qwen2
    from uniprobe.hooks.backends.tl_backend import word_level_tokenizer

    model, _ = tiny_qwen2()
    model.save_pretrained(tmp_path / "qwen")
    word_level_tokenizer(64, str(tmp_path / "qwen"))
    loaded = load_model(str(tmp_path / "qwen"))
    assert loaded.adapter.name == "causal_lm"
    assert encode(loaded, "t1 t11 t23 t2") == [1, 11, 23, 2]
