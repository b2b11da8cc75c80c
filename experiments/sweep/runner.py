"""Running a sweep: the loop over runs, resuming, failures, and ranks under ``torchrun``.

Layout of a sweep directory::

    OUT/sweep.json            the validated config; a re-run must match it (else: new --out or --restart);
                              also the mark that uniprobe made OUT ("format": "uniprobe-sweep")
    OUT/index.json, index.csv every run with status, error, paths and headline numbers (atomic)
    OUT/runs/ID/config.json   the run's resolved config
    OUT/runs/ID/store/        its activation store (capture)
    OUT/runs/ID/probe/ lens/ patch/ gapeval/ r3/   each analysis's files and figures
    OUT/runs/ID/results.json  headline of every finished analysis, rewritten after each one
    OUT/runs/ID/results.csv   the same as analysis,key,value rows
    OUT/runs/ID/log.txt       what the analyses printed
    OUT/runs/ID/DONE.json     written last: the run is finished (FAILED.json: the last attempt failed)

``--restart`` deletes only what a sweep writes — the run folders its ``sweep.json`` lists, the
index and ``sweep.json`` — and only when that ``sweep.json`` is uniprobe's; anything else in OUT
(files put in ``runs/`` included) stays, and a directory without it is refused untouched.

Resume: a run with DONE.json is skipped; a started run keeps its finished store shards (capture
resumes) and its finished analyses (listed in results.json); failed runs are retried.

Ranks (``WORLD_SIZE > 1``): with ``sweep.distribute: runs`` each rank takes every ``world``-th run;
with ``examples`` every run's capture is split into contiguous slices of batches, one per rank,
and rank 0 merges them into the run's store and runs the other analyses. ``auto`` shares runs when
there are at least as many runs as ranks, else examples. Rank 0 writes the index.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import shutil
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from uniprobe.experiments.sweep.analyses import ANALYSIS_FUNCTIONS, RunContext
from uniprobe.experiments.sweep.config import ConfigError, SweepConfig, preflight
from uniprobe.experiments.sweep.dist import Ranks, ranks_from_env
from uniprobe.experiments.sweep.index import (
    DONE,
    FAILED,
    RESULTS,
    read_json,
    run_state,
    write_atomic,
    write_index,
    write_json,
)
from uniprobe.experiments.sweep.merge import batch_slice, make_parts_dir, merge_parts, part_path, remove_parts
from uniprobe.experiments.sweep.tasks import capture_mode, run_examples
from uniprobe.hooks.dtypes import dtype_of
from uniprobe.hooks.errors import UniprobeError

Echo = Callable[[str], None]
SWEEP_FILE = "sweep.json"
SWEEP_FORMAT = "uniprobe-sweep"  # sweep.json's "format": the mark that uniprobe made the directory
LEGACY_KEYS = {"settings", "runs", "source", "created"}  # a sweep.json written before "format" existed
RUN_ID = re.compile(r"[A-Za-z0-9._-]+")  # what config._safe_name makes; never a path


class FailFastError(UniprobeError, RuntimeError):
    """``--fail-fast``: a run failed and the sweep stopped."""


def run_sweep(
    cfg: SweepConfig, *, restart: bool = False, fail_fast: bool = False, echo: Echo = print
) -> list[dict[str, Any]]:
    """Run every unfinished run of ``cfg``; returns the index entries (on every rank).

    Raises:
        ConfigError: a model folder or file of the config is missing, a prompts file is malformed, or
            the sweep directory holds a sweep made with a different config.
        FileExistsError: the sweep directory holds files but no sweep of uniprobe's (with or
            without ``restart``: nothing in it is deleted).
        FailFastError: with ``fail_fast``, after the first failed run (the index is written first).
    """
    problems = preflight(cfg)
    if problems:
        raise ConfigError("; ".join(problems))
    ranks = ranks_from_env(cfg.sweep["timeout_minutes"])
    say = echo if ranks.main else (lambda _msg: None)
    try:
        problem = None
        if ranks.main:
            try:
                prepare_root(cfg, restart)
            except Exception as err:
                problem = err
        message = ranks.broadcast(None if problem is None else str(problem))
        if problem is not None:
            raise problem
        if message is not None:
            raise ConfigError(message)
        mode = distribution(cfg, ranks)
        if ranks.world > 1:
            say(f"sweep {cfg.name!r}: {len(cfg.runs)} runs on {ranks.world} ranks, sharing {mode}")
        loop = _share_runs if mode == "runs" else _share_examples
        stopped = loop(cfg, ranks, fail_fast, echo if mode == "runs" else say)
        stopped = [s for s in ranks.gather(stopped) if s]
        entries = write_index(cfg.out, cfg.name, cfg.runs) if ranks.main else None
        entries = ranks.broadcast(entries)
        counts = {s: sum(e["status"] == s for e in entries) for s in ("done", "failed", "pending")}
        say(
            f"sweep {cfg.name!r}: {counts['done']} done, {counts['failed']} failed, "
            f"{counts['pending']} pending — index: {cfg.out / 'index.csv'}"
        )
        if stopped:
            raise FailFastError(f"{stopped[0]} (--fail-fast: the sweep stopped; re-run to retry)")
        return entries
    finally:
        ranks.close()


def distribution(cfg: SweepConfig, ranks: Ranks) -> str:
    """``single`` in one process, else ``runs`` or ``examples`` (see the module docstring)."""
    if ranks.world == 1:
        return "single"
    mode = cfg.sweep["distribute"]
    if mode == "auto":
        return "runs" if len(cfg.runs) >= ranks.world else "examples"
    return mode


def prepare_root(cfg: SweepConfig, restart: bool) -> None:
    """Create or check the sweep directory: its ``sweep.json`` must hold the same config.

    Nothing is deleted unless ``restart`` and the directory's ``sweep.json`` is uniprobe's; then
    only what the sweep wrote goes (:func:`clear_sweep`).
    """
    root = cfg.out
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"{root} is a file; --out takes a directory")
    marker = sweep_marker(root)
    if marker is None and _holds_files(root):
        raise FileExistsError(_not_a_sweep(root, restart))
    if restart and marker is not None:
        clear_sweep(root, marker)
        marker = None
    settings = json.loads(json.dumps(cfg.settings))
    if marker is not None:
        old = marker["settings"]
        if old != settings:
            raise ConfigError(
                f"{root} holds a sweep made with a different config ({first_difference(old, settings)}); "
                "to keep it, run into a new directory (--out), or pass --restart to delete its runs and "
                "start again"
            )
    else:
        runs = [r["id"] for r in cfg.runs]
        write_json(
            root / SWEEP_FILE,
            {"format": SWEEP_FORMAT, "version": 1, "settings": settings, "runs": runs,
             "source": str(cfg.source), "created": _now()},
        )  # fmt: skip
    write_index(root, cfg.name, cfg.runs)


def sweep_marker(root: Path) -> dict | None:
    """``root``'s ``sweep.json`` when uniprobe wrote it, else None (absent, unreadable, someone else's).

    Valid: a JSON object with ``"format": "uniprobe-sweep"`` (or the exact keys of the older format),
    ``settings`` an object and ``runs`` a list of run ids (plain names, never paths).
    """
    file = root / SWEEP_FILE
    if file.is_symlink() or not file.is_file():
        return None
    try:
        data = read_json(file)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or (data.get("format") != SWEEP_FORMAT and set(data) != LEGACY_KEYS):
        return None
    runs = data.get("runs")
    if not isinstance(data.get("settings"), dict) or not isinstance(runs, list):
        return None
    if not all(isinstance(r, str) and RUN_ID.fullmatch(r) and r not in (".", "..") for r in runs):
        return None
    return data


def clear_sweep(root: Path, marker: dict) -> None:
    """Delete what the sweep of ``marker`` wrote in ``root``: the run folders it lists, ``runs/``
    if that leaves it empty, the index and ``sweep.json`` (last, so an interrupted clear can be redone).
    """
    runs = root / "runs"
    doomed = [runs / run_id for run_id in marker["runs"]]
    links = [p for p in (runs, *doomed) if p.is_symlink()]
    if links:  # uniprobe never makes links; deleting through one would reach outside the sweep
        raise FileExistsError(
            f"--restart: {links[0]} is a link, which uniprobe does not make; nothing was deleted. "
            "Remove the link yourself, or run into a new directory (--out)"
        )
    for path in doomed:
        if path.exists():
            shutil.rmtree(path)
    with contextlib.suppress(OSError):
        runs.rmdir()  # only when empty: what else is in runs/ is not the sweep's
    for name in ("index.json", "index.csv", SWEEP_FILE):
        (root / name).unlink(missing_ok=True)


def _holds_files(root: Path) -> bool:
    return root.is_dir() and any(p.name != ".gitkeep" for p in root.iterdir())


def _not_a_sweep(root: Path, restart: bool) -> str:
    what = (
        "has a sweep.json uniprobe did not write (or a damaged one)"
        if (root / SWEEP_FILE).exists()
        else "holds no sweep (no sweep.json)"
    )
    if restart:
        return (
            f"--restart: {root} {what}, so nothing in it was deleted: uniprobe deletes only in "
            "directories it made. Run into a new directory (--out NEW), or empty this one yourself"
        )
    return f"{root} exists but {what}; choose another --out (an empty or new directory)"


def first_difference(old: Any, new: Any, path: str = "") -> str:
    """Where two JSON values first differ, as ``path: old → new``."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(old) + [k for k in new if k not in old]:
            if old.get(key) != new.get(key):
                return first_difference(old.get(key), new.get(key), f"{path}.{key}" if path else key)
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new)):
            if a != b:
                return first_difference(a, b, f"{path}[{i}]")
    return f"{path or 'config'}: {json.dumps(old)} → {json.dumps(new)}"


# -- the two loops ------------------------------------------------------------------------------------
def _share_examples(cfg: SweepConfig, ranks: Ranks, fail_fast: bool, say: Echo) -> str | None:
    """Every rank takes part in every run (rank 0 decides what each run needs)."""
    models = ModelCache(cfg.allow_module_loaders)
    stop = None
    for k, run in enumerate(cfg.runs):
        run_dir = cfg.out / "runs" / run["id"]
        plan = None
        if ranks.main:
            if stop:
                plan = "stop"
            elif (run_dir / DONE).exists():
                plan = "skip"
            else:
                plan = "captured" if store_complete(run_dir / "store") else "capture"
        plan = ranks.broadcast(plan)
        if plan == "stop":
            break
        where = f"[{k + 1}/{len(cfg.runs)}] {run['id']}"
        if plan == "skip":
            say(f"{where}: done before, skipped")
            continue
        status = execute_run(run, run_dir, ranks, models, plan == "captured", say, where)
        if ranks.main:
            write_index(cfg.out, cfg.name, cfg.runs)
            if status == "failed" and fail_fast:
                stop = f"run {run['id']} failed: {run_state(run_dir).get('error')}"
    return stop


def _share_runs(cfg: SweepConfig, ranks: Ranks, fail_fast: bool, echo: Echo) -> str | None:
    """Rank ``r`` takes runs ``r, r + world, ...``, each in full, alone."""
    models = ModelCache(cfg.allow_module_loaders)
    tag = f"[rank {ranks.rank}] " if ranks.world > 1 else ""
    for k, run in enumerate(cfg.runs):
        if k % ranks.world != ranks.rank:
            continue
        run_dir = cfg.out / "runs" / run["id"]
        where = f"{tag}[{k + 1}/{len(cfg.runs)}] {run['id']}"
        if (run_dir / DONE).exists():
            echo(f"{where}: done before, skipped")
            continue
        status = execute_run(run, run_dir, Ranks(), models, False, echo, where)
        if ranks.main:
            write_index(cfg.out, cfg.name, cfg.runs)
        if status == "failed" and fail_fast:
            return f"run {run['id']} failed: {run_state(run_dir).get('error')}"
    return None


# -- one run ----------------------------------------------------------------------------------------
class ModelCache:
    """Holds the last model loaded, so consecutive runs of one model load it once."""

    def __init__(self, allow_module_loaders: bool = False) -> None:
        self.key: str | None = None
        self.loaded: Any = None
        self.allow_module_loaders = allow_module_loaders

    def get(self, spec: dict) -> Any:
        from uniprobe.experiments.sweep.models import load_run_model

        key = json.dumps(spec, sort_keys=True)
        if key != self.key:
            self.key, self.loaded = None, None  # free the previous model first
            self.loaded = load_run_model(spec, allow_module_loaders=self.allow_module_loaders)
            self.key = key
        return self.loaded


def store_complete(path: Path) -> bool:
    from uniprobe.hooks.store import ActivationStore

    try:
        return ActivationStore.open(path, verify="none").complete
    except (FileNotFoundError, ValueError):
        return False


def execute_run(
    run: dict, run_dir: Path, ranks: Ranks, models: ModelCache, captured: bool, say: Echo, where: str
) -> str | None:
    """One run: capture (this rank's slice), then on rank 0 merge and the other analyses.

    Returns ``"done"`` or ``"failed"`` on rank 0 (``None`` on other ranks). Markers and results are
    written by rank 0 only; a failure is recorded in FAILED.json and the run's state stays resumable.
    """
    t0 = time.perf_counter()
    if ranks.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / FAILED).unlink(missing_ok=True)
        write_json(run_dir / "config.json", run)
        say(f"{where}: {', '.join(run['analyses'])}")
    capture = "capture" in run["analyses"] and not captured
    error, trace, ctx = None, None, None
    try:
        if ranks.main or capture:
            loaded = models.get(run["model"])
            examples, items = run_examples(run["task"], loaded)
            ctx = RunContext(run, run_dir, loaded, examples, items)
            if capture:
                capture_slice(ctx, ranks)
    except Exception as err:
        error, trace = _describe(err, ranks), traceback.format_exc()
    errors = [e for e in ranks.gather(error) if e]
    if not ranks.main:
        return None
    if errors:
        return _fail(run_dir, errors, trace, t0, say, where)
    try:
        finish_analyses(ctx, ranks, capture, say, where)
    except Exception as err:
        return _fail(run_dir, [_describe(err, ranks)], traceback.format_exc(), t0, say, where)
    seconds = time.perf_counter() - t0
    results = read_json(run_dir / RESULTS)["analyses"]
    headline = {f"{a}.{k}": v for a, h in results.items() for k, v in h.items()}
    write_json(
        run_dir / DONE,
        {"id": run["id"], "seconds": round(seconds, 3), "finished": _now(), "headline": headline},
    )
    say(f"{where}: done in {seconds:.1f}s")
    return "done"


def capture_settings(ctx: RunContext) -> dict[str, Any]:
    """The run's capture settings, as ``capture_dataset`` / ``capture_identity`` take them."""
    cfg = ctx.run["capture"]
    return {
        "batch_size": cfg["batch_size"],
        "shard_size": cfg["shard_size"],
        "roles": cfg["roles"],
        "mode": capture_mode(ctx.run["task"], cfg["mode"]),
        "dtype": dtype_of(cfg["dtype"]),
        "adapter": ctx.loaded.adapter,
        "backend": cfg["backend"],
    }


def capture_slice(ctx: RunContext, ranks: Ranks) -> None:
    """Capture this rank's shards of the run's examples (all of them in a single process)."""
    from uniprobe.hooks.pipeline import capture_dataset

    cfg = ctx.run["capture"]
    size = cfg["shard_size"]  # ranks split at shard boundaries: the merged shards are a single process's
    examples, target = ctx.examples, ctx.store
    if ranks.world > 1:
        mine = batch_slice(math.ceil(len(examples) / size), ranks.rank, ranks.world)
        if not mine:
            return
        examples = examples[mine.start * size : mine.stop * size]
        make_parts_dir(ctx.store)  # marked, so that remove_parts may delete it after the merge
        target = part_path(ctx.store, ranks.rank, ranks.world)
    capture_dataset(
        ctx.loaded.model, examples, cfg["points"], target, **capture_settings(ctx), resume=True,
        model_info={"spec": ctx.run["model"]["path"]}, progress=False,
    )  # fmt: skip


def finish_analyses(ctx: RunContext, ranks: Ranks, captured_now: bool, say: Echo, where: str) -> None:
    """Rank 0: merge the ranks' captures, then every analysis not finished before (results.json)."""
    from uniprobe.hooks.store import ActivationStore
    from uniprobe.hooks.store.identity import capture_identity

    file = ctx.dir / RESULTS
    results = read_json(file) if file.exists() else {"id": ctx.run["id"], "analyses": {}}
    done = results["analyses"]
    if "capture" in ctx.run["analyses"]:
        if ranks.world > 1 and captured_now:
            n_batches = math.ceil(len(ctx.examples) / ctx.run["capture"]["shard_size"])
            parts = [
                part_path(ctx.store, r, ranks.world)
                for r in range(ranks.world)
                if batch_slice(n_batches, r, ranks.world)
            ]
            # the merged store carries the identity of the whole capture, as one process writes it
            identity = capture_identity(ctx.examples, positions=None, **capture_settings(ctx))
            merge_parts(parts, ctx.store, identity=identity)
        remove_parts(ctx.store)
        store = ActivationStore.open(ctx.store)
        done["capture"] = {
            "examples": store.n_examples,
            "points": len(store.points),
            "mb": round(store.size_on_disk() / 2**20, 3),
        }
        _save_results(ctx.dir, results)
    for name in ctx.run["analyses"]:
        if name == "capture" or name in done:
            continue
        t0 = time.perf_counter()
        with open(ctx.dir / "log.txt", "a") as log, contextlib.redirect_stdout(log):
            done[name] = ANALYSIS_FUNCTIONS[name](ctx)
        _save_results(ctx.dir, results)
        say(f"{where}: {name} in {time.perf_counter() - t0:.1f}s")


def _save_results(run_dir: Path, results: dict) -> None:
    write_json(run_dir / RESULTS, results)
    lines = ["analysis,key,value"]
    for name, headline in results["analyses"].items():
        lines += [f"{name},{key},{'' if v is None else v}" for key, v in headline.items()]
    write_atomic(run_dir / "results.csv", "\n".join(lines) + "\n")


def _describe(err: Exception, ranks: Ranks) -> str:
    who = f"rank {ranks.rank}: " if ranks.world > 1 else ""
    return f"{who}{type(err).__name__}: {err}"


def _fail(run_dir: Path, errors: list[str], trace: str | None, t0: float, say: Echo, where: str) -> str:
    seconds = round(time.perf_counter() - t0, 3)
    write_json(
        run_dir / FAILED,
        {"error": "; ".join(errors), "seconds": seconds, "finished": _now(), "traceback": trace},
    )
    say(f"{where}: FAILED — {'; '.join(errors)}")
    return "failed"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
