"""One string, one meaning: answers and targets are words ("3" is the word 3), ids only as "id:N",
in lens, patch, sweep configs and the API. Probe errors give advice that works when followed; the
probe's default roles are the ones every labelled example has; --examples / --classes filter."""

from __future__ import annotations

import argparse
import json
import re

import pytest
import torch
from uniprobe.experiments.models import builtin_names
from uniprobe.hooks.errors import UsageError
from uniprobe.hooks.layout import role_ids
from uniprobe.hooks.rows import Rows
from uniprobe.hooks.store import ActivationStore
from uniprobe.probes.linear import probe_store, probe_tensors
from uniprobe.probes.splits import ProbeInputError


@pytest.fixture(scope="module")
def sandbox():
    if "sandbox-ar" not in builtin_names():
        pytest.skip("the sandbox AR checkpoint is not installed")
    from uniprobe.experiments.models import load_model

    return load_model("sandbox-ar")


def _parser(add):  # noqa: ANN001, ANN202
    parser = argparse.ArgumentParser(prog="uniprobe")
    add(parser.add_subparsers(dest="command", required=True))
    return parser


def test_parse_token_words_ids_and_range(sandbox):
    from uniprobe.experiments.tokens import parse_token

    word3 = sandbox.token_id("3")
    assert word3 != 3 and sandbox.token_str(3) == "<answer>"
    assert parse_token(sandbox, "3") == word3 and parse_token(sandbox, 3) == word3  # an int is its word
    assert parse_token(sandbox, "id:3") == 3
    with pytest.raises(UsageError, match=r"'id:99999' is outside the vocabulary.*116 tokens, ids 0\.\.115"):
        parse_token(sandbox, "id:99999")
    with pytest.raises(UsageError, match="id:N"):
        parse_token(sandbox, "id:x")


def test_lens_answers_are_words_unless_id(sandbox, tmp_path, capsys):
    from uniprobe.experiments.cli.probe import add_lens_parser

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"text": "what is 2 + 1 ?"}) + "\n")
    parser = _parser(add_lens_parser)
    for given, tid, text in (("3", sandbox.token_id("3"), "3"), ("id:3", 3, "<answer>")):
        out = tmp_path / given.replace(":", "_")
        args = parser.parse_args(["lens", "--model", "sandbox-ar", "--prompts", str(prompts),
                                  "--answers", given, "--out", str(out)])  # fmt: skip
        assert args.func(args) == 0
        doc = json.loads((out / "lens.json").read_text())
        assert doc["meta"]["answers"] == [tid] and doc["meta"]["answer_tokens"] == [text]
        assert doc["meta"]["title"].endswith(f"answers {text}")  # the figure shows the token's text
        assert f"answers [{tid}] ({text})" in capsys.readouterr().out
    far = parser.parse_args(["lens", "--model", "sandbox-ar", "--prompts", str(prompts),
                             "--answers", "id:99999", "--out", str(tmp_path / "x")])  # fmt: skip
    with pytest.raises(UsageError, match="vocabulary has 116 tokens"):
        far.func(far)


def test_patch_targets_are_words_unless_id(sandbox, tmp_path):
    from uniprobe.experiments.cli.patch import add_patch_parser

    parser = _parser(add_patch_parser)
    base = ["patch", "--model", "sandbox-ar", "--clean", "what is 2 + 1 ?", "--corrupted", "what is 3 + 1 ?"]
    for target, foil, ids in (("3", "4", [sandbox.token_id("3"), sandbox.token_id("4")]),
                              ("id:3", "4", [3, sandbox.token_id("4")])):  # fmt: skip
        out = tmp_path / target.replace(":", "_")
        args = parser.parse_args([*base, "--target", target, "--foil", foil, "--out", str(out)])
        assert args.func(args) == 0
        metric = json.loads((out / "patch.json").read_text())["metric"]
        assert [metric["target"]["id"], metric["foil"]["id"]] == ids
        assert metric["target"]["given"] == target
    bad = parser.parse_args([*base, "--target", "id:99999", "--foil", "4", "--out", str(tmp_path / "b")])
    with pytest.raises(UsageError, match="vocabulary has 116 tokens"):
        bad.func(bad)


def test_sweep_answers_and_pairs_read_words(sandbox):
    from uniprobe.experiments.sweep.analyses import RunContext, answer_ids
    from uniprobe.experiments.sweep.config import SECTIONS
    from uniprobe.experiments.sweep.schema import ConfigError, section

    lens = section(SECTIONS["lens"], {"answers": [3, "id:3", "4"]}, "lens")
    assert lens["answers"] == ["3", "id:3", "4"]
    pair = {"clean": "a", "corrupted": "b", "target": 3, "foil": "id:4"}
    assert section(SECTIONS["patch"], {"pairs": [pair]}, "patch")["pairs"][0]["target"] == "3"
    with pytest.raises(ConfigError, match=r"lens.answers\[0\]: 'id:x' is not a token id"):
        section(SECTIONS["lens"], {"answers": ["id:x"]}, "lens")
    ctx = RunContext({}, None, sandbox, [{"id": "e0", "labels": {"answer": 3}}], None)  # type: ignore[arg-type]
    word3 = sandbox.token_id("3")
    assert answer_ids(ctx, "label:answer") == [[word3]]  # label 3 is the word 3, not token id 3
    assert answer_ids(ctx, lens["answers"]) == [word3, 3, sandbox.token_id("4")]


# -- probe advice -------------------------------------------------------------------------------
def _apply(msg: str, kw: dict) -> dict:
    """The fix an error message suggests, as keyword arguments."""
    folds = re.search(r"folds=(\d+) \(--folds", msg)
    classes = re.search(r"classes=(\[[^\]]*\])", msg)
    assert folds or classes, msg
    kw = dict(kw)
    if folds:
        kw["folds"] = int(folds.group(1))
    if classes:
        kw["keep"] = eval(classes.group(1))  # noqa: S307 - a repr the message wrote
    return kw


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("per_entity", [1, 2])
def test_grouped_probe_advice_works_when_followed(seed, per_entity):
    g = torch.Generator().manual_seed(seed)
    ents = [("a", 3)] * 6 + [("b", 3)] * 6 + [("c", per_entity)] * 2
    labels = [c for c, k in ents for _ in range(k)]
    groups = [f"e{e}" for e, (_, k) in enumerate(ents) for _ in range(k)]
    x = torch.randn(1, len(labels), 4, generator=g)
    kw = {"folds": 5, "seed": seed}
    with pytest.raises(ProbeInputError) as err:
        probe_tensors(x, labels, group_values=groups, group_by="entity", n_boot=10, **kw)
    assert "which was tried and works" in str(err.value)
    fix = _apply(str(err.value), kw)
    keep = fix.pop("keep", None)
    rows = [i for i, c in enumerate(labels) if keep is None or c in keep]
    res = probe_tensors(x[:, rows], [labels[i] for i in rows], group_values=[groups[i] for i in rows],
                        group_by="entity", n_boot=10, **fix)  # fmt: skip
    assert len(res) == 1


def _mixed_store(path, n: int = 60) -> ActivationStore:
    """Every example has text; only the even ones also image_und. Labels: ``category`` (3 values, one
    rare), ``entity`` (groups)."""
    store = ActivationStore.create(path, model={"model_class": "Synthetic"}, points=["blocks.0.resid_post"])
    g = torch.Generator().manual_seed(0)
    ex, pos, role, layouts = [], [], [], []
    for i in range(n):
        layout = role_ids(["text"] * 2 + (["image_und"] * 2 if i % 2 == 0 else []))
        layouts.append(layout)
        ex += [i] * len(layout)
        pos += list(range(len(layout)))
        role += layout
    ex_t, zeros = torch.tensor(ex), torch.zeros(len(ex), dtype=torch.long)
    rows = {"blocks.0.resid_post": Rows(torch.randn(len(ex), 8, generator=g), ex_t, torch.tensor(pos),
                                        torch.tensor(role), zeros, zeros)}  # fmt: skip
    examples = [
        {"id": f"ex{i}", "labels": {"category": "rare" if i < 1 else ("cat", "dog")[i % 2],
                                    "entity": f"e{i % 15}"}, "meta": {}, "layout": layouts[i]}
        for i in range(n)
    ]  # fmt: skip
    store.write_shard(0, rows, examples)
    store.finalize()
    return ActivationStore.open(path)


def test_default_roles_skip_partial_ones_and_filters(tmp_path, capsys):
    from uniprobe.experiments.cli.probe import add_probe_parser

    store = _mixed_store(tmp_path / "store")
    kw = {"n_boot": 10, "folds": 2}
    res = probe_store(store, "category", classes=["cat", "dog"], **kw)
    assert {r["role"] for r in res.rows} == {"text"}  # image_und: only half the examples have it
    assert any("image_und" in note and "29 of the 59" in note for note in res.meta["notes"])
    # the rare class has no room: the error says to keep the other classes, and that works
    with pytest.raises(ProbeInputError, match=r"classes=\['cat', 'dog'\]") as err:
        probe_store(store, "category", **kw)
    assert "which was tried and works" in str(err.value)
    first = [f"ex{i}" for i in range(40)]
    res = probe_store(store, "category", examples=first, classes=["cat", "dog"], **kw)
    assert res.meta["store_examples"] == 39  # ex0 is the rare class
    with pytest.raises(ProbeInputError, match="not values of label"):
        probe_store(store, "category", classes=["cow"], **kw)
    with pytest.raises(ProbeInputError, match="'nope'"):
        probe_store(store, "category", examples=["nope"], **kw)

    ids = tmp_path / "ids.txt"
    ids.write_text("\n".join(f"ex{i}" for i in range(1, 60)) + "\n")
    parser = _parser(add_probe_parser)
    args = parser.parse_args(["probe", str(tmp_path / "store"), "--label", "category", "--examples", str(ids),
                              "--folds", "2", "--out", str(tmp_path / "p")])  # fmt: skip
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "note: role 'image_und' left out" in printed and "2 classes" in printed
    argv = ["probe", str(tmp_path / "store"), "--label", "category", "--classes", "cat", "dog"]
    args = parser.parse_args([*argv, "--roles", "text", "--folds", "2", "--out", str(tmp_path / "q")])
    assert args.func(args) == 0
