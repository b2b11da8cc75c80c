"""Sandbox checkpoints: ``model.safetensors``, ``config.json``, ``tokenizer.json`` and ``SHA256SUMS``.

No pickle anywhere: weights are safetensors, the architecture is rebuilt from ``config.json``
(arch, backbone config, grid, sizes, vocabulary) and the tokenizer from its JSON vocabulary.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from uniprobe.experiments.sandbox.ar import DEFAULT_BACKBONE, SandboxAR
from uniprobe.experiments.sandbox.base import SandboxModel
from uniprobe.experiments.sandbox.mot import SandboxMoT
from uniprobe.experiments.sandbox.query import SandboxQuery
from uniprobe.experiments.tasks.vocab import WordTokenizer
from uniprobe.hooks.errors import UniprobeError
from uniprobe.hooks.store.files import save_safetensors

# package data: shipped inside uniprobe.experiments.sandbox, so a wheel install has them too
CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"
SHIPPED: dict[str, Path] = {
    "sandbox-ar": CHECKPOINTS / "ar",
    "sandbox-query": CHECKPOINTS / "query",
    "sandbox-mot": CHECKPOINTS / "mot",
}
CHECKED_FILES: tuple[str, ...] = ("model.safetensors", "config.json", "tokenizer.json")
TRAINING_FILE = "training.json"  # the training recipe, when known (see save_sandbox)


class ChecksumError(UniprobeError, RuntimeError):
    """A checkpoint file does not match its recorded sha256."""


def build_model(
    arch: str, tokenizer: WordTokenizer | None = None, backbone: dict | None = None, **kw
) -> SandboxModel:
    """A freshly initialised sandbox model of ``arch`` (``"ar"``, ``"query"`` or ``"mot"``)."""
    if arch == "ar":
        return SandboxAR(tokenizer, backbone, **kw)
    if arch == "query":
        return SandboxQuery(tokenizer, backbone, **kw)
    if arch == "mot":
        return SandboxMoT(tokenizer, backbone, **kw)
    raise ValueError(f"unknown sandbox arch {arch!r}; expected 'ar', 'query' or 'mot'")


def model_config(model: SandboxModel) -> dict:
    """The JSON config that rebuilds ``model``'s architecture."""
    cfg = model.lm.config
    backbone = {k: getattr(cfg, k) for k in DEFAULT_BACKBONE}
    out = {
        "arch": model.arch,
        "backbone_class": type(model.lm).__name__,
        "backbone": backbone,
        "grid": model.grid,
        "n_tiles": model.n_tiles,
        "vocab": model.tokenizer.vocab,
    }
    if model.arch == "query":
        out.update(n_queries=model.n_queries, decoder_hidden=model.decoder_hidden)
    if model.arch == "mot":
        out.update(latent_dim=model.latent_dim)
    return out


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_sandbox(
    model: SandboxModel, out_dir: str | Path, dtype: torch.dtype = torch.float32, training: dict | None = None
) -> Path:
    """Write the checkpoint (weights in ``dtype``) and its ``SHA256SUMS``; returns the directory.

    ``training`` (the recipe: seed, suite_seed, steps, data mix) goes to ``training.json``, checked
    like the rest; the gap table reads it to say which test items occur nowhere in training."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(dtype).contiguous().clone() for k, v in model.state_dict().items()}
    save_safetensors(out / "model.safetensors", state, {"arch": model.arch})  # umask mode, atomic
    (out / "config.json").write_text(json.dumps(model_config(model), indent=1))
    model.tokenizer.save(out / "tokenizer.json")
    names = CHECKED_FILES
    if training is not None:
        (out / TRAINING_FILE).write_text(json.dumps(training, indent=1))
        names += (TRAINING_FILE,)
    lines = [f"{sha256_file(out / name)}  {name}" for name in names]
    (out / "SHA256SUMS").write_text("\n".join(lines) + "\n")
    return out


def verify_checkpoint(path: str | Path) -> None:
    """Check every file listed in ``SHA256SUMS``; raise :class:`ChecksumError` naming the bad file."""
    path = Path(path)
    sums = path / "SHA256SUMS"
    if not sums.exists():
        raise ChecksumError(f"{sums} is missing; cannot verify (pass verify=False to skip)")
    for line in sums.read_text().splitlines():
        if not line.strip():
            continue
        digest, name = line.split(maxsplit=1)
        f = path / name.strip()
        if not f.exists():
            raise ChecksumError(f"{f} is listed in SHA256SUMS but missing")
        got = sha256_file(f)
        if got != digest:
            raise ChecksumError(f"sha256 mismatch for {f}: expected {digest}, got {got}")


def resolve_model_dir(name_or_dir: str | Path) -> Path:
    """A shipped name (``sandbox-ar``, ``-query``, ``-mot``) → its checkpoint directory; else the path."""
    if str(name_or_dir) in SHIPPED:
        return SHIPPED[str(name_or_dir)]
    path = Path(name_or_dir)
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"no sandbox checkpoint at {path} (expected config.json); or use one of {list(SHIPPED)}"
        )
    return path


def load_sandbox(path: str | Path, verify: bool = True) -> SandboxModel:
    """Load a checkpoint directory (or ``"sandbox-ar"``/``"sandbox-query"``) in eval mode, float32."""
    path = resolve_model_dir(path)
    if verify:
        verify_checkpoint(path)
    cfg = json.loads((path / "config.json").read_text())
    tok = WordTokenizer.load(path / "tokenizer.json")
    if tok.vocab != cfg["vocab"]:
        raise ValueError(f"{path / 'tokenizer.json'} does not match the vocabulary in config.json")
    kw = {"grid": cfg["grid"], "n_tiles": cfg["n_tiles"]}
    if cfg["arch"] == "query":
        kw.update(n_queries=cfg["n_queries"], decoder_hidden=cfg["decoder_hidden"])
    if cfg["arch"] == "mot":
        kw.update(latent_dim=cfg["latent_dim"])
    model = build_model(cfg["arch"], tok, cfg["backbone"], **kw)
    state = {k: v.float() for k, v in load_file(str(path / "model.safetensors")).items()}
    model.load_state_dict(state)
    recipe = path / TRAINING_FILE
    # None: unknown recipe, so the gap table claims no test item is held out of training
    model.training_recipe = json.loads(recipe.read_text()) if recipe.exists() else None
    return model.eval()
