"""The sweep config: one YAML file → validated, normalised settings and the list of runs.

Top-level keys (only these; anything else is an error naming the key and the allowed ones)::

    name: unisandbox                # default: the file's stem
    out: artifacts/sweeps/NAME      # sweep directory (``--out`` overrides; default shown)
    seed: 0
    models:   [{path, name?, adapter?, loader?, device_map?, dtype?, load_options?}, ...]
    tasks:    [{name, categories? | prompts?, form?, levels?, limit?, suite_seed?,
                analyses?, capture?, probe?, lens?, patch?, r3?}, ...]
    analyses: [capture, probe, lens, patch, attention, knockout, steer, gapeval, r3]   # any subset, in order
    capture / probe / lens / patch / attention / knockout / steer / r3: settings of each analysis (SECTIONS)
    sweep:    {distribute: auto|examples|runs, timeout_minutes: 120}

Runs are the product models × tasks, in that order, with ids ``{model name}__{task name}``.
A task may override ``analyses`` and any key of the analysis sections for its runs.
Relative file paths (``prompts``, ``adapter``, a ``loader`` ``.py`` file) are read from the config
file's folder. A ``loader`` runs code: it is ``FILE.py:function`` (the file must exist), and
``package.module:function`` only when the caller allows it (``uniprobe sweep --allow-module-loaders``,
``load_config(..., allow_module_loaders=True)``), never by the YAML alone. ``models[].path`` is a
built-in model name or a folder, as ``uniprobe --model`` takes.
``--set KEY=VALUE`` (e.g. ``--set models[0].path=/data/Janus-Pro-1B``) edits the file's values
before validation; VALUE is read as YAML (``4``, ``[text, query]``, ``null``).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uniprobe.experiments.sweep.preflight import missing_files, preflight, prompt_problems
from uniprobe.experiments.sweep.schema import (
    ConfigError,
    section,
)
from uniprobe.experiments.sweep.sections import (
    ANALYSES,
    MODEL,
    NEEDS_STORE,
    SANDBOX_ONLY,
    SECTIONS,
    SWEEP,
    TASK_KEYS,
    TOP,
)
from uniprobe.experiments.tasks.prompts import CATEGORIES

CONFIGS = Path(__file__).resolve().parents[1] / "configs"  # the shipped configs (package data)


@dataclass
class SweepConfig:
    """A validated sweep.

    Attributes:
        name: the sweep's name.
        out: its directory (from ``out`` or ``--out``; default ``artifacts/sweeps/{name}``).
        settings: the normalised config without ``out`` — what a sweep directory is checked against.
        runs: one resolved dict per run (``id``, ``model``, ``task``, ``analyses``, sections).
        source: the YAML file.
        allow_module_loaders: whether ``package.module:function`` loaders may be imported (the
            caller's choice, not the config's: it is not part of ``settings``).
    """

    name: str
    out: Path
    settings: dict
    runs: list[dict]
    source: Path
    allow_module_loaders: bool = False

    @property
    def sweep(self) -> dict:
        return self.settings["sweep"]


def load_config(
    path: str | Path,
    overrides: list[str] | None = None,
    out: str | None = None,
    *,
    allow_module_loaders: bool = False,
) -> SweepConfig:
    """Read, override (``KEY=VALUE`` strings), validate and resolve a sweep config file.

    ``allow_module_loaders``: accept ``loader: package.module:function`` (it imports that module);
    by default only ``FILE.py:function`` loaders are accepted.
    """
    import yaml

    path = config_path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    for item in overrides or []:
        raw = apply_override(raw, item)
    return resolve(raw, path, out, allow_module_loaders=allow_module_loaders)


def shipped_configs() -> list[str]:
    """Names of the configs installed with uniprobe (``unisandbox``, ``real/janus_pro_1b``, ...)."""
    files = [f for f in CONFIGS.rglob("*.yaml") if not f.stem.endswith("_adapter")]  # adapters: not sweeps
    return sorted(str(f.relative_to(CONFIGS).with_suffix("")) for f in files)


def config_path(path: str | Path) -> Path:
    """``path`` if it exists, else the installed config of that name (``uniprobe sweep unisandbox``)."""
    path = Path(path)
    if path.exists():
        return path
    name = str(path.with_suffix("")) if path.suffix in (".yaml", ".yml") else str(path)
    if name in shipped_configs():
        return CONFIGS / f"{name}.yaml"
    raise FileNotFoundError(
        f"sweep config {path} does not exist (nor is it a shipped config: {', '.join(shipped_configs())})"
    )


def apply_override(raw: Any, item: str) -> Any:
    """``raw`` with ``KEY=VALUE`` applied; KEY is a path like ``models[0].path`` or ``capture.batch_size``."""
    import yaml

    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. models[0].path=/data/Janus-Pro-1B")
    steps = [s for part in key.split(".") for s in re.findall(r"[^\[\]]+|\[\d+\]", part)]
    if not steps or "".join(steps) != key.replace(".", ""):
        raise ConfigError(f"--set {item!r}: cannot read the key path {key!r}")
    raw = copy.deepcopy(raw) if raw is not None else {}
    node, where = raw, ""
    for step, nxt in zip(steps, steps[1:] + [None]):
        index = int(step[1:-1]) if step.startswith("[") else None
        where += step if index is not None else (f".{step}" if where else step)
        new = [] if nxt is not None and nxt.startswith("[") else {}
        if index is not None:
            if not isinstance(node, list) or index >= len(node):
                size = len(node) if isinstance(node, list) else 0
                raise ConfigError(f"--set {item!r}: {where} does not exist (the list has {size} items)")
            if nxt is None:
                node[index] = yaml.safe_load(text)
            else:
                node = node[index]
        else:
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {where} is inside a value that is not a mapping")
            if nxt is None:
                node[step] = yaml.safe_load(text)
            else:
                node = node.setdefault(step, new)
    return raw


def resolve(
    raw: Any, source: Path, out: str | None = None, *, allow_module_loaders: bool = False
) -> SweepConfig:
    """Validate the parsed YAML ``raw`` and build every run's config (see :func:`load_config`)."""
    top = section(TOP, raw, "")
    base = source.parent.resolve()
    name = top["name"] or source.stem
    sections = {k: section(spec, top[k], k) for k, spec in SECTIONS.items()}
    models = [_model(m, f"models[{i}]", base, allow_module_loaders) for i, m in enumerate(top["models"])]
    tasks = [_task(t, f"tasks[{i}]", base, top, sections) for i, t in enumerate(top["tasks"])]
    settings = {  # top-level settings before the tasks that copy them: differences show there first
        "name": name,
        "seed": top["seed"],
        "analyses": _ordered(top["analyses"], "analyses"),
        **sections,
        "sweep": section(SWEEP, top["sweep"], "sweep"),
        "models": models,
        "tasks": tasks,
    }
    runs, seen = [], {}
    for i, model in enumerate(models):
        for j, task in enumerate(tasks):
            run = _run(model, task, f"models[{i}]", f"tasks[{j}]", top["seed"])
            if run["id"] in seen:
                raise ConfigError(
                    f"models[{i}] × tasks[{j}]: run id {run['id']!r} repeats {seen[run['id']]}; "
                    "give the models or tasks distinct 'name's"
                )
            seen[run["id"]] = f"models[{i}] × tasks[{j}]"
            runs.append(run)
    where = Path(out or top["out"] or Path("artifacts") / "sweeps" / name)
    return SweepConfig(name, where, settings, runs, source, allow_module_loaders)


def _ordered(analyses: list[str], path: str) -> list[str]:
    dupes = sorted({a for a in analyses if analyses.count(a) > 1})
    if dupes:
        raise ConfigError(f"{path}: {', '.join(dupes)} listed more than once")
    return [a for a in ANALYSES if a in analyses]


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "model"


def _local_file(value: str | None, base: Path) -> str | None:
    if value is None:
        return None
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def _model(raw: Any, path: str, base: Path, allow_module_loaders: bool) -> dict:
    from uniprobe.experiments.models import builtin_names

    m = section(MODEL, raw, path)
    m["adapter"] = _local_file(m["adapter"], base)
    if m["loader"]:
        m["loader"] = _loader(m["loader"], f"{path}.loader", base, allow_module_loaders)
    builtin = m["path"] in builtin_names()
    m["name"] = _safe_name(m["name"] or (m["path"] if builtin else Path(m["path"]).name))
    return m


def _loader(value: str, path: str, base: Path, allow_modules: bool) -> str:
    """``FILE.py:function`` with FILE made absolute; ``package.module:function`` only if allowed."""
    target, sep, func = value.rpartition(":")  # the last colon: a Windows path has one of its own
    if not sep or not target or not func.isidentifier():
        raise ConfigError(
            f"{path}: {value!r} is not 'FILE.py:function' (a Python file, relative to the config's "
            "folder or absolute, and the function in it that loads the model)"
        )
    if target.endswith(".py"):
        return f"{_local_file(target, base)}:{func}"
    if not allow_modules:
        raise ConfigError(
            f"{path}: {value!r} would import the module {target!r}, running its code; a loader must be "
            "FILE.py:function (relative to the config's folder, or absolute). To import an installed "
            "module, pass --allow-module-loaders (Python: load_config(..., allow_module_loaders=True))"
        )
    if not all(part.isidentifier() for part in target.split(".")):
        raise ConfigError(f"{path}: {target!r} is not a module name like package.module")
    return value


def _task(raw: Any, path: str, base: Path, top: dict, sections: dict[str, dict]) -> dict:
    t = section(TASK_KEYS, raw, path)
    source = t["source"] or ("prompts" if t["prompts"] else "sandbox")
    if source == "prompts":
        if not t["prompts"]:
            raise ConfigError(f"{path}.prompts: required when source is 'prompts' (a JSON-lines file)")
        for key in ("categories", "form", "levels", "suite_seed"):
            if t[key] is not None:
                raise ConfigError(
                    f"{path}.{key}: only sandbox tasks select items by {key}; "
                    "a prompts task takes every line of its file (limit: the first N)"
                )
        t["prompts"] = _local_file(t["prompts"], base)
    elif t["prompts"]:
        raise ConfigError(
            f"{path}.prompts: a sandbox task draws its items from the suite; drop 'prompts' or set "
            "source: prompts"
        )
    else:
        t["categories"] = t["categories"] or list(CATEGORIES)
        t["form"] = t["form"] or "understanding"
        t["suite_seed"] = top["seed"] if t["suite_seed"] is None else t["suite_seed"]
    t["source"] = source
    analyses = t.pop("analyses")
    t["analyses"] = (
        _ordered(analyses, f"{path}.analyses") if analyses else _ordered(top["analyses"], "analyses")
    )
    for name, spec in SECTIONS.items():
        override = t.pop(name)
        if override is None:
            t[name] = sections[name]
            continue
        partial = {k: (check, _ABSENT) for k, (check, _) in spec.items()}
        given = {k: v for k, v in section(partial, override, f"{path}.{name}").items() if v is not _ABSENT}
        t[name] = {**sections[name], **given}
    _check_task(t, path, f"{path}.analyses" if analyses else "analyses")
    return t


_ABSENT: Any = object()


def _check_task(t: dict, path: str, where: str) -> None:
    """Cross-key checks of one resolved task; ``where``: the key its analyses list came from."""
    for a in NEEDS_STORE:
        if a in t["analyses"] and "capture" not in t["analyses"]:
            raise ConfigError(f"{where}: {a!r} reads the run's activation store; add 'capture'")
    if t["source"] != "sandbox":
        bad = [a for a in SANDBOX_ONLY if a in t["analyses"]]
        if bad:
            raise ConfigError(
                f"{where}: {', '.join(map(repr, bad))} judge sandbox drawings; task {t['name']!r} reads a "
                f"prompts file. Allowed for a prompts task: {', '.join(a for a in ANALYSES if a not in bad)}"
            )
        if t["patch"]["across"]:
            raise ConfigError(f"{path}.patch.across: understanding → generation patching needs sandbox items")
    elif t["patch"]["across"] and "patch" in t["analyses"] and "arithmetic" not in t["categories"]:
        raise ConfigError(f"{path}.patch.across: needs arithmetic items (add 'arithmetic' to categories)")


def _run(model: dict, task: dict, mpath: str, tpath: str, seed: int) -> dict:
    from uniprobe.experiments.models import builtin_names, sandbox_names

    path = model["path"]
    if task["source"] == "sandbox" and path in builtin_names() and path not in sandbox_names():
        raise ConfigError(
            f"{mpath}.path: {path!r} cannot read {tpath} ({task['name']!r}): sandbox items are in the "
            f"sandbox's vocabulary; use a sandbox model ({', '.join(sandbox_names())}) or a prompts task"
        )
    analyses = task["analyses"]
    run = {
        "id": f"{model['name']}__{_safe_name(task['name'])}",
        "model": model,
        "task": {k: v for k, v in task.items() if k not in SECTIONS and k != "analyses"},
        "analyses": analyses,
        "seed": seed,
    }
    needed = {"capture": "capture" in analyses or any(a in analyses for a in NEEDS_STORE)}
    for name in SECTIONS:
        if needed.get(name) or name in analyses:
            run[name] = task[name]
    return run


__all__ = [
    "ANALYSES",
    "ConfigError",
    "SweepConfig",
    "apply_override",
    "load_config",
    "missing_files",
    "preflight",
    "prompt_problems",
    "resolve",
]
