"""Every notebook runs clean, top to bottom, with its default (small) settings; the real-models
notebook also runs on a checkpoint folder (a tiny model saved with a tokenizer) through its
``CHECKPOINT`` / ``DEVICE_MAP`` parameters."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
# inline PNG figures a notebook must show at least (any other notebook: one)
MIN_FIGURES = {
    "01_quickstart.ipynb": 2,
    "02_knowledge_flow.ipynb": 4,
    "03_real_models.ipynb": 9,
    "04_attention_flow.ipynb": 12,  # per model: attention map, 2 mass heatmaps, 2 knockouts, steering
}


@pytest.fixture(autouse=True)
def one_thread_kernel(monkeypatch):
    """Kernels start with torch on one thread: tiny models run fastest so, and steady on a shared machine."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def run(path: Path, **parameters) -> list[dict]:
    """Execute a notebook (``parameters`` appended to its parameters cell); its code outputs."""
    nb = nbformat.read(path, as_version=4)
    if parameters:
        cell = next(
            c for c in nb.cells if c.cell_type == "code" and all(f"{k} =" in c.source for k in parameters)
        )
        cell.source += "\n" + "\n".join(f"{k} = {v!r}" for k, v in parameters.items())
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    ).execute()
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]


def check(outputs: list[dict], min_figures: int) -> None:
    errors = [o for o in outputs if o.get("output_type") == "error"]
    assert not errors, "\n".join(f"{o['ename']}: {o['evalue']}" for o in errors)
    figures = sum("image/png" in o.get("data", {}) for o in outputs)
    assert figures >= min_figures, f"{figures} inline figures, expected at least {min_figures}"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_clean(path):
    check(run(path), MIN_FIGURES.get(path.name, 1))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["tiny-janus", "tiny-chameleon"])  # Emu3 shares the Chameleon path
def test_real_models_notebook_on_a_checkpoint_folder(family, tmp_path):
    """``CHECKPOINT`` set: the folder is loaded by ``load_model`` with ``DEVICE_MAP``, prompts are
    built with the folder's tokenizer (here word-level ``t0 … t63``; a real one encodes words)."""
    pytest.importorskip("accelerate")
    from uniprobe.experiments.tiny import build_tiny
    from uniprobe.hooks.backends.tl_backend import word_level_tokenizer

    model, info = build_tiny(family)
    if family == "tiny-janus":  # a Janus checkpoint names its image-start token here
        model.generation_config.generation_kwargs = {"boi_token_id": info["boi_token_id"]}
        model.generation_config._from_model_config = False  # saved as a checkpoint would be
    model.save_pretrained(tmp_path)
    word_level_tokenizer(info["vocab_size"], str(tmp_path))
    outputs = run(
        ROOT / "notebooks" / "03_real_models.ipynb",
        CHECKPOINT=str(tmp_path),
        DEVICE_MAP="cpu",
        KEYS=["t10", "t11", "t12", "t13"],
        FILLERS=[f"t{i}" for i in range(20, 28)],
        N_EXAMPLES=8,
    )
    check(outputs, 3)
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert f"{type(model).__name__}, adapter" in text
