"""opdviz.metrics is pure: functions of tensors and options that import no I/O, store, views, app or demo lab."""

from __future__ import annotations

import ast
from pathlib import Path


METRICS = Path(__file__).resolve().parents[2] / "opdviz" / "metrics"
FORBIDDEN = ("opdviz.io", "opdviz.engine", "opdviz.store", "opdviz.views", "opdviz.dashboard", "opdviz.cli",
             "opdviz.lab", "opdviz.api", "opdviz.results", "opdviz.integrations", "streamlit")


def _imports(path: Path) -> set[str]:
    """Every module imported anywhere in the file, at import time or inside a function."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module)
    return out


def test_metrics_import_nothing_outside_the_pure_layer():
    bad = {f"{p.name}: {m}" for p in sorted(METRICS.glob("*.py")) for m in _imports(p)
           if m.startswith(FORBIDDEN)}
    assert not bad, sorted(bad)


def test_the_catalog_loads_without_torch():
    """The views, dashboard and CLI listings read the catalog; it must not pull in torch (~2 s)."""
    import subprocess
    import sys

    code = ("import sys; from opdviz.metrics.registry import all_families; assert len(all_families()) > 50; "
            "assert 'torch' not in sys.modules, 'the catalog imported torch'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=METRICS.parents[1])
