"""Held-out reasoning (issue 18): with ``taught_reasoning=0`` no test expression or rule set occurs in
training, and the gap table's rows say which items are held out (from the checkpoint's recipe)."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from uniprobe.experiments.sandbox import build_model, load_sandbox, save_sandbox
from uniprobe.experiments.sandbox.checkpoint import SHIPPED
from uniprobe.experiments.sandbox.evaluate import evaluate_items, format_gap_table, gap_table
from uniprobe.experiments.tasks import Suite
from uniprobe.experiments.tasks.generators import evaluate_expression as gen_value
from uniprobe.experiments.tasks.suite import held_out_categories, rule_set
from uniprobe.hooks.errors import UsageError

TINY = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
}


@pytest.fixture(scope="module")
def suite() -> Suite:
    return Suite(0)


def stream_texts(suite: Suite, n: int, **data) -> list[str]:
    """The text of every prompt (context QA pairs included) of the first ``n`` training examples."""
    texts = []
    for ex in itertools.islice(suite.training_examples(0, **data), n):
        texts += [ex.prompt.text] + [p.text for p, _ in ex.prefix]
    return texts


def reasoning_parts(text: str) -> tuple[str | None, frozenset | None]:
    """``(expression, rule set)`` of a prompt: the expression of "what is E ?" / "draw as many X as E",
    the statements before " ; " (mapping)."""
    if " ; " in text:
        return None, rule_set(text.split(" ; ")[0])
    if text.startswith("what is ") and text.endswith(" ?"):
        expr = text[len("what is ") : -2]
        return (expr, None) if expr[0].isdigit() else (None, None)
    if " as " in text:
        return text.rsplit(" as ", 1)[1], None
    return None, None


def held_out_sets(suite: Suite) -> tuple[set[str], set[frozenset]]:
    exprs = {it.labels["expr"] for it in suite.items if it.category == "arithmetic"}
    rules = {rule_set(it.question.split(" ; ")[0]) for it in suite.items if it.category == "mapping"}
    return exprs, rules


def test_untaught_stream_never_shows_a_held_out_expression_or_rule_set(suite: Suite) -> None:
    exprs, rules = held_out_sets(suite)
    assert len(exprs) == 16 + 40 + 40 and len(rules) == 60
    texts = stream_texts(suite, 6000, taught_reasoning=0, mix="reasoning_heavy", prefix_p=0.3)
    seen_exprs, seen_rules = set(), set()
    for t in texts:
        e, r = reasoning_parts(t)
        seen_exprs |= {e} - {None}
        seen_rules |= {r} - {None}
        assert "draw as many" not in t, t  # no reasoning drawing prompt is ever trained
    assert len(seen_exprs) > 1000 and len(seen_rules) > 500  # the check below is not vacuous
    assert not seen_exprs & exprs, sorted(seen_exprs & exprs)[:5]
    assert not seen_rules & rules
    # the taught recipe does show them (so the extraction above finds them when present)
    taught = {reasoning_parts(t)[0] for t in stream_texts(suite, 3000, taught_reasoning=0.3)}
    assert taught & exprs


def test_wide_level_1_questions_add_digit_values_never_a_test_expression(suite: Suite) -> None:
    exprs, _ = held_out_sets(suite)
    texts = stream_texts(suite, 6000, taught_reasoning=0, mix="reasoning_wide", wide_level1=True)
    level1 = {e for e in (reasoning_parts(t)[0] for t in texts) if e is not None and len(e.split()) == 3}
    assert not level1 & exprs, sorted(level1 & exprs)[:5]
    values = {int(gen_value(e)) for e in level1}
    assert values == set(range(10))  # values 0 and 6-9 too, only as questions
    assert len(level1) > 100  # more facts per operator than the 68 drawable training expressions
    assert {e for e, _ in suite.arith_train[1]} <= {e for e, _ in suite.arith_wide1}


def test_mapping_warmup_opens_the_stream_with_mapping_questions_of_growing_hops(suite: Suite) -> None:
    _, rules = held_out_sets(suite)
    first = list(itertools.islice(suite.training_examples(0, taught_reasoning=0, mapping_warmup=300), 300))
    hops = [len(rule_set(ex.prompt.text.split(" ; ")[0])) // 2 for ex in first]
    assert all(ex.answer is not None and not ex.prefix for ex in first)
    assert max(hops[:100]) == 1 and max(hops[100:200]) == 2 and max(hops[200:]) == 3
    assert not {reasoning_parts(ex.prompt.text)[1] for ex in first} & rules
    stream = suite.training_examples(0, taught_reasoning=0, mapping_warmup=300)
    after = list(itertools.islice(stream, 300, 500))  # then the mix resumes: drawings and other questions
    assert any(ex.target is not None for ex in after)
    assert any(ex.answer is not None and " ; what is " not in ex.prompt.text for ex in after)


def test_mapping_warmup_can_give_one_hop_a_longer_share(suite: Suite) -> None:
    from uniprobe.experiments.tasks.suite import warmup_hops

    stream = suite.training_examples(0, taught_reasoning=0, mapping_warmup=300, mapping_one_hop=0.5)
    hops = [len(rule_set(ex.prompt.text.split(" ; ")[0])) // 2 for ex in itertools.islice(stream, 300)]
    assert max(hops[:150]) == 1 and max(hops[150:225]) == 2 and max(hops[225:]) == 3
    assert [warmup_hops(i, 300) for i in range(300)] == [1 + 3 * i // 300 for i in range(300)]  # thirds
    with pytest.raises(ValueError, match="between 0 and 1"):
        warmup_hops(0, 10, 1.5)


def test_arith_warmup_opens_the_stream_with_held_out_safe_arithmetic_of_every_level(suite: Suite) -> None:
    exprs, _ = held_out_sets(suite)
    first = list(itertools.islice(suite.training_examples(0, taught_reasoning=0, arith_warmup=300), 300))
    assert all(ex.answer is not None and not ex.prefix for ex in first)
    parsed = [reasoning_parts(ex.prompt.text)[0] for ex in first]
    assert None not in parsed and not set(parsed) & exprs
    assert all(int(gen_value(e)) == int(ex.answer) for e, ex in zip(parsed, first, strict=True))
    assert {len(e.split()) // 2 for e in parsed} == {1, 2, 3}  # levels 1-3 in turn
    wide = [reasoning_parts(ex.prompt.text)[0] for ex in itertools.islice(
        suite.training_examples(0, taught_reasoning=0, arith_warmup=300, wide_level1=True), 300)]  # fmt: skip
    assert max(int(gen_value(e)) for e in wide if len(e.split()) == 3) > 5  # level 1 over 0-9
    stream = suite.training_examples(0, taught_reasoning=0, arith_warmup=300, mapping_warmup=30)
    after = list(itertools.islice(stream, 300, 330))  # then the mapping warm-up, then the mix
    assert all(" ; what is " in ex.prompt.text for ex in after)


def test_distractor_chains_never_hold_a_test_rule_set_and_keep_the_answer_right(suite: Suite) -> None:
    _, rules = held_out_sets(suite)
    stream = suite.training_examples(0, taught_reasoning=0, mapping_warmup=600, mapping_chains=4)
    first = list(itertools.islice(stream, 600))
    chains_by_hops: dict[int, set[int]] = {}
    for ex in first:
        statements, question = ex.prompt.text.split(" ; what is ")
        parts = [p.strip() for p in statements.split(",")]
        heads = [p for p in parts if p.split(" = ")[1].isdigit()]  # one numeric statement per chain
        chains_by_hops.setdefault(len(parts) // len(heads), set()).add(len(heads))
        held = rule_set(statements)
        assert not any(t <= held for t in rules), statements  # no test rule set among its statements
        value = {p.split(" = ")[0]: p.split(" = ")[1] for p in parts}
        sym = question.removesuffix(" ?")
        while not sym.isdigit():  # follow the chain to the number
            sym = value[sym]
        assert sym == ex.answer
    assert chains_by_hops == {1: {4}, 2: {4}, 3: {3}}  # as many chains as the 10 symbols allow
    # two chains (the default) is the stream it always was
    plain = itertools.islice(suite.training_examples(0, taught_reasoning=0, mapping_warmup=50), 50)
    same = itertools.islice(
        suite.training_examples(0, taught_reasoning=0, mapping_warmup=50, mapping_chains=2), 50
    )
    assert [e.prompt.text for e in plain] == [e.prompt.text for e in same]


def test_random_mapping_refuses_more_chains_than_symbols_or_values() -> None:
    import random

    from uniprobe.experiments.tasks.generators import random_mapping

    assert len(random_mapping(random.Random(0), 2, chains=5).ends) == 5
    with pytest.raises(ValueError, match="use 2 to 3 chains"):
        random_mapping(random.Random(0), 3, chains=4)
    with pytest.raises(ValueError, match="values"):
        random_mapping(random.Random(0), 1, chains=6)


def test_rule_sets_are_held_out_in_either_chain_order(suite: Suite) -> None:
    statements = next(iter(suite.mapping_test_statements))
    parts = statements.split(" , ")
    assert rule_set(" , ".join(reversed(parts))) in suite.mapping_test_rule_sets


def test_held_out_categories_follow_the_recipe() -> None:
    untaught = {"suite_seed": 0, "data": {"taught_reasoning": 0, "direct_heldout": True}}
    assert held_out_categories(untaught) == {"arithmetic", "mapping", "direct"}
    taught = {"suite_seed": 0, "data": {"taught_reasoning": 0.2, "direct_heldout": False}}
    assert held_out_categories(taught) == set()
    assert held_out_categories(None) == set()  # unknown recipe: nothing claimed
    assert held_out_categories(untaught, suite_seed=1) == set()  # another suite's splits
    # a continued checkpoint holds out only what every stage held out
    again = {**untaught, "init": {"path": "x", "training": untaught}}
    assert held_out_categories(again) == held_out_categories(untaught)
    assert held_out_categories({**untaught, "init": {"path": "x", "training": taught}}) == set()
    assert held_out_categories({**untaught, "init": {"path": "x", "training": None}}) == set()
    stages = {**untaught, "init": {"path": "y", "training": {**untaught, "init": {"training": taught}}}}
    assert held_out_categories(stages) == set()
    # sandbox-mot: understanding from its warm start (init), drawing from its generation stream
    mot = {
        **untaught,
        "init": {"path": "q", "training": untaught},
        "generation_data": {"direct_heldout": False},
    }
    assert held_out_categories(mot) == {"arithmetic", "mapping"}
    assert held_out_categories({**mot, "init": {"path": "q", "training": taught}}) == set()


def test_gap_rows_say_held_out_and_training_json_round_trips(suite: Suite, tmp_path) -> None:
    torch.manual_seed(0)
    m = build_model("ar", backbone=TINY).eval()
    recipe = {"arch": "ar", "seed": 0, "suite_seed": 0, "steps": 1, "data": {"taught_reasoning": 0.0}}
    save_sandbox(m, tmp_path, training=recipe)
    assert "training.json" in (tmp_path / "SHA256SUMS").read_text()
    m2 = load_sandbox(tmp_path, verify=True)
    assert m2.training_recipe == json.loads(json.dumps(recipe))
    items = [it for it in suite.items if it.category in ("arithmetic", "knowledge_forward")][::20]
    rows = gap_table(m2, results=evaluate_items(m2, items, cot=False, progress=False))
    assert {r["category"]: r["held_out"] for r in rows} == {"arithmetic": True, "knowledge_forward": False}
    assert "Held out (these items occur nowhere in training): arithmetic." in format_gap_table(rows)


# every shipped model holds the test reasoning out (issue 18: staged chains; sandbox-mot's
# understanding expert is sandbox-query's); the query models train on the direct test drawings (their
# parallel decoder does not compose held-out (count, object) pairs)
SHIPPED_HELD_OUT = {
    "sandbox-ar": {"arithmetic", "mapping", "direct"},
    "sandbox-query": {"arithmetic", "mapping"},
    "sandbox-mot": {"arithmetic", "mapping"},
}


@pytest.mark.parametrize("name", list(SHIPPED))
def test_shipped_checkpoints_say_which_rows_are_held_out(name: str) -> None:
    m = load_sandbox(name, verify=True)
    assert held_out_categories(m.training_recipe) == SHIPPED_HELD_OUT[name]
    assert m.training_recipe["data"]["taught_reasoning"] == 0


def test_a_recipe_trial_logs_held_out_scores_per_level(tmp_path) -> None:
    from uniprobe.experiments.sandbox.trials import format_trials, run_trial

    log = tmp_path / "trials.jsonl"
    rec = run_trial(
        "tiny", "ar", 1, {"taught_reasoning": 0, "mix": "arith_heavy"}, log, out=tmp_path / "ck", threads=1,
        backbone={**TINY}, warmup=1,
    )  # fmt: skip
    assert json.loads(log.read_text().splitlines()[-1]) == rec
    assert (
        rec["steps_done"] == 1 and rec["data"]["mix"] == "arith_heavy" and rec["data"]["gen_fraction"] == 0.22
    )
    levels = [f"{t} L{k}" for t in ("arith", "mapping") for k in (1, 2, 3)]
    direct = {"draw count", "und count", "draw portrait", "und portrait"}
    assert set(rec["scores"]) == set(levels) | {f"draw {k}" for k in levels} | direct
    assert all(0.0 <= v <= 1.0 for v in rec["scores"].values())
    assert json.loads((tmp_path / "ck" / "training.json").read_text())["data"]["taught_reasoning"] == 0
    row = format_trials(log).splitlines()[2]
    assert row.startswith("| tiny | arith_heavy | 1 | 64 | ") and row.count("%") == 12
    # a staged recipe: a second trial continues the first one's checkpoint
    more = run_trial(
        "tiny-more", "ar", 1, {"taught_reasoning": 0}, log, out=tmp_path / "ck2", threads=1,
        init=tmp_path / "ck",
    )  # fmt: skip
    assert more["init"] == str(tmp_path / "ck")
    continued = load_sandbox(tmp_path / "ck2")
    assert continued.training_recipe["init"]["training"]["data"]["mix"] == "arith_heavy"
    assert held_out_categories(continued.training_recipe) >= {"arithmetic", "mapping"}
    a, b = load_sandbox(tmp_path / "ck").state_dict(), continued.state_dict()
    assert all((a[k] - b[k]).abs().max() < 1e-3 for k in a)  # from the saved weights (one warm-up step)
    row = format_trials(log).splitlines()[3]
    assert row.startswith(f"| tiny-more | count_heavier, continuing `{tmp_path / 'ck'}` |")
    from uniprobe.experiments.sandbox.train import train_sandbox

    # DEFAULTS' one-stage recipe teaches the test reasoning questions: its checkpoint is not a start
    train_sandbox("ar", tmp_path / "taught", steps=1, backbone={**TINY}, threads=1, progress=False)
    with pytest.raises(UsageError, match="holds the test questions out"):
        run_trial("x", "ar", 1, {}, log, init=tmp_path / "taught", threads=1)
    with pytest.raises(UsageError, match="not sandbox-query"):
        run_trial("x", "query", 1, {}, log, init=tmp_path / "ck", threads=1)
    from uniprobe.experiments.sandbox.trials import mix_cell

    data = {"mix": "reasoning_wide", "wide_level1": True, "mapping_warmup": 100, "reasoning_draw": 0.15}
    want = "reasoning_wide + level 1 over 0-9 + 100 mapping questions first + 15% level-1 drawings"
    assert mix_cell(data) == want
    data = {"mix": "reasoning_wide", "arith_warmup": 640}
    want = "reasoning_wide + 640 arithmetic questions first"
    assert mix_cell(data) == want
    data = {"mix": "reasoning_wide", "mapping_warmup": 90, "mapping_one_hop": 0.5, "mapping_chains": 4}
    want = "reasoning_wide + 90 mapping questions first (50% one hop) + 4 chains per mapping question"
    assert mix_cell(data) == want
    data = {"mix": "reasoning_wide", "arith_warmup": 640, "arith_levels": [0, 1, 1]}
    assert mix_cell(data) == "reasoning_wide + 640 arithmetic questions first (levels 1-3 at 0:1:1)"
    data = {"mix": "reasoning_wide", "mapping_warmup": 90, "mapping_rehearse_arith": 0.25}
    want = "reasoning_wide + 90 mapping questions first (25% more as arithmetic)"
    assert mix_cell(data) == want
    data["mapping_rehearse_mix"] = 0.3
    assert mix_cell(data).endswith("(25% more as arithmetic) (30% more as the mix)")
    assert mix_cell({"mix": "m", "reasoning_draw": 0.15, "reasoning_draw_levels": [1, 2]}) == (
        "m + 15% level-1/2 drawings"
    )
    assert mix_cell({"mix": "count_heavier", "portrait_share": 0.5}) == (
        "count_heavier + 50% of direct drawings portraits"
    )


def test_arith_levels_weight_the_levels_of_the_arithmetic_warmup(suite: Suite) -> None:
    def levels(**kw) -> list[int]:
        stream = suite.training_examples(0, taught_reasoning=0, arith_warmup=600, wide_level1=True, **kw)
        return [len(reasoning_parts(ex.prompt.text)[0].split()) // 2 for ex in itertools.islice(stream, 600)]

    assert levels() == [1 + i % 3 for i in range(600)]  # the default: in turn, as before
    none = levels(arith_levels=(0, 1, 1))
    assert 1 not in none and 250 < none.count(2) < 350  # no level-1 question at all
    rare = levels(arith_levels=[1, 4, 4])
    assert 40 < rare.count(1) < 100 and set(rare) == {1, 2, 3}
    assert levels(arith_levels=(0, 1, 1)) == none  # deterministic
    for bad in ((1, 1), (-1, 1, 1), (0, 0, 0)):
        with pytest.raises(ValueError, match="arith_levels takes three non-negative weights"):
            levels(arith_levels=bad)


def test_level1_misses_ask_each_held_out_expression_as_is_and_with_plus_zero(suite: Suite) -> None:
    from uniprobe.experiments.sandbox.trials import level1_misses

    class Computes:  # right on every level-2 form, wrong on the level-1 form of subtractions
        def understand(self, questions):
            out = []
            for q in questions:
                expr = q[len("what is ") : -2]
                wrong = " + 0" not in expr and " - " in expr
                out.append("0" if wrong else str(int(gen_value(expr))) if "*" not in expr else "7")
            return out

    misses = level1_misses(Computes(), suite)
    subtractions = [e for e, _ in suite.arith_test[1] if " - " in e and gen_value(e) != 0]
    assert [e for e, _ in misses["as level 1"]] == [e for e, _ in suite.arith_test[1] if e in subtractions
                                                    or "*" in e]  # fmt: skip
    assert [e for e, _ in misses["with + 0"]] == [e for e, _ in suite.arith_test[1] if "*" in e]


def test_portrait_misses_name_the_attribute_drawn_wrong_and_a_recalled_character(suite: Suite) -> None:
    from uniprobe.experiments.sandbox.trials import portrait_misses
    from uniprobe.experiments.tasks import world
    from uniprobe.experiments.tasks.suite import portrait_words

    character = suite.characters[0]
    asked = {f"draw a portrait of {portrait_words(a)}": a for a in suite.portrait_test}
    other = next(h for h in world.HAIRS if h != suite.portrait_test[1]["hair"])

    class Draws:  # item 0: a taught character; item 1: other hair and a stray tile; the rest right
        def generate_image(self, prompts, cot=False):
            assert not cot
            grids = [world.portrait_grid(asked[p]) for p in prompts]
            grids[0] = world.portrait_grid(character.attrs)
            grids[1] = world.portrait_grid({**suite.portrait_test[1], "hair": other})
            grids[1].reshape(-1)[-1] = world.object_tile("cup", "red")
            return grids

    out = portrait_misses(Draws(), suite)
    n = len(suite.portrait_test)
    assert (out["right"], out["n"]) == (n - 2, n)
    first, second = out["misses"]
    assert first["character"] == character.name and first["extra tiles"] == 0
    assert first["wrong"] == [k for k in world.ATTRIBUTES if character.attrs[k] != suite.portrait_test[0][k]]
    assert (second["wrong"], second["extra tiles"], second["character"]) == (["hair"], 1, None)
    assert second["drawn"]["hair"] == other
    for attr, share in out["attributes right"].items():
        wrong = (attr in first["wrong"]) + (attr == "hair")
        assert share == (n - wrong) / n, attr


def test_training_portraits_come_from_the_training_split(suite: Suite) -> None:
    from uniprobe.experiments.sandbox.trials import training_portraits

    drawn = training_portraits(suite, 40, seed=3)
    assert len(drawn) == 40 and drawn == training_portraits(suite, 40, seed=3)
    assert not {tuple(a.values()) for a in drawn} & suite.portrait_held


def test_latent_cot_variant_draws_level_1_training_expressions_only(suite: Suite) -> None:
    from uniprobe.experiments.tasks import world

    exprs, _ = held_out_sets(suite)
    train_l1 = dict(suite.arith_train[1])
    drawn = 0
    for ex in itertools.islice(suite.training_examples(0, reasoning_draw=0.5, gen_fraction=0.5), 2000):
        if ex.target is not None and " as " in ex.prompt.text:
            expr = ex.prompt.text.rsplit(" as ", 1)[1]
            assert expr in train_l1 and expr not in exprs, expr  # level 1, training split
            grid = world.decode(ex.target)
            assert int((grid != world.EMPTY).sum()) == train_l1[expr]  # draws the expression's value
            drawn += 1
    assert drawn > 300

    def texts(**kw) -> list[str]:
        return [
            ex.prompt.text
            for ex in itertools.islice(suite.training_examples(0, reasoning_draw=0.5, **kw), 500)
        ]

    assert texts(reasoning_draw_levels=(1,)) == texts()  # naming level 1 keeps the stream
    # levels 1 and 2: both levels' training expressions drawn, never a test expression nor level 3
    train = {lv: dict(suite.arith_train[lv]) for lv in (1, 2, 3)}
    seen = {1: 0, 2: 0}
    stream = suite.training_examples(0, reasoning_draw=0.5, gen_fraction=0.5, reasoning_draw_levels=(1, 2))
    for ex in itertools.islice(stream, 3000):
        if ex.target is not None and " as " in ex.prompt.text:
            expr = ex.prompt.text.rsplit(" as ", 1)[1]
            level = len(expr.split()) // 2
            assert level in (1, 2) and expr in train[level] and expr not in exprs, expr
            assert int((world.decode(ex.target) != world.EMPTY).sum()) == train[level][expr]
            seen[level] += 1
    assert min(seen.values()) > 150 and 0.8 < seen[1] / seen[2] < 1.25
    with pytest.raises(ValueError, match="reasoning_draw_levels"):
        next(suite.training_examples(0, reasoning_draw=0.5, reasoning_draw_levels=(1, 4)))
    plain = [ex.prompt.text for ex in itertools.islice(suite.training_examples(0), 300)]
    zero = [ex.prompt.text for ex in itertools.islice(suite.training_examples(0, reasoning_draw=0.0), 300)]
    assert plain == zero and not any("draw as many" in t for t in plain)


def test_portrait_share_sets_the_share_of_portraits_among_direct_drawings(suite: Suite) -> None:
    def portraits(**kw) -> tuple[list[str], float]:
        stream = suite.training_examples(0, gen_fraction=1.0, prefix_p=0.0, **kw)
        drawn = [ex.prompt.text for ex in itertools.islice(stream, 4000)]
        return drawn, sum(t.startswith("draw a portrait of ") for t in drawn) / len(drawn)

    default, share = portraits()
    assert 0.22 < share < 0.28
    assert portraits(portrait_share=0.25)[0] == default  # the shipped models' stream, unchanged
    drawn, share = portraits(portrait_share=0.5)
    assert 0.47 < share < 0.53
    assert not set(drawn) & {p for p, _ in suite.test_prompts}  # the held-out portraits stay out
    assert portraits(portrait_share=1.0)[1] == 1.0 and portraits(portrait_share=0.0)[1] == 0.0
    with pytest.raises(ValueError, match="portrait_share"):
        next(suite.training_examples(0, portrait_share=1.5))


def test_mapping_warmup_can_rehearse_arithmetic(suite: Suite) -> None:
    exprs, rules = held_out_sets(suite)
    stream = suite.training_examples(0, taught_reasoning=0, mapping_warmup=400, mapping_rehearse_arith=0.3)
    mixed = list(itertools.islice(stream, 2000))
    is_map = [" ; what is " in ex.prompt.text for ex in mixed]
    end = [i for i, m in enumerate(is_map) if m][399]  # the warm-up's 400th mapping question
    warm = mixed[: end + 1]
    assert all(ex.answer is not None and not ex.prefix for ex in warm)  # questions alone, as in any warm-up
    maps = [ex for ex in warm if " ; what is " in ex.prompt.text]
    arith = [reasoning_parts(ex.prompt.text)[0] for ex in warm if " ; what is " not in ex.prompt.text]
    assert 0.24 < len(arith) / len(warm) < 0.36
    assert None not in arith and not set(arith) & exprs and {len(e.split()) // 2 for e in arith} == {1, 2, 3}
    assert not {reasoning_parts(ex.prompt.text)[1] for ex in maps} & rules
    hops = [len(rule_set(ex.prompt.text.split(" ; ")[0])) // 2 for ex in maps]
    assert max(hops[:133]) == 1 and max(hops[134:266]) == 2 and max(hops[267:]) == 3  # the same curriculum
    levels = suite.training_examples(0, taught_reasoning=0, mapping_warmup=400, mapping_rehearse_arith=0.3,
                                     arith_levels=(0, 1, 1))  # fmt: skip
    lv = {len(reasoning_parts(ex.prompt.text)[0].split()) // 2
          for ex in itertools.islice(levels, 500) if " ; what is " not in ex.prompt.text}  # fmt: skip
    assert lv == {2, 3}
    for bad in ({"mapping_rehearse_arith": 1.0}, {"mapping_rehearse_mix": -0.1},
                {"mapping_rehearse_arith": 0.5, "mapping_rehearse_mix": 0.5}):  # fmt: skip
        with pytest.raises(ValueError, match="shares >= 0 summing below 1"):
            next(suite.training_examples(0, taught_reasoning=0, mapping_warmup=4, **bad))


def test_mapping_warmup_can_rehearse_the_whole_mix(suite: Suite) -> None:
    exprs, rules = held_out_sets(suite)
    stream = suite.training_examples(0, taught_reasoning=0, mix="reasoning_wide", mapping_warmup=600,
                                     mapping_rehearse_mix=0.3, mapping_rehearse_arith=0.1)  # fmt: skip
    examples = list(itertools.islice(stream, 3000))
    ends = [
        i for i, ex in enumerate(examples) if not ex.prefix and ex.answer and " ; what is " in ex.prompt.text
    ]
    warm = examples[: ends[599] + 1]  # up to the 600th bare mapping question (the mix's may come earlier)
    drawings = [ex for ex in warm if ex.target is not None]
    assert 0.3 < (len(warm) - 600) / len(warm) < 0.5 and drawings and any(ex.prefix for ex in warm)
    test = set(suite.test_prompts)
    for ex in warm:  # nothing held out, in the prompt or its context pairs
        assert (ex.prompt.text, ex.prompt.images) not in test
        for p, _ in ex.prefix:
            assert (p.text, p.images) not in test
            expr, statements = reasoning_parts(p.text)
            assert expr not in exprs and statements not in rules
        expr, statements = reasoning_parts(ex.prompt.text)
        assert expr not in exprs and statements not in rules


def test_arith_heavy_144_asks_levels_1_3_at_1_4_4_never_a_test_expression(suite: Suite) -> None:
    exprs, _ = held_out_sets(suite)
    texts = stream_texts(suite, 8000, taught_reasoning=0, mix="arith_heavy_144", wide_level1=True)
    asked = [e for e in (reasoning_parts(t)[0] for t in texts) if e is not None and " as " not in e]
    assert not set(asked) & exprs
    per_level = [sum(len(e.split()) // 2 == k for e in asked) for k in (1, 2, 3)]
    assert 3.2 < per_level[1] / per_level[0] < 4.8 and 3.2 < per_level[2] / per_level[0] < 4.8
