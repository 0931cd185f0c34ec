"""research/eda.ipynb runs top to bottom on the shared NEU images."""

from __future__ import annotations

import os

import nbformat
import pytest
from conftest import REPO
from nbclient import NotebookClient

pytestmark = pytest.mark.integration


def test_eda_notebook_executes(tmp_path, neu_images, monkeypatch):
    monkeypatch.setenv("EDA_ARTIFACTS", str(tmp_path / "artifacts"))
    monkeypatch.setenv("METAL_DEFECT_HOME", str(REPO))
    notebook = nbformat.read(REPO / "research" / "eda.ipynb", as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "".join(o.get("text", "") for cell in notebook.cells for o in cell.get("outputs", []))
    assert "patches_105.jpg" in text or "patches_101.jpg" in text
    assert "crazing" in text and os.path.isdir(tmp_path / "artifacts" / "runs")
