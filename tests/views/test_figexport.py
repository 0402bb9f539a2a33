"""Export: PNG/SVG/PDF bytes through Kaleido + Chromium, offline HTML, CSV/Parquet, page zips, the CLI."""

from __future__ import annotations

import argparse
import io
import json
import shutil
import zipfile

import pandas as pd
import pytest
from synthetic import make_synthetic_store

from opdviz.views import export as X
from opdviz.cli import figures as cmd
from opdviz.errors import OpdvizError
from opdviz.store import Selection
from opdviz.views.context import ViewContext
from opdviz.views.registry import figure_spec

CHROMIUM = shutil.which("chromium") or shutil.which("/usr/bin/chromium")
needs_chromium = pytest.mark.skipif(not CHROMIUM, reason="static export needs Chromium (/usr/bin/chromium); "
                                                        "install Debian's chromium package")
MAGIC = {"png": b"\x89PNG\r\n\x1a\n", "pdf": b"%PDF"}


@pytest.fixture(scope="session")
def store(tmp_path_factory):
    return make_synthetic_store(tmp_path_factory.mktemp("export") / "s.duckdb", layers=3)


@pytest.fixture(scope="session")
def fig_df(store):
    return figure_spec("sparsity.layerwise").build(store, Selection(), ViewContext())


@needs_chromium
@pytest.mark.parametrize("fmt", ["png", "svg", "pdf"])
def test_static_formats(fig_df, fmt):
    data = X.figure_bytes(X.paper_style(fig_df[0], "single"), fmt)
    if fmt == "svg":
        assert data.lstrip().startswith(b"<svg") and b"</svg>" in data[-200:]
        assert b"layer index" in data
    else:
        assert data.startswith(MAGIC[fmt])


@needs_chromium
def test_png_is_300_dpi_of_the_paper_width(fig_df):
    data = X.figure_bytes(X.paper_style(fig_df[0], "single"), "png")
    width = int.from_bytes(data[16:20], "big")
    assert width == round(336 * X.PNG_SCALE)      # 3.5 in at ~300 dpi


def test_html_is_self_contained(fig_df):
    html = X.figure_bytes(fig_df[0], "html")
    assert b"<html" in html and b"<script src=\"http" not in html and len(html) > 1_000_000   # plotly.js inline


def test_data_formats(fig_df):
    df = fig_df[1]
    assert pd.read_csv(io.BytesIO(X.data_bytes(df, "csv"))).shape == df.shape
    assert pd.read_parquet(io.BytesIO(X.data_bytes(df, "parquet"))).shape == df.shape
    with pytest.raises(OpdvizError):
        X.data_bytes(df, "xlsx")
    with pytest.raises(OpdvizError):
        X.figure_bytes(fig_df[0], "eps")


@needs_chromium
def test_page_zip(store):
    items = [(k, *figure_spec(k).build(store, Selection(), ViewContext()))
             for k in ("sparsity.layerwise", "sparsity.sweep")]
    man = X.manifest(store, Selection(), ViewContext())
    zf = zipfile.ZipFile(io.BytesIO(X.page_zip(items, fmt="pdf", manifest=man)))
    names = set(zf.namelist())
    assert names == {"sparsity-layerwise.pdf", "sparsity-layerwise.csv", "sparsity-sweep.pdf",
                     "sparsity-sweep.csv", "README.txt", "manifest.json"}
    got = json.loads(zf.read("manifest.json"))
    assert [f["data"] for f in got["figures"]] == ["sparsity-layerwise.csv", "sparsity-sweep.csv"]
    assert got["store"] == str(store.db_path.resolve()) and got["opdviz_version"] and got["created_at"]
    assert {r["run_id"] for r in got["runs"]} == set(store.runs()["run_id"])
    assert all(r["base_path"] and r["post_fingerprint"] and r["options"] for r in got["runs"])
    assert zf.read("sparsity-sweep.pdf").startswith(b"%PDF")
    readme = zf.read("README.txt").decode()
    assert figure_spec("sparsity.sweep").caption in readme


def _parser():
    parser = argparse.ArgumentParser(prog="opdviz")
    cmd.register(parser.add_subparsers(dest="command"))
    return parser


@needs_chromium
def test_cli_figures_pdf(store, tmp_path, capsys):
    out = tmp_path / "figs"
    args = _parser().parse_args(["figures", "--db", str(store.db_path), "--run", "OPD", "--run", "SFT",
                                 "--out", str(out), "--format", "pdf", "--page", "overview", "--width", "double"])
    assert args.func(args) == 0
    pdfs = sorted(out.glob("*.pdf"))
    assert [p.name for p in pdfs] == ["overview-coverage.pdf", "overview-energy_share.pdf",
                                      "overview-sparsity_heatmap.pdf"]
    assert all(p.read_bytes().startswith(b"%PDF") for p in pdfs)
    data = pd.read_csv(out / "overview-energy_share.csv")
    assert set(data["run_id"]) == {"OPD", "SFT"}
    assert (out / "README.txt").exists()
    man = json.loads((out / "manifest.json").read_text())
    assert [r["run_id"] for r in man["runs"]] == ["OPD", "SFT"] and man["filters"]["runs"] == ["OPD", "SFT"]
    assert man["view"]["criterion"] == "abs_1e-5"
    assert sorted(f["file"] for f in man["figures"]) == [p.name for p in pdfs]
    assert "wrote" in capsys.readouterr().out


def test_cli_figures_html_tensor_page(store, tmp_path):
    out = tmp_path / "html"
    args = _parser().parse_args(["figures", "--db", str(store.db_path), "--out", str(out), "--format", "html",
                                 "--page", "tensor", "--criterion", "abs_1e-6"])
    assert args.func(args) == 0
    assert len(list(out.glob("tensor-*.html"))) == 5


@pytest.mark.parametrize("argv,message", [
    (["--db", "{tmp}/missing.duckdb"], "opdviz demo"),
    (["--run", "nope"], "no run named 'nope'"),
])
def test_cli_errors_say_what_to_do(store, tmp_path, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if "--db" not in argv:
        argv += ["--db", str(store.db_path)]
    args = _parser().parse_args(["figures", "--out", str(tmp_path / "o"), *argv])
    with pytest.raises(OpdvizError, match=message):
        args.func(args)
