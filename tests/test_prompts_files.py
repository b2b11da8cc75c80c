"""The shipped prompts files work with the models the shipped configs pair them with.

``experiments/configs/prompts/*.jsonl`` are English prompts for the real-model recipes, read by each
checkpoint's own tokenizer, which cannot be loaded offline: what is checked here is what can be
(JSON Lines through the toolkit's own reader, fields, one-word answers), that no config pairs them with
a built-in model (whose vocabulary cannot encode them), and that every prompts file a config does pair
with a built-in model encodes in that model's vocabulary.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from uniprobe.experiments.models import builtin_names, load_model
from uniprobe.experiments.prompts_file import parse_prompts, read_prompts
from uniprobe.experiments.sweep.config import CONFIGS, load_config, shipped_configs

PROMPTS = sorted((CONFIGS / "prompts").glob("*.jsonl"))


def _prompt_runs() -> list[tuple[str, str, str]]:
    """(config, model path, prompts file) of every run of every shipped config that reads a prompts file."""
    out = []
    for name in shipped_configs():
        for run in load_config(name).runs:
            if run["task"]["prompts"]:
                out.append((name, run["model"]["path"], run["task"]["prompts"]))
    return out


def test_shipped_prompts_files_exist_and_are_used() -> None:
    assert [p.name for p in PROMPTS] == ["arithmetic.jsonl", "drawings.jsonl"]
    used = {Path(p).name for _, _, p in _prompt_runs()}
    assert used == {p.name for p in PROMPTS}, "a shipped prompts file no config reads (or a missing one)"


@pytest.mark.parametrize("path", PROMPTS, ids=lambda p: p.name)
def test_prompts_file_is_valid_json_lines_with_ids_texts_and_one_word_answers(path: Path) -> None:
    items = [item for _, item in parse_prompts(path)]  # JSON Lines, keys, roles: the toolkit's reader
    ids = [item["id"] for item in items]
    assert len(set(ids)) == len(ids), f"{path.name}: repeated ids"
    for item in items:
        assert isinstance(item.get("text"), str) and item["text"].strip(), item
        labels = item.get("labels", {})
        assert set(labels) == {"answer", "object"}, item
        answer = labels["answer"]
        assert isinstance(answer, str) and len(answer.split()) == 1, f"{item['id']}: answer {answer!r}"
        assert answer.isdigit() and 0 <= int(answer) <= 9, f"{item['id']}: answer {answer!r} is not a digit"


def test_no_config_pairs_the_english_prompts_with_a_built_in_model() -> None:
    shipped = {str(p) for p in PROMPTS}
    wrong = [(c, m, p) for c, m, p in _prompt_runs() if p in shipped and m in builtin_names()]
    assert not wrong, f"built-in models cannot read the English prompts: {wrong}"


def test_prompts_a_config_pairs_with_a_built_in_model_encode_in_its_vocabulary() -> None:
    pairs = {(m, p) for _, m, p in _prompt_runs() if m in builtin_names()}
    for model, prompts in sorted(pairs):  # none today; a future config that adds one is checked here
        read_prompts(prompts, load_model(model))


def test_the_english_prompts_do_not_encode_in_the_built_in_vocabularies() -> None:
    """Why they are paired with real models only: the sandbox and tiny vocabularies reject them."""
    for model in ("sandbox-ar", "tiny-llama"):
        loaded = load_model(model)
        for path in PROMPTS:
            with pytest.raises(ValueError, match="What|Draw|vocabulary|not a"):
                read_prompts(path, loaded)


def test_real_configs_say_which_tokenizer_their_prompts_are_for() -> None:
    for name in shipped_configs():
        text = (CONFIGS / f"{name}.yaml").read_text()
        if "../prompts/" in text:
            assert "English text for the checkpoint's own tokenizer" in text, name
