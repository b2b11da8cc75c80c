"""Prompts files follow JSON Lines exactly, and bad inputs fail before anything is written (exit 2)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from uniprobe.experiments.cli import main
from uniprobe.experiments.models import LoadedModel, TokenLimits, load_model, token_limits
from uniprobe.experiments.prompts_file import PromptFileError, parse_prompts, read_prompts
from uniprobe.hooks.layout import ROLE_ID
from uniprobe.hooks.store import ActivationStore

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama")


def write(tmp_path: Path, data: bytes | str, name: str = "p.jsonl") -> Path:
    path = tmp_path / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


# -- the file format ------------------------------------------------------------------------------
def test_only_newline_ends_a_line(tmp_path, tiny):
    # U+2028, U+2029 and U+0085 may stand unescaped in a JSON string: str.splitlines would split there
    meta = {"note": "a\u2028b\u2029c\x85d"}
    text = json.dumps({"input_ids": [1, 2], "meta": meta}, ensure_ascii=False) + "\n"
    examples = read_prompts(write(tmp_path, text), tiny)
    assert len(examples) == 1 and examples[0]["meta"] == meta and examples[0]["id"] == "1"


def test_control_characters_inside_a_line_are_a_json_error_not_a_new_line(tmp_path, tiny):
    # \x1c and \x0b are line breaks for str.splitlines; raw in a JSON string they are invalid JSON
    path = write(tmp_path, '{"input_ids": [1]}\n{"input_ids": [1], "id": "a\x1cb"}\n')
    with pytest.raises(PromptFileError, match=r"p\.jsonl:2: not valid JSON \(Invalid control character"):
        read_prompts(path, tiny)


def test_crlf_bom_blank_lines_and_a_missing_final_newline_read_the_same(tmp_path, tiny):
    lines = ['{"input_ids": [1, 2]}', '{"text": "t5 t6", "id": "x"}']
    plain = read_prompts(write(tmp_path, "\n".join(lines) + "\n", "a.jsonl"), tiny)
    crlf = read_prompts(  # with a UTF-8 byte order mark, which is skipped
        write(tmp_path, b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n", "b.jsonl"), tiny
    )
    blank = read_prompts(write(tmp_path, lines[0] + "\n \t\n\n" + lines[1], "c.jsonl"), tiny)
    assert plain == crlf == [{"input_ids": [1, 2], "id": "1"}, {"id": "x", "input_ids": [5, 6]}]
    assert [e["input_ids"] for e in blank] == [[1, 2], [5, 6]] and blank[0]["id"] == "1"


def test_invalid_utf8_names_the_line(tmp_path):
    path = write(tmp_path, b'{"input_ids": [1]}\n{"input_ids": [1], "id": "\xff"}\n')
    with pytest.raises(PromptFileError, match=r"p\.jsonl:2: not UTF-8 \(byte 0xff at column 27\)"):
        parse_prompts(path)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"input_ids": [1, NaN]}', "NaN is not JSON"),
        ("[1, 2]", "must be a JSON object, got list"),
        ('{"input_ids": [1], "meta": [1]}', "'meta' must be an object"),
        ('{"text": 5}', "'text' must be a non-empty string, got 5"),
        ('{"input_ids": []}', "'input_ids' must be a non-empty list of integers"),
    ],
)
def test_malformed_lines_name_the_line(tmp_path, line, message):
    with pytest.raises(PromptFileError, match=r"p\.jsonl:2: .*" + message.replace("(", r"\(")):
        parse_prompts(write(tmp_path, '{"input_ids": [1]}\n' + line + "\n"))


def test_an_empty_or_blank_file_is_an_error(tmp_path):
    with pytest.raises(PromptFileError, match="no prompts"):
        parse_prompts(write(tmp_path, "\n  \n"))


# -- ids, positions and roles against the model -----------------------------------------------------
def test_token_limits_come_from_the_embedding_and_the_backbone_config(tiny):
    assert token_limits(tiny) == TokenLimits(vocab_size=64, max_positions=256)
    query = load_model("tiny-query")  # a wrapper without a config: the limits are its lm's
    assert token_limits(query) == TokenLimits(vocab_size=64, max_positions=256)


TYPO_ROLE = r"roles\[1\] is \"imge_und\", not a role \(did you mean 'image_und'\?\); roles: text, image_und,"
BAD_LINES = [
    ({"input_ids": [1, True]}, r"input_ids\[1\] is true, not a token id"),
    ({"input_ids": [1, 3.0]}, r"input_ids\[1\] is 3.0, not a token id; write whole numbers"),
    ({"input_ids": [1, "5"]}, r'input_ids\[1\] is "5", not a token id'),
    ({"input_ids": [1, 64]}, r"input_ids\[1\] is 64, outside the vocabulary of 'tiny-llama' \(ids 0..63\)"),
    ({"input_ids": [1, -1]}, r"input_ids\[1\] is -1; token ids start at 0"),
    ({"input_ids": [1] * 257}, r"257 tokens, more than the 256 positions 'tiny-llama' takes; shorten"),
    ({"input_ids": [1, 2], "roles": ["text", "imge_und"]}, TYPO_ROLE),
    ({"input_ids": [1, 2], "roles": ["text", "pad"]}, r"roles\[1\] is \"pad\", not a role"),
    ({"input_ids": [1, 2], "roles": ["text"]}, r"'roles' has 1 entries but the prompt has 2 tokens"),
    ({"text": "t5 t6", "roles": ["text"] * 3}, r"'roles' has 3 entries but the prompt has 2 tokens"),
    ({"text": "t5 zz"}, r"tiny tokenizer: 'zz' is not a token"),
]  # fmt: skip


@pytest.mark.parametrize(("item", "message"), BAD_LINES)
def test_capture_refuses_a_bad_line_before_writing_anything(tmp_path, capsys, item, message):
    prompts = write(tmp_path, json.dumps({"input_ids": [1, 2]}) + "\n" + json.dumps(item) + "\n")
    out = tmp_path / "store"
    code = main(["capture", "--model", "tiny-llama", "--prompts", str(prompts), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert err.count("\n") == 1 and err.startswith(f"uniprobe capture: error: {prompts}:2: ")
    assert re.search(message, err), err


def test_text_prompt_models_check_words_and_refuse_roles(tmp_path, tiny):
    sandbox_like = LoadedModel(tiny.model, tiny.adapter, tiny.tokenizer, {"text_prompts": True}, "words")
    ok = read_prompts(write(tmp_path, '{"text": "t5 t6"}\n'), sandbox_like)
    assert ok == [{"id": "1", "prompt": "t5 t6"}]
    with pytest.raises(PromptFileError, match=r":1: tiny tokenizer: 'zz' is not a token"):
        read_prompts(write(tmp_path, '{"text": "t5 zz"}\n'), sandbox_like)
    with pytest.raises(PromptFileError, match=r":1: words sets every position's role itself; drop 'roles'"):
        read_prompts(write(tmp_path, '{"text": "t5", "roles": ["text"]}\n'), sandbox_like)


def test_cli_refuses_unknown_roles_and_batch_size_zero_before_writing(tmp_path, capsys):
    prompts = write(tmp_path, '{"input_ids": [1, 2]}\n')
    out = tmp_path / "store"
    base = ["capture", "--model", "tiny-llama", "--prompts", str(prompts), "--out", str(out)]
    with pytest.raises(SystemExit) as exit_:
        main([*base, "--roles", "txt"])
    assert exit_.value.code == 2 and "invalid choice: 'txt'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main([*base, "--batch-size", "0"])
    assert exit_.value.code == 2 and "--batch-size: 0 is too small; give 1 or more" in capsys.readouterr().err
    assert not out.exists()


def test_a_folder_as_prompts_file_is_a_one_line_error(tmp_path, capsys):
    out = tmp_path / "store"
    assert main(["capture", "--model", "tiny-llama", "--prompts", str(tmp_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == f"uniprobe capture: error: {tmp_path} is not a file; --prompts takes a JSON-lines file\n"
    assert not out.exists()


def test_good_prompts_still_capture(tmp_path):
    prompts = write(tmp_path, '{"input_ids": [1, 2], "roles": ["text", "cot"]}\n{"text": "t5 t6 t7"}\n')
    out = tmp_path / "store"
    assert main(["capture", "--model", "tiny-llama", "--prompts", str(prompts), "--out", str(out)]) == 0
    store = ActivationStore.open(out)
    assert store.n_examples == 2 and store.examples[0]["layout"][:2] == [ROLE_ID["text"], ROLE_ID["cot"]]
