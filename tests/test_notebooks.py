"""The notebooks execute top to bottom on the offline smoke path (CALFUSE_NOTEBOOK_SMOKE=1), are
committed without outputs, and open with a Colab badge and an install cell."""

import csv
import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"


def load(name):
    return nbformat.read(NOTEBOOKS / name, as_version=4)


def execute(name, workdir, monkeypatch):
    """Runs every cell in a fresh kernel whose working directory is `workdir`."""
    # The kernel inherits this environment: offline smoke path, results under workdir, and the
    # checkout importable even where it is not pip-installed (so the install cell is a no-op).
    monkeypatch.setenv("CALFUSE_NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("CALFUSE_NOTEBOOK_WORKDIR", str(workdir / "runs"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    monkeypatch.setenv("PYTHONPATH", path)
    notebook = load(name)
    client = NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}
    )
    client.execute()
    return notebook


def text_output(notebook):
    chunks = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            chunks.append(output.get("text", ""))
            chunks.append(output.get("data", {}).get("text/markdown", ""))
    return "".join(chunks)


@pytest.mark.parametrize("name", ["quickstart.ipynb", "ablations.ipynb"])
def test_committed_without_outputs_with_badge_and_install_cell(name):
    notebook = load(name)
    nbformat.validate(notebook)
    first, install = notebook.cells[0], notebook.cells[2]
    assert first.cell_type == "markdown" and "colab-badge.svg" in first.source
    assert f"notebooks/{name}" in first.source
    assert install.cell_type == "code" and 'find_spec("calfuse_jax") is None' in install.source
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, "strip the outputs"


def test_quickstart_runs_the_demo(tmp_path, monkeypatch):
    notebook = execute("quickstart.ipynb", tmp_path, monkeypatch)
    out = text_output(notebook)
    assert "using a tiny random CLIP" in out  # the offline fallback was taken
    assert "Avg " in out and "Last " in out
    run = tmp_path / "runs" / "demo-smoke"
    assert (run / "summary.json").is_file() and (run / "checkpoints").is_dir()
    outputs = [o for cell in notebook.cells for o in cell.get("outputs", [])]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert images, "the accuracy curve and matrix figure is missing"


def test_ablations_runs_the_method_grid(tmp_path, monkeypatch):
    notebook = execute("ablations.ipynb", tmp_path, monkeypatch)
    out = text_output(notebook)
    assert "| calfuse |" in out and "| zeroshot |" in out
    with open(tmp_path / "runs" / "method-grid" / "ablation.csv") as f:
        last = {row["method"]: float(row["last"]) for row in csv.DictReader(f)}
    assert list(last) == ["calfuse", "rapf", "finetune", "zeroshot"]
    assert last["calfuse"] >= last["rapf"] >= last["finetune"], last
