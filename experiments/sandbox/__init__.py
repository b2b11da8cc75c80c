"""Tiny unified multimodal models of the sandbox (AR Janus-style, query-based MetaQuery-style), their
training, checkpoints and the gap table. Importing the package registers their adapters
(:mod:`uniprobe.experiments.sandbox.adapter`)."""

from uniprobe.experiments.sandbox.adapter import SANDBOX_AR, SANDBOX_QUERY
from uniprobe.experiments.sandbox.ar import SandboxAR
from uniprobe.experiments.sandbox.base import SandboxModel, SandboxOutput
from uniprobe.experiments.sandbox.checkpoint import (
    ChecksumError,
    build_model,
    load_sandbox,
    save_sandbox,
    verify_checkpoint,
)
from uniprobe.experiments.sandbox.query import SandboxQuery
from uniprobe.experiments.sandbox.sequences import ROLE_NAMES, Batch, Segment

__all__ = [
    "ROLE_NAMES",
    "SANDBOX_AR",
    "SANDBOX_QUERY",
    "Batch",
    "ChecksumError",
    "SandboxAR",
    "SandboxModel",
    "SandboxOutput",
    "SandboxQuery",
    "Segment",
    "build_model",
    "load_sandbox",
    "save_sandbox",
    "verify_checkpoint",
]
