"""The README is the truth: every option, command, metric family and store column is documented."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from opdviz.cli import COMMANDS, build_parser
from opdviz.metrics.registry import all_families
from opdviz.options import AnalysisOptions
from opdviz.io.safefiles import SETTINGS
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
    extras = re.findall(r'-e "(\.\[[a-z,]+\])"', ci)
    assert extras and all(e in blocks[1] for e in extras), "the README's test command installs other extras than CI"
    assert ('".[ray]"' in ci) == ('".[ray]"' in blocks[1])
    assert "--no-deps -e ." in ci and "--no-deps -e ." in blocks[1]


def test_metric_table_is_the_catalog():
    """The README's metric table is ``registry.markdown_table()``, units and pooling rules included."""
    from opdviz.metrics.registry import markdown_table

    assert markdown_table() in README


SECURITY = (Path(__file__).resolve().parents[1] / "SECURITY.md").read_text()


def _confining_settings() -> set[str]:
    from opdviz.io import folders, roots, uploads

    return {v for mod in (roots, folders, uploads) for k, v in vars(mod).items() if k.endswith("_ENV") and isinstance(v, str)}


def test_every_confining_setting_is_documented():
    settings = _confining_settings()
    assert {"OPDVIZ_STORE_ROOTS", "OPDVIZ_CHECKPOINT_ROOTS", "OPDVIZ_UPLOAD_SESSION_MB",
            "OPDVIZ_UPLOAD_TOTAL_MB", "OPDVIZ_UPLOAD_MAX_AGE_H"} <= settings
    for name in sorted(settings):
        assert f"| `{name}` |" in SECURITY, f"{name} missing from SECURITY.md's settings table"
        assert f"`{name}`" in README, f"{name} missing from the README"
    assert "](SECURITY.md)" in README


@pytest.mark.parametrize("setting", [s.env for s in SETTINGS])
def test_every_checkpoint_limit_is_documented(setting):
    assert f"`{setting}`" in README
