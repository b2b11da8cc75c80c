"""The namespace and the front door: ``import uniprobe as up``, from any folder and from a wheel.

Research repositories have their own ``experiments/`` and ``hooks/`` packages: run from there, the
toolkit's imports must still resolve to ``uniprobe.*`` and never to the user's folders.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import venv
from pathlib import Path

import pytest
import torch

import uniprobe as up

REPO = Path(__file__).resolve().parents[1]

# the README quickstart as a user types it (test_readme_quickstart_is_this keeps README.md in step)
QUICKSTART = """\
import uniprobe as up

loaded = up.load_model("sandbox-ar")
out, cache = loaded.run_with_cache("what is 2 + 1 ?", "blocks.*.resid_post")
print(cache["blocks.3.resid_post"].shape, loaded.token_str(int(up.logits_of(out)[0, -1].argmax())))
store = loaded.capture_dataset(["what is 2 + 1 ?", "what is 3 + 1 ?"], "blocks.*.resid_post", "store")
print(store.n_examples, store.points[:2])
"""


def _run(python: str, code: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([python, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=600, env=env)


def _shadowing_folder(tmp: Path) -> Path:
    """A research repo with its own ``experiments`` and ``hooks`` packages that would shadow ours."""
    tmp.mkdir(parents=True, exist_ok=True)
    for name in ("experiments", "hooks", "probes"):
        (tmp / name).mkdir()
        (tmp / name / "__init__.py").write_text("raise ImportError('the user folder was imported')\n")
    return tmp


def test_public_names_resolve_and_have_docstrings() -> None:
    assert up.__version__ and up.__version__ != "0+unknown"
    for name in up.__all__:
        if name == "__version__":
            continue
        obj = getattr(up, name)
        assert obj.__doc__, f"uniprobe.{name} has no docstring"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        up.nope  # noqa: B018


def test_bare_layer_packages_are_not_installed(tmp_path: Path) -> None:
    names = ("hooks", "probes", "experiments")
    code = f"import importlib.util as u; print([u.find_spec(n) is None for n in {names!r}])"
    res = _run(sys.executable, code, tmp_path)
    assert res.stdout.strip() == "[True, True, True]", res.stderr


def test_loaded_model_front_door() -> None:
    loaded = up.load_model("tiny-llama")
    out, cache = loaded.run_with_cache(["t1 t2 t3", "t4 t5 t6"], "blocks.*.resid_post")
    assert cache["blocks.1.resid_post"].shape == (2, 3, loaded.model.config.hidden_size)
    assert out.logits.shape[:2] == (2, 3)
    assert loaded.token_id("t7") == 7 and loaded.token_str(7) == "t7"
    assert "blocks.0.resid_post" in loaded.points()
    inputs = loaded.prepare("t1 t2")
    assert inputs.kwargs["input_ids"].tolist() == [[1, 2]]
    with pytest.raises(ValueError, match="'t999' is 0 tokens|not a token"):
        loaded.token_id("t999")


def test_front_door_on_a_sandbox_model_and_generation() -> None:
    loaded = up.load_model("sandbox-ar")
    out, cache = loaded.run_with_cache("what is 2 + 1 ?", "blocks.*.resid_post", roles=["text"])
    rows = cache.rows("blocks.3.resid_post")
    assert len(rows) > 0 and set(rows.role.tolist()) == {0}
    assert loaded.token_str(loaded.token_id("3")) == "3"
    tokens, gen = loaded.run_with_cache(
        "draw as many banana as 9 - 7", "blocks.1.resid_post", mode="generate"
    )
    assert tokens.shape == (1, 9)
    assert len(gen.rows("blocks.1.resid_post")) > 0
    with pytest.raises(ValueError, match="not a word"):
        loaded.token_id("bananas")


def test_quickstart_runs_from_a_folder_with_its_own_experiments_package(tmp_path: Path) -> None:
    folder = _shadowing_folder(tmp_path)
    res = _run(sys.executable, QUICKSTART, folder)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "torch.Size([1, 8, 128])" in res.stdout and "2 ['blocks.0.resid_post'" in res.stdout
    cli = subprocess.run(
        [sys.executable, "-m", "uniprobe", "--version"],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode == 0 and cli.stdout.strip() == f"uniprobe {up.__version__}", cli.stderr


def test_readme_quickstart_is_this() -> None:
    readme = (REPO / "README.md").read_text()
    for line in QUICKSTART.splitlines():
        if line.strip() and not line.startswith("print("):
            assert line in readme, f"README quickstart lacks: {line}"


@pytest.mark.slow
def test_quickstart_from_a_wheel_install(tmp_path: Path) -> None:
    """``pip wheel .`` → a fresh venv (the dependencies visible through a path file, the wheel
    installed without them, offline) → the quickstart and the CLI from a shadowing folder."""
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
         str(REPO)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = wheels.glob("uniprobe-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = next((env_dir / "lib").glob("python3*/site-packages"))
    deps = Path(torch.__file__).resolve().parents[1]  # the site-packages holding the dependencies
    # a plain path file: the dependencies' folder is added, its own .pth files (our editable
    # install's finder among them) are not run, so only the wheel can provide uniprobe
    (site / "deps.pth").write_text(f"{deps}\n")
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr[-2000:]
    folder = _shadowing_folder(tmp_path / "research")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = _run(str(python), "import uniprobe; print(uniprobe.__file__)", folder, env)
    assert str(site) in where.stdout, (where.stdout, where.stderr)
    res = _run(str(python), QUICKSTART, folder, env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "torch.Size([1, 8, 128])" in res.stdout
    configs = _run(
        str(python),
        textwrap.dedent("""\
            from importlib.resources import files
            root = files("uniprobe.experiments")
            print(sorted(p.name for p in (root / "configs").iterdir()))
            ckpt = files("uniprobe.experiments.sandbox") / "checkpoints" / "ar"
            print((ckpt / "model.safetensors").is_file())
        """),
        folder,
        env,
    )
    assert "unisandbox.yaml" in configs.stdout, configs.stderr
    assert "True" in configs.stdout, configs.stderr
