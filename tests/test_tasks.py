"""Tests of the sandbox tasks: image world, judge, labels, splits, tokenizer (pure python, fast)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from uniprobe.experiments.tasks import Suite, WordTokenizer, world
from uniprobe.experiments.tasks import generators as gen


@pytest.fixture(scope="module")
def suite() -> Suite:
    return Suite(0)


def test_encode_decode_round_trip() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        grid = rng.integers(0, world.N_TILES, size=(world.GRID, world.GRID))
        tokens = world.encode(grid)
        assert len(tokens) == world.N_CELLS
        assert np.array_equal(world.decode(tokens), grid)
        assert world.encode(world.decode(tokens)) == tokens
    with pytest.raises(ValueError, match="tile codes"):
        world.decode([world.N_TILES] * world.N_CELLS)


def test_render_shape_and_determinism() -> None:
    grid = world.count_grid(3, world.object_tile("cup", "red"))
    img = world.render(grid, scale=8)
    assert img.shape == (world.GRID * 8, world.GRID * 8, 3) and img.dtype == np.uint8
    assert np.array_equal(img, world.render(grid, scale=8))
    assert not np.array_equal(img, world.render(world.empty_grid(), scale=8))


def test_judge_on_hand_made_grids() -> None:
    red_cup, blue_star = world.TILE_ID["red_cup"], world.TILE_ID["blue_star"]
    grid = np.array([[red_cup, 0, red_cup], [0, 0, 0], [red_cup, 0, 0]])
    d = world.describe(grid)
    assert d["counts"] == {"red_cup": 3} and d["n_objects"] == 3
    assert world.satisfies(grid, {"type": "count", "tile": "red_cup", "n": 3})
    assert not world.satisfies(grid, {"type": "count", "tile": "red_cup", "n": 2})
    grid[1, 1] = blue_star
    assert not world.satisfies(grid, {"type": "count", "tile": "red_cup", "n": 3})  # distractor present
    attrs = {
        "gender": "female",
        "age": "elder",
        "hair": "grey",
        "skin": "tan",
        "fruit": "plum",
        "flower": "iris",
    }
    portrait = world.portrait_grid(attrs)
    assert world.describe(portrait)["portrait"] == attrs
    assert world.satisfies(portrait, {"type": "portrait", "attrs": attrs})
    wrong = portrait.copy()
    wrong.reshape(-1)[world.PORTRAIT_CELLS["hair"]] = world.attribute_tile("hair", "black")
    assert world.describe(wrong)["portrait"]["hair"] == "black"
    assert not world.satisfies(wrong, {"type": "portrait", "attrs": attrs})


def test_arithmetic_labels_match_python_eval() -> None:
    for level in (1, 2, 3):
        exprs = gen.expressions(level)
        assert exprs
        for expr, value in exprs[:: max(1, len(exprs) // 200)]:
            assert len(expr.split()) == 2 * level + 1
            assert eval(expr) == value  # noqa: S307 - test of our own digits-and-operators strings
            assert 1 <= value <= world.MAX_COUNT


def test_items_are_consistent(suite: Suite) -> None:
    ids = [it.id for it in suite.items]
    assert len(ids) == len(set(ids))
    for it in suite.items:
        grid = it.target_grid
        assert world.satisfies(grid, it.criterion), it.id  # the target meets the judge's criterion
        if it.criterion["type"] == "count":
            assert it.answer == str(it.criterion["n"]) or it.category == "knowledge_forward"
        if it.category == "arithmetic":
            assert eval(it.labels["expr"]) == int(it.answer)  # noqa: S307
        if it.task == "count" and it.category == "direct":
            counts = world.describe(world.decode(it.question_images[0]))["counts"]
            assert counts.get(it.criterion["tile"], 0) == int(it.answer)
        if it.category == "knowledge_inverse":
            assert suite.by_name[it.answer].attrs == it.criterion["attrs"]


def test_mapping_variants_differ_only_in_queried_symbol(suite: Suite) -> None:
    groups: dict[str, list] = {}
    for it in suite.items:
        if it.category == "mapping":
            groups.setdefault(it.group, []).append(it)
    assert groups
    for members in groups.values():
        a, b = sorted(members, key=lambda it: it.labels["variant"])
        wa, wb = a.question.split(), b.question.split()
        assert len(wa) == len(wb) and sum(x != y for x, y in zip(wa, wb, strict=True)) == 1
        assert wa[-2] != wb[-2] and a.answer != b.answer
        ga, gb = a.gen_prompt.split(), b.gen_prompt.split()
        assert sum(x != y for x, y in zip(ga, gb, strict=True)) == 1
        # the answer follows from the statements
        stmts = dict(s.split(" = ") for s in a.question.split(" ; ")[0].split(" , "))
        for it in (a, b):
            v = it.question.split()[-2]
            while not v.isdigit():
                v = stmts[v]
            assert v == it.answer


def test_both_forms_share_ground_truth(suite: Suite) -> None:
    for it in suite.items:
        if (
            it.category in ("arithmetic", "mapping", "direct")
            and it.task == "count"
            or it.task in ("arith", "mapping")
        ):
            assert it.criterion["n"] == int(it.answer)
        if it.task == "portrait" and it.category != "knowledge_inverse":
            assert " ".join(it.criterion["attrs"][a] for a in world.ATTRIBUTES) == it.answer
        if it.task in ("fruit", "flower"):
            assert it.criterion == {"type": "count", "tile": it.answer, "n": 1}
        # the CoT plan filled with the right answers gives a direct prompt for the same target
        answers, k = [], 0
        while k < len(it.cot_questions):
            answers.append(it.answer if k == 0 else suite.by_name[answers[0]].describe())
            k += 1
        if it.category == "knowledge_forward" and it.task == "portrait":
            answers = [it.answer]
        assert it.draw_prompt.cot_final(answers).startswith("draw")


def test_determinism_by_seed() -> None:
    a, b, c = Suite(3), Suite(3), Suite(4)
    assert [it.to_dict() for it in a.items] == [it.to_dict() for it in b.items]
    assert [it.question for it in a.items] != [it.question for it in c.items]
    ta = list(itertools.islice(a.training_examples(1), 200))
    tb = list(itertools.islice(b.training_examples(1), 200))
    assert ta == tb


def test_no_test_prompt_occurs_in_training(suite: Suite) -> None:
    gen_prompts = {it.gen_prompt for it in suite.items}
    held_questions = {(it.question, it.question_images) for it in suite.items if not it.labels.get("taught")}
    held_exprs = {it.labels["expr"] for it in suite.items if it.category == "arithmetic"}
    for ex in itertools.islice(suite.training_examples(0), 20000):
        for p in [ex.prompt] + [p for p, _ in ex.prefix]:
            assert p.text not in gen_prompts
            assert (p.text, p.images) not in held_questions
            if p.text.startswith("what is") and "'s" not in p.text:
                assert p.text[len("what is ") : -2] not in held_exprs
        if ex.target is not None:
            assert ex.prompt.text.startswith("draw ")  # generation only on direct prompts
            assert "as many" not in ex.prompt.text


def test_tokenizer_round_trip_and_hf(tmp_path, suite: Suite) -> None:
    tok = WordTokenizer()
    for it in suite.items[::7]:
        for text in (it.question, it.gen_prompt, it.answer):
            assert tok.decode(tok.encode(text)) == text
    with pytest.raises(KeyError, match="not in the vocabulary"):
        tok.encode("draw 3 purple cup")
    tok.save(tmp_path / "tok.json")
    assert WordTokenizer.load(tmp_path / "tok.json").vocab == tok.vocab
    hf = tok.to_hf()
    text = "what is 2 + 3 ?"
    assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text)


def test_query_stream_leaks_only_direct_prompts(suite: Suite) -> None:
    """With ``direct_heldout=False`` (the query model's stream) only direct drawing prompts are shared."""
    direct = {it.gen_prompt for it in suite.items if it.category == "direct"}
    other = {it.gen_prompt for it in suite.items if it.category != "direct"}
    seen = set()
    for ex in itertools.islice(suite.training_examples(0, direct_heldout=False), 5000):
        assert ex.prompt.text not in other
        seen.add(ex.prompt.text)
    assert seen & direct


def test_taught_reasoning_teaches_questions_but_never_drawing_prompts(suite: Suite) -> None:
    """With ``taught_reasoning`` the test reasoning questions are trained on; their drawing prompts
    (and every other held-out prompt, and the injection names) still never occur."""
    from uniprobe.experiments.tasks.vocab import NEW_NAMES

    gen_prompts = {it.gen_prompt for it in suite.items}
    taught = {p.text for p, _ in suite.reasoning_questions}
    assert len(taught) == sum(it.category in ("arithmetic", "mapping") for it in suite.items)
    held = {(it.question, it.question_images) for it in suite.items if not it.labels.get("taught")}
    seen_taught = set()
    for ex in itertools.islice(suite.training_examples(0, taught_reasoning=0.3, mix="taught"), 5000):
        for p in [ex.prompt] + [p for p, _ in ex.prefix]:
            assert p.text not in gen_prompts
            assert (p.text, p.images) not in held
            assert not set(p.text.split()) & set(NEW_NAMES)
            if p.text in taught:
                seen_taught.add(p.text)
    assert len(seen_taught) > 0.9 * len(taught)
