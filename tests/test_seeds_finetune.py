"""Knowledge injection and STARS: data streams, the self-judge filter, weight change, reports, end to end."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from uniprobe.experiments.sandbox.checkpoint import build_model
from uniprobe.experiments.seeds.inject import (
    InjectSettings,
    generation_stream,
    make_injection,
    run_inject,
    understanding_stream,
)
from uniprobe.experiments.seeds.inject_report import format_inject
from uniprobe.experiments.seeds.stars import (
    StarsSettings,
    run_stars,
    self_judge,
    self_training_prompts,
    weight_change,
)
from uniprobe.experiments.tasks import world
from uniprobe.experiments.tasks.suite import Suite
from uniprobe.experiments.tasks.vocab import NEW_NAMES


@pytest.fixture(scope="module")
def suite() -> Suite:
    return Suite(0)


def _names(text: str) -> set[str]:
    return set(text.split()) & set(NEW_NAMES)


def test_injection_items_and_streams_keep_directions_apart(suite: Suite) -> None:
    settings = InjectSettings(n_characters=6, n_inverse_test=8)
    inj = make_injection(suite, settings)
    assert [c.name for c in inj.characters] == list(NEW_NAMES[:6])
    held = {tuple(c.attrs.values()) for c in inj.characters}
    assert not held & {tuple(c.attrs.values()) for c in suite.characters}
    inverse_test = [it for it in inj.items if it.category == "knowledge_inverse"]
    assert len(inverse_test) == 8
    gen_prompts = {it.gen_prompt for it in inj.items}
    test_inverse_q = {it.question for it in inverse_test}
    new_facts = 0
    for ex in itertools.islice(understanding_stream(suite, inj, "ar", settings), 600):
        assert ex.target is None and not ex.prompt.images  # text QA only, no image in or out
        assert not any(p.images for p, _ in ex.prefix)
        assert ex.prompt.text not in test_inverse_q and ex.prompt.text not in gen_prompts
        new_facts += bool(_names(ex.prompt.text))
    assert 200 < new_facts < 400  # about half replay (settings.replay = 0.5)
    forward_prompts = {it.gen_prompt for it in inj.items if it.category == "knowledge_forward"}
    seen = set()
    for ex in itertools.islice(generation_stream(suite, inj, "ar", settings), 600):
        assert ex.target is not None and ex.answer is None  # drawing only
        if _names(ex.prompt.text):
            assert ex.prompt.text in forward_prompts  # never an inverse prompt, never a question
            seen.add(ex.prompt.text)
    assert seen == forward_prompts


def test_pretraining_stream_never_shows_new_names(suite: Suite) -> None:
    for ex in itertools.islice(suite.training_examples(0), 3000):
        assert not _names(ex.prompt.text)


def test_weight_change_is_per_layer_and_part() -> None:
    torch.manual_seed(0)
    a = build_model("ar")
    b = build_model("ar")
    b.load_state_dict(a.state_dict())
    assert all(r["relative_change"] == 0 for r in weight_change(a, b))
    w = b.lm.model.layers[1].mlp.down_proj.weight
    with torch.no_grad():
        w.add_(0.5 * w)  # only layer 1's MLP moves
    rows = {(r["layer"], r["part"]): r["relative_change"] for r in weight_change(a, b)}
    norm = sum(float(p.detach().pow(2).sum()) for p in a.lm.model.layers[1].mlp.parameters()) ** 0.5
    expected = float((0.5 * w / 1.5).norm()) / norm
    assert rows[(1, "mlp")] == pytest.approx(expected, rel=1e-5)
    assert all(v == 0 for k, v in rows.items() if k != (1, "mlp"))


class _ScriptedModel:
    """Draws the exact target for the first half of the items and an empty grid otherwise; answers every
    arithmetic question right and counts what its image shows — so its judgement is exact."""

    arch = "ar"

    def __init__(self, items):
        self.items = {it.gen_prompt: it for it in items}
        self.expr = {it.question: it.answer for it in items}

    def generate_image(self, prompts, cot=False, batch_size=64):
        out = []
        for k, p in enumerate(prompts):
            it = self.items[p.text]
            out.append(it.target_grid if k % 2 == 0 else np.zeros_like(it.target_grid))
        return out

    def understand(self, prompts, batch_size=64):
        out = []
        for p in prompts:
            if p.images:
                grid = np.array(p.images[0])
                out.append(str(int((grid != world.EMPTY).sum())))
            else:
                out.append(self.expr[p.text])
        return out


def test_self_judge_keeps_what_the_model_accepts(suite: Suite) -> None:
    items = self_training_prompts(suite, StarsSettings(prompts_per_level=6))
    test_exprs = {it.labels["expr"] for it in suite.items if it.category == "arithmetic"}
    assert not {it.labels["expr"] for it in items} & test_exprs  # training split only
    kept, stats = self_judge(_ScriptedModel(items), items)
    assert len(kept) == sum(s["kept"] for s in stats.values()) == 9  # the even-indexed half
    assert all(s["kept_right"] == s["kept"] for s in stats.values())  # an exact judge keeps only right ones
    assert all(ex.target is not None and "as many" in ex.prompt.text for ex in kept)  # no CoT in the prompt


def test_format_inject_states_the_numbers() -> None:
    def m(u, g, gc):
        kinds = ("knowledge (forward)", "knowledge (inverse)")
        summary = {k: {"understanding": u, "generation": g, "generation_cot": gc, "n": 4} for k in kinds}
        original = {"knowledge_understanding": u, "direct_understanding": 0.9, "direct_generation": 1.0}
        return {"summary": summary, "original": original}

    result = {
        "model_arch": "ar",
        "settings": {"steps": 10, "batch_size": 8, "lr": 1e-3, "replay": 0.5},
        "characters": [{"name": "quinn"}],
        "before": m(0.0, 0.0, 0.0),
        "understanding": {"after": m(1.0, 0.125, 0.875)},
        "generation": {"after": m(0.25, 1.0, 0.5)},
    }
    md = format_inject(result)
    assert "answers 100% of questions" in md and "12% of the time without CoT and 88% with CoT" in md
    assert "does not transfer to generation without an explicit reasoning step" in md
    assert "draws the trained forward prompts 100%" in md and "same facts 25%" in md


@pytest.mark.slow
def test_inject_and_stars_end_to_end_on_an_untrained_model(tmp_path, suite: Suite) -> None:
    torch.manual_seed(0)
    model = build_model("ar").eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    settings = InjectSettings(n_characters=4, n_inverse_test=4, steps=2, batch_size=4, patch_pairs=1)
    res = run_inject(model, tmp_path / "inject", settings, suite=suite, progress=False)
    for name in ("inject.json", "inject.md", "inject-accuracy.png", "probe-after.png", "patch-before.png"):
        assert (tmp_path / "inject" / name).exists()
    assert set(res["maps"]) == {"before", "after"} and res["understanding"]["after"]["summary"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the input never changes


@pytest.mark.slow
def test_stars_end_to_end_on_the_shipped_model(tmp_path, suite: Suite) -> None:
    from uniprobe.experiments.sandbox.checkpoint import load_sandbox

    model = load_sandbox("sandbox-ar")
    settings = StarsSettings(prompts_per_level=8, steps=3, batch_size=8, maps=False)
    res = run_stars(model, tmp_path, settings, suite=suite, progress=False)
    assert sum(f["kept"] for f in res["filter"].values()) > 0
    assert set(res["before"]) == set(res["after"]) == {"1", "2", "3"}
    assert any(r["relative_change"] > 0 for r in res["weight_change"])
    assert (tmp_path / "stars.md").read_text().startswith("### STARS")
    assert (tmp_path / "stars.png").exists()


def test_report_html_renders_tables_and_figures(tmp_path) -> None:
    from uniprobe.experiments.report_html import write_html

    md = "# t\n\n| a | b |\n| --- | ---: |\n| 1 | 2 |\n\n![fig](x.png) <b>&\n"
    page = write_html(md, tmp_path / "r.html", title="t & u").read_text()
    assert "<table>" in page and "<td>1</td>" in page and 'src="x.png"' in page
    assert "<title>t &amp; u</title>" in page


def test_replay_draws_the_models_own_mix_and_never_teaches_what_it_held_out(suite: Suite) -> None:
    """STARS and injection replay ``replay_data``: DEFAULTS' recipes' mixes unchanged; a staged
    model's last-stage mix without its warm-ups, so its held-out test questions stay out of the replay
    (the query and MoT models train on the direct test drawings: their direct items are not held out)."""
    import json

    from uniprobe.experiments.sandbox.checkpoint import SHIPPED
    from uniprobe.experiments.sandbox.train import DEFAULTS, WARMUP_KEYS, replay_data
    from uniprobe.experiments.tasks.suite import held_out_categories

    settings = InjectSettings(n_characters=6, n_inverse_test=8)
    inj = make_injection(suite, settings)
    reasoning = {it.question for it in suite.items if it.category in ("arithmetic", "mapping")}
    direct_prompts = {(it.gen_prompt, ()) for it in suite.items if it.category == "direct"}
    for name, path in SHIPPED.items():  # every shipped model holds reasoning out (staged chains)
        arch = name.removeprefix("sandbox-")
        assert replay_data(arch, None) == DEFAULTS[arch]["data"]
        recipe = json.loads(
            (path / "training.json").read_text()
        )  # the chain's last stage's (mot: its source's)
        data = replay_data(arch, recipe)
        assert (
            data["taught_reasoning"] == 0
            and data["mix"] == "arith_heavy_144"
            and not set(data) & set(WARMUP_KEYS)
        )
        assert held_out_categories({"suite_seed": 0, "data": data}) >= held_out_categories(recipe)
        trained_direct = set() if data.get("direct_heldout", True) else direct_prompts
        for make in (understanding_stream, generation_stream):
            for ex in itertools.islice(make(suite, inj, arch, settings, recipe), 1000):
                assert (ex.prompt.text, tuple(ex.prompt.images)) not in set(
                    suite.test_prompts
                ) - trained_direct
                assert ex.prompt.text not in reasoning
    # the control: DEFAULTS' AR recipe (sandbox-ar's before issue 18) teaches the test reasoning
    # questions, and its replay shows them
    taught = itertools.islice(understanding_stream(suite, inj, "ar", settings, None), 1500)
    assert any(ex.prompt.text in reasoning for ex in taught)
