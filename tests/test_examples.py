"""The example notebooks run from scratch (so they cannot rot): executed with nbclient on a kernel that is
this interpreter, with the store in a temporary folder."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))


def _kernel(tmp_path: Path, monkeypatch) -> str:
    """A kernelspec that runs this Python (the project's venv), found through JUPYTER_PATH; every Jupyter and
    IPython file goes under ``tmp_path`` (nothing is written to the home folder)."""
    name = "opdviz-tests"
    spec = tmp_path / "jupyter" / "kernels" / name
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "opdviz tests", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "jupyter-data"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "jupyter-runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.setenv("PYTHONPATH", str(EXAMPLES.parent))
    return name


def test_there_is_a_quickstart():
    assert EXAMPLES / "quickstart.ipynb" in NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_are_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code")


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_and_its_figures_are_offline(path, tmp_path, monkeypatch):
    db = tmp_path / "store" / "demo.duckdb"
    monkeypatch.setenv("OPDVIZ_DB", str(db))
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, kernel_name=_kernel(tmp_path, monkeypatch), timeout=600,
                            resources={"metadata": {"path": str(EXAMPLES)}})
    client.execute()                      # raises CellExecutionError with the cell's traceback on any error
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    # the store was built where OPDVIZ_DB said, and the working tree was not written
    assert db.exists() and not (EXAMPLES / "data").exists()
    figures = [o for o in outputs if "application/vnd.plotly.v1+json" in o.get("data", {})]
    if path.name == "quickstart.ipynb":
        assert len(figures) == 3
        for o in figures:
            spec = o["data"]["application/vnd.plotly.v1+json"]
            assert spec["data"] and not any("no data" in (a.get("text") or "")
                                            for a in spec.get("layout", {}).get("annotations", []))
        tables = [o for o in outputs if "text/html" in o.get("data", {}) and "<table" in o["data"]["text/html"]]
        assert len(tables) >= 4
    # offline: figures go out as plotly JSON, drawn by the plotly.js that Jupyter's plotly extension bundles;
    # no output loads a script from the network (plotly's "notebook" renderers add MathJax/plotly.js CDN tags)
    html = "\n".join(o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {}))
    assert not re.search(r"<script[^>]+src=[\"']?https?://", html) and "cdn.plot.ly" not in html
    assert not re.search(r"import\s+[\"']https?://", html)
