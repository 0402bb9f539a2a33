"""The README is the truth: every option, command, metric family and store column is documented."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from opdviz.cli import COMMANDS, build_parser
from opdviz.metrics.registry import all_families
from opdviz.options import AnalysisOptions
from opdviz.store import SCHEMAS

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(AnalysisOptions)])
def test_every_option_is_documented(field):
    assert f"`--{field.replace('_', '-')}" in README


def test_every_command_is_documented():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name in sub.choices:
        assert f"opdviz {name}" in README, name
    assert len(sub.choices) >= len(COMMANDS)


@pytest.mark.parametrize("family", [f.family for f in all_families()])
def test_every_metric_family_is_documented(family):
    assert f"`{family}`" in README


@pytest.mark.parametrize("table", sorted(SCHEMAS))
def test_every_store_column_is_documented(table):
    row = re.search(rf"^\| `{table}` \| (.*) \|$", README, re.M)
    assert row, f"table {table} missing from the README schema"
    for field in SCHEMAS[table]:
        assert re.search(rf"\b{field.name}\b", row.group(1)), f"{table}.{field.name}"


def test_readme_starts_with_the_two_commands():
    blocks = re.findall(r"```bash\n(.*?)\n```", README, re.S)
    assert "opdviz demo" in blocks[0] and "pip install -r requirements.txt" in blocks[0]
    assert "pytest" in blocks[1]
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert ".venv/bin/python -m pytest -q" in ci and ".venv/bin/python -m pytest -q" in blocks[1]
    # the README's test command installs what CI installs: the [ray] extra in both or in neither
    assert ('".[ray]"' in ci) == ('".[ray]"' in blocks[1])
    assert "--no-deps -e ." in ci and "--no-deps -e ." in blocks[1]


def test_metric_table_is_the_catalog():
    """The README's metric table is ``registry.markdown_table()``, units and pooling rules included."""
    from opdviz.metrics.registry import markdown_table

    assert markdown_table() in README
