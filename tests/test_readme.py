"""README.md runs as written: every ```bash command and ```python block, in order, verbatim, from a
folder outside the repository, with the installed ``uniprobe`` and ``python`` first on PATH.

A command that cannot run inside a test is in ``SKIP`` with the reason (and where it is tested
instead); a heavy one is in ``SLOW`` and runs in the slow test, each in a fresh folder (none of them
reads what an earlier command wrote). Everything else runs in the fast test, in README order, in one
folder, so a block may read what an earlier one wrote. yaml / json blocks are data: they must parse.
A new README command must run, or be named here with its reason: the test fails on one that is neither.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

# the command's first line (its comment cut off) or a python block's first line -> why it does not run here
SKIP: dict[str, str] = {
    "make demo": "needs the clone's Makefile (it installs the venv, then runs `uniprobe demo`: run below)",
    "make test": "runs this test (recursion); the test suite itself",
    "uniprobe sweep real/janus_pro_1b --set models[0].path=/data/Janus-Pro-1B --set tasks[0].limit=8 "
    "--out DIR": "needs the Janus-Pro-1B weights; tests/test_sweep_recipes.py runs it on a tiny Janus folder",
    "torchrun --nproc-per-node 4 -m uniprobe sweep unisandbox":
        "four processes on a 2-core machine; tests/test_sweep_dist.py runs a sweep under two ranks",
    "from uniprobe.experiments.models import load_model":
        "needs the Emu3 weights; tests/test_models_device_map.py runs device maps on a tiny model",
    "import nnsight": "needs NDIF (network, an API key); tests/test_nnsight_remote.py runs remote='local'",
    "uniprobe sandbox seeds --arch ar --seeds 0 1 2 --out artifacts/seeds-ar":
        "three full trainings (3 x ~5.5 min) plus the analyses; tests/test_seeds.py runs it on a tiny budget",
}  # fmt: skip

# commands over a minute (measured on the project's 2-core machine, idle-ish) -> the slow test
SLOW: dict[str, str] = {
    "uniprobe gap     --model sandbox-ar --out artifacts/gap-ar": "~30 s idle, ~1 min under load",
    "uniprobe seeds gapeval --model sandbox-ar --out artifacts/gapeval-ar": "~10 s idle, ~1.5 min under load",
    "uniprobe seeds r3      --model sandbox-ar --out artifacts/r3-ar": "~10 s idle, ~1.2 min under load",
    "uniprobe sweep unisandbox": "~30 s (three models; a fresh folder: nothing of the fast run's)",
}
# commands of several minutes each: together they would more than double `make test` (goal: well
# under 15 min on 2 cores), so they carry the `heavy` marker and run with `make test-heavy`; each is
# also exercised at tiny settings by the fast suite (the test file named)
HEAVY: dict[str, str] = {
    "uniprobe train-sandbox --arch ar --out artifacts/sandbox-ar": "~5.5 min (tests/test_sandbox.py)",
    "uniprobe demo": "~1-3 min idle (tests/test_demo.py, slow, small settings)",
    "uniprobe seeds inject  --model sandbox-ar --out artifacts/inject-ar": "~2+ min (tests/test_seeds.py)",
    "uniprobe seeds stars   --model sandbox-ar --out artifacts/stars-ar": "~1.5+ min (tests/test_seeds.py)",
}

# what a step must print or write (a README number is checked where the README quotes it)
EXPECT_OUT: dict[str, list[str]] = {
    "uniprobe probe   artifacts/store --label answer --folds 2 --out artifacts/probe": ["wrote map"],
}
EXPECT_FILES: list[str] = [
    "store/manifest.json",
    "artifacts/my-store/manifest.json",
    "artifacts/store-arith/manifest.json",
    "artifacts/probe-run/probe_map.png",
    "questions.jsonl",
    "artifacts/store/manifest.json",
    "artifacts/probe/probe_map.png",
    "artifacts/lens/lens_map.png",
    "artifacts/patch/patch.png",
]


@dataclass
class Step:
    kind: str  # "bash" or "python"
    code: str  # exactly as in the README
    key: str  # first line, comment cut off (bash)


def readme_steps() -> list[Step]:
    """Every bash command (continuation lines and here-documents joined) and python block, in order."""
    text = (REPO / "README.md").read_text()
    steps = []
    for lang, body in re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.S | re.M):
        if lang == "python":
            steps.append(Step("python", body, body.splitlines()[0].strip()))
        elif lang == "bash":
            lines = body.splitlines()
            i = 0
            while i < len(lines):
                command = [lines[i]]
                while command[-1].endswith("\\"):
                    i += 1
                    command.append(lines[i])
                heredoc = re.search(r"<<'?(\w+)'?", lines[i])
                if heredoc:
                    while lines[i] != heredoc.group(1):
                        i += 1
                        command.append(lines[i])
                i += 1
                key = re.sub(r"\s+#.*$", "", command[0]).strip()
                steps.append(Step("bash", "\n".join(command), key))
        elif lang == "yaml":
            assert isinstance(yaml.safe_load(body), dict), body
        elif lang == "json":
            json.loads(body)
    return steps


def _env() -> dict[str, str]:
    env = dict(os.environ, MPLBACKEND="Agg", TQDM_DISABLE="1", UNIPROBE_DEBUG="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the venv's uniprobe
    return env


def run_step(step: Step, cwd: Path, timeout: int) -> str:
    argv = ["bash", "-c", step.code] if step.kind == "bash" else [sys.executable, "-c", step.code]
    done = subprocess.run(argv, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"README step ({done.returncode}):\n{step.code}\n{done.stderr[-3000:]}"
    return done.stdout


def test_every_readme_command_runs_or_is_named_with_a_reason() -> None:
    steps = readme_steps()
    keys = {s.key for s in steps}
    assert not set(SKIP) - keys, f"SKIP names commands the README no longer has: {set(SKIP) - keys}"
    assert not set(SLOW) - keys, f"SLOW names commands the README no longer has: {set(SLOW) - keys}"
    assert not set(HEAVY) - keys, f"HEAVY names commands the README no longer has: {set(HEAVY) - keys}"
    assert sum(s.kind == "python" for s in steps) >= 3 and sum(s.kind == "bash" for s in steps) >= 20


@pytest.mark.slow  # some 40 CLI processes, each importing torch: minutes under load
def test_readme_runs_verbatim_from_outside_the_repository(tmp_path: Path) -> None:
    assert REPO not in tmp_path.parents
    outputs = []
    for step in readme_steps():
        if step.key in SKIP or step.key in SLOW or step.key in HEAVY:
            continue
        out = run_step(step, tmp_path, timeout=300)
        for expected in EXPECT_OUT.get(step.key, []):
            assert expected in out, f"{step.key}: {expected!r} not in its output:\n{out[-2000:]}"
        outputs.append(out)
    printed = "\n".join(outputs)
    assert "torch.Size([1, 8, 128]) 3" in printed  # the quickstart: shape and the model's answer to 2 + 1
    assert "'role': 'text'" in printed and "'control':" in printed  # the probes example's best probe
    assert "torch.Size([1, 4, 8])" in printed  # its patching grid: [kind, layer, position]
    assert "sweep 'unisandbox'" in printed and "9 runs" in printed
    missing = [f for f in EXPECT_FILES if not (tmp_path / f).exists()]
    assert not missing, f"README steps did not write {missing}"


@pytest.mark.parametrize(
    "key",
    [pytest.param(k, marks=pytest.mark.slow) for k in sorted(SLOW)]
    + [pytest.param(k, marks=[pytest.mark.slow, pytest.mark.heavy]) for k in sorted(HEAVY)],
)
def test_readme_heavy_command_runs_verbatim(key: str, tmp_path: Path) -> None:
    (step,) = [s for s in readme_steps() if s.key == key]
    run_step(step, tmp_path, timeout=3600)
    written = [p for p in (tmp_path / "artifacts").rglob("*") if p.is_file()]
    assert written, f"{key} wrote nothing under artifacts/"
