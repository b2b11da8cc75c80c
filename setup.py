"""Packaging: the repository's folders ``hooks/``, ``probes/``, ``experiments/`` are installed as
``uniprobe.hooks``, ``uniprobe.probes``, ``uniprobe.experiments`` beside the public face ``uniprobe/``;
no bare ``hooks`` / ``probes`` / ``experiments`` package is installed (research repositories have
their own ``experiments/`` folders, which would shadow ours). Metadata and dependencies: setup.cfg."""

from setuptools import find_packages, setup

FOLDERS = ("hooks", "probes", "experiments")
packages = ["uniprobe"] + [f"uniprobe.{p}" for p in find_packages(include=[f"{f}*" for f in FOLDERS])]
setup(
    packages=packages,
    package_dir={"uniprobe": "uniprobe", **{f"uniprobe.{f}": f for f in FOLDERS}},
    package_data={
        "uniprobe.experiments": ["configs/*.yaml", "configs/*/*.yaml", "configs/*/*.jsonl"],
        "uniprobe.experiments.sandbox": ["checkpoints/*/*"],
    },
)
