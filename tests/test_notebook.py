"""examples/dino_quickstart.ipynb runs headless from the first cell to the last in a fresh kernel of this
Python (about two minutes on two CPU cores: it pretrains for two epochs)."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.helpers import REPO

pytestmark = pytest.mark.slow

NOTEBOOK = REPO / "examples" / "dino_quickstart.ipynb"
KERNEL = "dino-train-tests"


def _kernelspec(jupyter_dir: Path) -> Path:
    """A kernelspec that starts ipykernel with this interpreter (the venv's under ``make test``).

    Registered in a temporary Jupyter path rather than relying on the name ``python3``: a ``python3``
    spec in the user's Jupyter folder (searched before the venv's) could start another Python, and
    nothing is written into the venv or the home folder.
    """
    spec = jupyter_dir / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    spec_json = {"argv": argv, "display_name": "dino-train tests", "language": "python"}
    (spec / "kernel.json").write_text(json.dumps(spec_json))
    return jupyter_dir


def _outputs(nb: nbformat.NotebookNode) -> tuple[str, list[str]]:
    """All text the cells printed or returned, and the MIME types of their rich outputs."""
    text, mimes = [], []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                text.append(out["text"])
            elif "data" in out:
                text.append(out["data"].get("text/plain", ""))
                mimes.extend(out["data"])
    return "".join(text), mimes


def test_quickstart_notebook_runs_headless(tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_PATH", str(_kernelspec(tmp_path / "jupyter")))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))  # no user profile or startup scripts
    # The kernel imports the project from the checkout even where it is not installed.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    cwd = tmp_path / "cwd"  # the notebook's relative paths (runs/notebook/...) land here, not in the repo
    cwd.mkdir()
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit it without outputs"

    client = NotebookClient(
        nb, timeout=900, startup_timeout=120, kernel_name=KERNEL, resources={"metadata": {"path": str(cwd)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback, when a cell fails

    text, mimes = _outputs(nb)
    assert re.search(r"k-NN top-1 accuracy \(k=20\): \d+\.\d%", text), text[-3000:]
    assert re.search(r"linear probe top-1 accuracy: \d+\.\d%", text), text[-3000:]
    assert "image/png" in mimes, "the attention figure was not drawn"
    assert (cwd / "runs" / "notebook" / "run" / "checkpoint.pth").is_file()
