"""The shipped sweep configs run end to end: the real-model recipes with their path replaced by a tiny
model of the same class (saved to a folder with a word tokenizer), the paper protocols on a sandbox model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from safetensors.torch import save_file
from uniprobe.experiments.sweep import load_config, run_sweep
from uniprobe.experiments.tiny import build_tiny, tiny_query

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
CONFIGS = Path(__file__).resolve().parents[1] / "experiments" / "configs"


def save_word_tokenizer(folder: Path) -> None:
    """A word-level tokenizer over every word of the shipped prompts, ids 5.. (below the tiny models'
    image-token ids), saved beside the weights as transformers expects."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words: list[str] = []
    for file in sorted((CONFIGS / "prompts").glob("*.jsonl")):
        for line in file.read_text().splitlines():
            words += [w for w in re.findall(r"\w+|[^\w\s]+", json.loads(line)["text"]) if w not in words]
    assert len(words) <= 35, "the tiny models' text ids end at 39"
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{w: 5 + i for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<pad>").save_pretrained(
        folder
    )


def check_sweep(entries: list[dict], out: Path) -> None:
    assert entries and all(e["status"] == "done" for e in entries), [e["error"] for e in entries]
    for e in entries:
        run = out / e["dir"]
        assert (run / "DONE.json").exists() and list(run.rglob("*.png"))
    assert json.loads((out / "index.json").read_text())["counts"]["done"] == len(entries)


@pytest.mark.parametrize(
    ("recipe", "tiny"),
    [("janus_pro_1b", "tiny-janus"), ("emu3", "tiny-emu3"), ("chameleon_7b", "tiny-chameleon")],
)
def test_real_recipe_runs_on_a_tiny_model_of_its_class(recipe, tiny, tmp_path):
    folder = tmp_path / tiny
    model, _ = build_tiny(tiny)
    model.save_pretrained(folder)
    save_word_tokenizer(folder)
    cfg = load_config(
        CONFIGS / "real" / f"{recipe}.yaml", [f"models[0].path={folder}"], out=str(tmp_path / "o")
    )
    check_sweep(run_sweep(cfg), tmp_path / "o")


LOADER = """
from safetensors.torch import load_file
from transformers import PreTrainedTokenizerFast
from uniprobe.experiments.tiny import tiny_query


def load(path):
    model, _ = tiny_query()
    model.load_state_dict(load_file(f"{path}/model.safetensors"))
    return model, PreTrainedTokenizerFast.from_pretrained(path)
"""


def test_query_recipe_runs_with_its_adapter_file_and_a_loader(tmp_path):
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    model, _ = tiny_query(seed=3)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    save_word_tokenizer(folder)
    (tmp_path / "loader.py").write_text(LOADER)
    overrides = [f"models[0].path={folder}", f"models[0].loader={tmp_path / 'loader.py'}:load"]
    cfg = load_config(CONFIGS / "real" / "query_based.yaml", overrides, out=str(tmp_path / "o"))
    assert cfg.runs[0]["model"]["adapter"] == str(CONFIGS / "real" / "query_adapter.yaml")
    entries = run_sweep(cfg)
    check_sweep(entries, tmp_path / "o")
    assert any(e["headline"]["probe.best_role"] in ("text", "query") for e in entries)


PROTOCOL_OVERRIDES = {  # one model; fewer items where no probe needs them
    "unisandbox": ["tasks[2].limit=4"],
    "gapeval": ["tasks[0].limit=6"],
    "r3": ["tasks[0].limit=12", "tasks[1].limit=16"],
}


@pytest.mark.parametrize("model", ["sandbox-ar", "sandbox-mot"])
@pytest.mark.parametrize("protocol", sorted(PROTOCOL_OVERRIDES))
def test_protocol_config_runs_on_a_sandbox_model(protocol, model, tmp_path):
    overrides = [f"models=[{{path: {model}}}]", *PROTOCOL_OVERRIDES[protocol]]
    cfg = load_config(CONFIGS / f"{protocol}.yaml", overrides, out=str(tmp_path / "o"))
    check_sweep(run_sweep(cfg), tmp_path / "o")
