"""The sweep config's schema: which analyses exist and the keys (checker, default) of each section,
of a model entry, a task entry and the top level. :mod:`~uniprobe.experiments.sweep.config` validates
a YAML file against these tables."""

from __future__ import annotations

from typing import Any

from uniprobe.experiments.sweep.schema import (
    REQUIRED,
    ConfigError,
    anything,
    boolean,
    choice,
    integer,
    list_of,
    mapping,
    number,
    optional,
    reduce_value,
    section,
    string,
    token_spec,
)
from uniprobe.experiments.tasks.prompts import CATEGORIES
from uniprobe.hooks.dtypes import DTYPES as DTYPE_MAP
from uniprobe.hooks.layout import ROLES
from uniprobe.probes.patching.sites import HEAD_KINDS, KINDS

ANALYSES: tuple[str, ...] = (
    "capture", "probe", "lens", "patch", "attention", "knockout", "steer", "gapeval", "r3",
)  # fmt: skip
NEEDS_STORE: tuple[str, ...] = ("probe", "lens")  # read the run's captured store
SANDBOX_ONLY: tuple[str, ...] = ("gapeval", "r3")  # judge drawings with the sandbox's exact judge
FORMS: tuple[str, ...] = ("understanding", "generation")
DTYPES: tuple[str, ...] = tuple(DTYPE_MAP)  # the names uniprobe.hooks.dtypes maps
DISTRIBUTE: tuple[str, ...] = ("auto", "examples", "runs")


def _role_selection(value: Any, path: str) -> str:
    """A role name, or roles read together joined with ``+`` (``query+image_gen``)."""
    for part in string(value, path).split("+"):
        choice(ROLES)(part, path)
    return value


def _answers(value: Any, path: str) -> str | list:
    """``label:KEY`` (each example's own answer, from its label) or a list of tokens: words (``3`` is
    the word 3) or ``id:N`` (:func:`~uniprobe.experiments.sweep.schema.token_spec`)."""
    if isinstance(value, str):
        if not value.startswith("label:") or value == "label:":
            raise ConfigError(
                f"{path}: {value!r} is not 'label:KEY' (answers from a label) nor a list of answer tokens"
            )
        return value
    return list_of(token_spec)(value, path)


def _selection(value: Any, path: str) -> list:
    """Role names, or positions (ints; negative counts from the end), not mixed."""
    items = value if isinstance(value, list) else [value]
    if not items or not (all(isinstance(x, str) for x in items) or all(type(x) is int for x in items)):
        raise ConfigError(f"{path}: expected role names or positions (not mixed), got {value!r}")
    return [choice(ROLES)(x, path) if isinstance(x, str) else x for x in items]


def _groups(value: Any, path: str) -> dict:
    """Key groups of a knockout: ``{name: roles or positions}``."""
    groups = mapping(value, path)
    if not groups:
        raise ConfigError(f"{path}: name at least one key group, e.g. {{question: [text], bos: [0]}}")
    return {str(k): _selection(v, f"{path}.{k}") for k, v in groups.items()}


def _pair(value: Any, path: str) -> dict:
    keys = ("clean", "corrupted")
    spec = {k: (lambda v, p: str(v) if isinstance(v, int) else string(v, p), REQUIRED) for k in keys}
    spec.update({k: (token_spec, REQUIRED) for k in ("target", "foil")})
    return section(spec, value, path)


MODEL = {
    "path": (string, REQUIRED),
    "name": (optional(string), None),
    "adapter": (optional(string), None),
    "loader": (optional(string), None),
    "device_map": (anything, None),
    "dtype": (optional(choice(DTYPES)), None),
    "load_options": (optional(mapping), None),
}
SECTIONS: dict[str, dict[str, tuple]] = {
    "capture": {
        "points": (list_of(string, scalar_ok=True), ["blocks.*.resid_post"]),
        "roles": (optional(list_of(choice(ROLES), scalar_ok=True)), None),
        "mode": (choice(("auto", "understanding", "generation", "generate")), "auto"),
        "batch_size": (integer(1), 16),
        # examples per shard file; a number, not automatic, so every torchrun rank cuts the same shards
        "shard_size": (integer(1), 256),
        "backend": (choice(("torch", "nnsight", "transformer_lens")), "torch"),
        "dtype": (optional(choice(DTYPES)), None),
    },
    "probe": {
        "label": (string, "answer"),
        "points": (optional(list_of(string, scalar_ok=True)), None),
        "roles": (optional(list_of(_role_selection, scalar_ok=True)), None),
        "reduce": (reduce_value, "last"),
        "group_by": (optional(string), None),
        "method": (choice(("logistic", "ridge")), "logistic"),
        "folds": (integer(2), 4),
        "test_size": (number(0.0, 1.0), 0.2),
        "n_boot": (integer(0), 300),
        "step": (optional(list_of(integer(0), scalar_ok=True)), None),
        "branch": (choice(("cond", "uncond")), "cond"),
    },
    "lens": {
        "answers": (_answers, "label:answer"),
        "points": (optional(list_of(string, scalar_ok=True)), None),
        "roles": (optional(list_of(choice(ROLES), scalar_ok=True)), None),
        "step": (optional(list_of(integer(0), scalar_ok=True)), None),
        "branch": (choice(("cond", "uncond")), "cond"),
    },
    "patch": {
        "kinds": (list_of(choice(KINDS + HEAD_KINDS), scalar_ok=True), ["resid_pre"]),
        "method": (choice(("exact", "attribution")), "exact"),
        "direction": (choice(("denoise", "noise")), "denoise"),
        "n_pairs": (integer(1), 2),
        "pairs": (optional(list_of(_pair)), None),
        "across": (boolean, False),
        "budget_mb": (number(0.0, float("inf")), 512.0),
    },
    "attention": {
        "n_prompts": (integer(1), 2),
        "query_roles": (optional(list_of(choice(ROLES), scalar_ok=True)), None),
        "key_roles": (optional(list_of(choice(ROLES), scalar_ok=True)), None),
        "layers": (optional(list_of(integer(0), scalar_ok=True)), None),
        "mode": (choice(("auto", *FORMS)), "auto"),
    },
    "knockout": {
        "n_prompts": (integer(1), 1),
        "keys": (_groups, {"prompt": ["text"], "bos": [0]}),
        "query": (_selection, [-1]),
        "target": (lambda v, p: v if v == "label:answer" else token_spec(v, p), "label:answer"),
        "foil": (optional(token_spec), None),
        "window": (integer(1), 1),
        "heads": (optional(list_of(integer(0), scalar_ok=True)), None),
        "layers": (optional(list_of(integer(0), scalar_ok=True)), None),
        "mode": (choice(("auto", *FORMS)), "auto"),
        "budget_mb": (number(0.0, float("inf")), 512.0),
    },
    "steer": {  # steer each pair's corrupted prompt along (clean − corrupted state) at points × alphas
        "points": (list_of(string, scalar_ok=True), ["blocks.*.resid_pre"]),
        "alphas": (list_of(number(float("-inf"), float("inf")), scalar_ok=True), [0.0, 1.0, 2.0, 4.0]),
        "role": (optional(choice(ROLES)), None),
        "n_pairs": (integer(1), 2),
        "pairs": (optional(list_of(_pair)), None),
        "budget_mb": (number(0.0, float("inf")), 512.0),
    },
    "r3": {"rounds": (integer(1), 3)},
}
SWEEP = {
    "distribute": (choice(DISTRIBUTE), "auto"),
    "timeout_minutes": (integer(1), 120),
}
TASK_KEYS = {
    "name": (string, REQUIRED),
    "source": (optional(choice(("sandbox", "prompts"))), None),
    "categories": (optional(list_of(choice(CATEGORIES), scalar_ok=True)), None),
    "form": (optional(choice(FORMS)), None),
    "levels": (optional(list_of(integer(1), scalar_ok=True)), None),
    "limit": (optional(integer(1)), None),
    "suite_seed": (optional(integer(0)), None),
    "prompts": (optional(string), None),
    "analyses": (optional(list_of(choice(ANALYSES), scalar_ok=True)), None),
    **{name: (anything, None) for name in SECTIONS},  # partial overrides, checked below
}
TOP = {
    "name": (optional(string), None),
    "out": (optional(string), None),
    "seed": (integer(0), 0),
    "models": (list_of(anything), REQUIRED),
    "tasks": (list_of(anything), REQUIRED),
    "analyses": (list_of(choice(ANALYSES), scalar_ok=True), REQUIRED),
    **{name: (anything, None) for name in SECTIONS},
    "sweep": (anything, None),
}
