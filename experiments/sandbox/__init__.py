"""Tiny unified multimodal models of the sandbox (AR Janus-style, query-based MetaQuery-style), their
training, checkpoints and the gap table."""

from experiments.sandbox.ar import SandboxAR
from experiments.sandbox.base import SandboxModel, SandboxOutput
from experiments.sandbox.checkpoint import (
    ChecksumError,
    build_model,
    load_sandbox,
    save_sandbox,
    verify_checkpoint,
)
from experiments.sandbox.query import SandboxQuery
from experiments.sandbox.sequences import ROLE_NAMES, Batch, Segment

__all__ = [
    "ROLE_NAMES",
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
