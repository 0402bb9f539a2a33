"""The dashboard uses Streamlit's public API only: no file of the package, the pages or app.py imports a
module of Streamlit's internals (``streamlit.runtime``, ``streamlit.web``, ``streamlit.elements``,
``streamlit.proto``…), which change without notice between releases.

Run: .venv/bin/pytest tests/dashboard/test_dashboard_imports.py -q
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PUBLIC = {"streamlit", "streamlit.components.v1", "streamlit.testing.v1"}   # the documented import paths
SOURCES = sorted([ROOT / "app.py", *(ROOT / "opdviz").rglob("*.py"), *(ROOT / "pages").rglob("*.py")])


def private_streamlit(tree: ast.AST) -> list[str]:
    """Streamlit modules named by ``tree``'s imports (or as a dotted string, e.g. for importlib) that are
    not public import paths."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names = [node.value] if node.value.startswith("streamlit.") and " " not in node.value else []
        else:
            continue
        found += [n for n in names if (n == "streamlit" or n.startswith("streamlit.")) and n not in PUBLIC]
    return found


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_private_streamlit_module_is_imported(path):
    assert not private_streamlit(ast.parse(path.read_text(), str(path))), path


@pytest.mark.parametrize("source, private", [
    ("import streamlit as st", False),
    ("from streamlit.runtime.scriptrunner import get_script_run_ctx", True),
    ("import streamlit.web.bootstrap", True),
    ("from streamlit.runtime import pages_manager", True),
    ("importlib.import_module('streamlit.proto.ForwardMsg_pb2')", True),
    ("from streamlit.components.v1 import html", False),
])
def test_the_check_tells_private_from_public(source, private):
    assert bool(private_streamlit(ast.parse(source))) is private
