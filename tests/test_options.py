"""Tests of opdviz.options' criteria vocabulary: one definition of every 'changed' criterion.

The criteria (names, order, labels) are defined once, in ``opdviz.options``; every list of them elsewhere
derives from it. The scan below fails when a list of criterion names, a table keyed by criterion kinds,
or a criterion name built by hand is typed again in the package or the pages.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from opdviz.options import (CRITERION_KINDS, CRITERION_TEXT, DEFAULT_CRITERIA, DEFAULT_CRITERION, LAB_CRITERIA,
                            AnalysisOptions, criterion_label, criterion_name, criterion_sort_key)

ROOT = Path(__file__).resolve().parents[1]
DEFINING = ROOT / "opdviz" / "options.py"
_NAME = re.compile(r"^(exact|(abs|relrms|bf16)_\d[\de.+-]*)$")
_BUILT = re.compile(r"^(abs|relrms|bf16)_$")


def _sources() -> list[Path]:
    files = [*sorted((ROOT / "opdviz").rglob("*.py")), *sorted((ROOT / "pages").glob("*.py")), ROOT / "app.py"]
    return [f for f in files if f.exists() and f != DEFINING]


def _strings(nodes) -> list[str]:
    return [n.value for n in nodes if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def _retyped(tree: ast.AST) -> list[tuple[int, str]]:
    """Literal collections of ≥ 2 criterion names or ≥ 3 criterion kinds, and f-strings that spell a name."""
    found = []
    for node in ast.walk(tree):
        items = (node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set))
                 else node.keys if isinstance(node, ast.Dict) else None)
        if items is not None:
            strings = _strings(items)
            names = [s for s in strings if _NAME.match(s)]
            kinds = set(strings) & set(CRITERION_KINDS)
            if len(names) >= 2 or len(kinds) >= 3:
                found.append((node.lineno, ", ".join(names or sorted(kinds))))
        if isinstance(node, ast.JoinedStr) and node.values:
            head = node.values[0]
            if isinstance(head, ast.Constant) and isinstance(head.value, str) and _BUILT.match(head.value):
                found.append((node.lineno, f"f-string {head.value}{{…}}"))
    return found


def test_criteria_are_defined_once():
    offenders = [f"{path.relative_to(ROOT)}:{line}: {what}"
                 for path in _sources() for line, what in _retyped(ast.parse(path.read_text(), str(path)))]
    assert not offenders, ("criteria re-typed outside opdviz/options.py (derive them from DEFAULT_CRITERIA, "
                           "LAB_CRITERIA, CRITERION_KINDS, criterion_name or criterion_label):\n" + "\n".join(offenders))


def test_the_scan_catches_a_retyped_list():
    tree = ast.parse('A = ("exact", "abs_1e-5")\nB = {"exact": 0, "abs": 1, "relrms": 2}\nC = f"abs_{x}"\n'
                     'D = ("auto", "exact", "approx")\n')
    assert [line for line, _ in _retyped(tree)] == [1, 2, 3]


def test_names_order_and_defaults():
    opts = AnalysisOptions()
    assert opts.criteria() == DEFAULT_CRITERIA == tuple(n for n, _, _ in opts.thresholds())
    assert DEFAULT_CRITERIA[0] == "exact" and DEFAULT_CRITERION == opts.criterion == "abs_1e-5"
    assert set(LAB_CRITERIA) <= set(DEFAULT_CRITERIA)
    assert sorted(DEFAULT_CRITERIA, key=criterion_sort_key) == list(DEFAULT_CRITERIA)
    assert criterion_name("abs", 1e-5) == "abs_1e-5" and criterion_name("exact") == "exact"
    assert set(CRITERION_TEXT) == set(CRITERION_KINDS)


@pytest.mark.parametrize("name, style, text", [
    ("abs_1e-5", "short", "|ΔW| > 1e-5"), ("exact", "short", "bitwise"), ("exact", "long", "exact: any stored bit changed"),
    ("relrms_1e-3", "long", "|ΔW| > 1e-3·RMS(W_base)"), ("bf16_1e-3", "unchanged", "|ΔW| ≤ 1e-3·max|W|"),
    ("other", "short", "other"),
])
def test_criterion_label(name, style, text):
    assert criterion_label(name, style) == text
