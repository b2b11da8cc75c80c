"""What would fail before a sweep's runs start, found without loading a model: missing model folders,
adapter / loader / prompts files, and malformed prompts lines (split from :mod:`.config`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from uniprobe.experiments.sweep.config import SweepConfig


def missing_files(cfg: SweepConfig) -> list[str]:
    """What a run would fail on before starting: model folders, adapter, loader and prompts files that
    do not exist (one message per problem, naming the key and how to set it)."""
    from uniprobe.experiments.models import builtin_names

    problems = []
    for i, m in enumerate(cfg.settings["models"]):
        if m["path"] not in builtin_names() and not Path(m["path"]).expanduser().exists():
            problems.append(
                f"models[{i}].path: {m['path']!r} is neither a built-in model ({', '.join(builtin_names())}) "
                f"nor an existing folder; set it with --set models[{i}].path=DIR"
            )
        loader_file = (m["loader"] or "").rpartition(":")[0]
        for key, file, form in (
            ("adapter", m["adapter"], "SPEC.yaml"),
            ("loader", loader_file if loader_file.endswith(".py") else None, "FILE.py:function"),
        ):
            if file and not Path(file).is_file():
                problems.append(
                    f"models[{i}].{key}: {file} does not exist; set it with --set models[{i}].{key}={form}"
                )
    for j, t in enumerate(cfg.settings["tasks"]):
        if t["prompts"] and not Path(t["prompts"]).exists():
            problems.append(f"tasks[{j}].prompts: {t['prompts']} does not exist")
    return problems


def prompt_problems(cfg: SweepConfig) -> list[str]:
    """The first malformed line of each prompts file, found without loading a model (not UTF-8 or
    JSON, unknown keys or roles, ids that are not whole numbers); token ids are checked against
    each model's vocabulary and positions when its run starts."""
    from uniprobe.experiments.prompts_file import PromptFileError, parse_prompts

    problems = []
    for j, t in enumerate(cfg.settings["tasks"]):
        if t["prompts"] and Path(t["prompts"]).is_file():
            try:
                parse_prompts(t["prompts"])
            except PromptFileError as err:
                problems.append(f"tasks[{j}].prompts: {err}")
    return problems


def preflight(cfg: SweepConfig) -> list[str]:
    """Everything that would fail before a run starts: :func:`missing_files`, :func:`prompt_problems`."""
    return missing_files(cfg) + prompt_problems(cfg)
