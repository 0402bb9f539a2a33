"""Figure and data export: PNG/SVG/PDF through Kaleido 1.x and the system Chromium, self-contained HTML,
CSV/Parquet, a zip per page, and ``export_figures`` behind ``opdviz figures``.

Kaleido starts one Chromium per export unless a server is running (2–7 s each); the first static
export starts its sync server once (``mathjax=False``: otherwise it reaches for a CDN), later ones take
~0.2 s. Nothing is started at import and nothing is downloaded: without Chromium the export raises
``ExportError`` saying so.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import io
import json
import zipfile
from pathlib import Path
from typing import Callable, Iterable

import pandas as pd
import plotly.graph_objects as go

from opdviz.views.csvsafe import to_csv
from opdviz.errors import OpdvizError
from opdviz.views.facets import facet_note
from opdviz.views.style import paper_style

STATIC_FORMATS = ("png", "svg", "pdf")
FIGURE_FORMATS = STATIC_FORMATS + ("html",)
DATA_FORMATS = ("csv", "parquet")
PNG_SCALE = 300 / 96          # layout px are CSS px (96/in): scale to ~300 dpi


class ExportError(OpdvizError):
    """A figure or table could not be exported (missing Chromium, unknown format)."""


@functools.lru_cache(maxsize=1)
def _server_started() -> bool:
    """Start Kaleido's sync server once, lazily; False when this Kaleido has no such API."""
    import kaleido

    start = getattr(kaleido, "start_sync_server", None)
    if start is None:
        return False
    try:
        start(mathjax=False, silence_warnings=True)
    except TypeError:      # an older/newer signature: fall back to one Chromium per export
        return False
    return True


def _render(fig_dict: dict, opts: dict) -> bytes:
    import kaleido
    from kaleido.errors import ChromeNotFoundError

    try:
        if _server_started():
            return kaleido.calc_fig_sync(fig_dict, opts=opts)
        return kaleido.calc_fig_sync(fig_dict, opts=opts, kopts={"mathjax": False})
    except ChromeNotFoundError as exc:
        raise ExportError("static export needs Chrome or Chromium, and none was found. Install Debian's "
                          "`chromium` package (apt-get install chromium) or export as html/csv instead.") from exc


def figure_bytes(fig: go.Figure, fmt: str, scale: float | None = None) -> bytes:
    """``fig`` as png, svg, pdf (through Kaleido) or html (interactive, plotly.js inlined so it opens
    offline, ~4.5 MB). Static formats use the figure's own width/height (set them with ``paper_style``)."""
    fmt = fmt.lower()
    if fmt == "html":
        return fig.to_html(include_plotlyjs=True, full_html=True,
                           config={"displaylogo": False, "toImageButtonOptions": {"format": "svg"}}).encode()
    if fmt not in STATIC_FORMATS:
        raise ExportError(f"unknown figure format {fmt!r}; use one of {', '.join(FIGURE_FORMATS)}")
    fig_dict = fig.to_dict()
    layout = fig_dict.get("layout", {})
    opts = {"format": fmt, "width": layout.get("width") or 700, "height": layout.get("height") or 500,
            "scale": scale or (PNG_SCALE if fmt == "png" else 1)}
    return _render(fig_dict, opts)


def data_bytes(df: pd.DataFrame, fmt: str) -> bytes:
    """``df`` as csv (UTF-8, no index; text cells that would run as spreadsheet formulas are quoted by
    ``opdviz.views.csvsafe``) or parquet."""
    fmt = fmt.lower()
    if fmt == "csv":
        return to_csv(df).encode()
    if fmt == "parquet":
        buf = io.BytesIO()
        df.to_parquet(buf, index=False)
        return buf.getvalue()
    raise ExportError(f"unknown data format {fmt!r}; use csv or parquet")


def _styled(fig: go.Figure, fmt: str, width: str) -> go.Figure:
    return paper_style(fig, width) if fmt in STATIC_FORMATS else fig


def _file_stem(key: str) -> str:
    return key.replace(".", "-")


def all_specs(pages: Iterable[str] | None = None) -> list:
    """FigureSpecs of ``pages`` (default: every page, single-run and across-run), in page order."""
    from opdviz.views.registry import FIGURES, PAGES

    order = PAGES
    wanted = tuple(pages) if pages else order
    unknown = [p for p in wanted if p not in order]
    if unknown:
        raise ExportError(f"unknown page {', '.join(map(repr, unknown))}; pages are {', '.join(order)}")
    return [f for p in wanted for f in FIGURES if f.page == p]


def _spec(key: str):
    return next((f for f in all_specs() if f.key == key), None)


def manifest(store, sel, ctx, runs: Iterable[str] | None = None) -> dict:
    """Provenance of an export: the store, the runs shown (paths, fingerprints, sizes, analysis options,
    package versions, device, how many matrices have approximate spectra), the filters and page choices,
    the opdviz version and the date. ``export_figures`` and ``page_zip`` write it as ``manifest.json``
    next to the figures, with a ``figures`` list (file, data CSV, key, title, caption) added."""
    from opdviz import __version__
    from opdviz.store import queries as Q
    from opdviz.views.tables import provenances

    run_ids = list(runs if runs is not None else (sel.runs or Q.runs(store)["run_id"]))
    approx = Q.long_metrics(store, dataclasses.replace(sel, runs=tuple(run_ids), leaves_only=False),
                            ("spectrum_exact",)) if run_ids else None
    n_approx = ({} if approx is None or approx.empty
                else (approx["value"] == 0).groupby(approx["run_id"]).sum().astype(int).to_dict())
    out_runs = []
    every = provenances(store)
    for r in run_ids:
        prov = every.get(r)
        if prov:
            prov["approx_spectra"] = int(n_approx.get(r, 0))
            out_runs.append(prov)
    return {
        "opdviz_version": __version__,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "store": str(Path(store.db_path).resolve()),
        "filters": _plain(dataclasses.asdict(sel)),
        "view": _plain(dataclasses.asdict(ctx)) if dataclasses.is_dataclass(ctx) else {},
        "runs": out_runs,
        "approximate": {r["run_id"]: r["approx_spectra"] for r in out_runs if r["approx_spectra"]},
        "units": "CSV values keep the stored units: fractions in [0, 1] (shown in % on figures), ratios, "
                 "radians (shown in degrees), counts; see the metric catalog in the README.",
        "figures": [],
    }


def _plain(v):
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def _manifest_bytes(man: dict) -> bytes:
    return json.dumps(man, indent=2, ensure_ascii=False, default=str).encode()


def _approx_note(man: dict | None) -> str:
    if not man or not man.get("approximate"):
        return ""
    runs = ", ".join(f"{r} ({n} matrices)" for r, n in man["approximate"].items())
    return ("Approximate (≈): spectra from the randomized top-k solver in " + runs + "; spectral and geometry "
            "numbers of those matrices are approximate (see the README, 'Exact and approximate spectra').")


def page_zip(items: list[tuple[str, go.Figure, pd.DataFrame]], fmt: str = "pdf", width: str = "single",
             manifest: dict | None = None) -> bytes:
    """A zip of figures (paper style for static formats) + their CSV data + README.txt with the captions
    + ``manifest.json`` (provenance: pass ``manifest(store, sel, ctx)``; without it only the figure list).

    ``items`` are (FigureSpec key, figure, data) triples; keys not in the registry get their figure title."""
    buf = io.BytesIO()
    man = dict(manifest or {"figures": []})
    man["figures"] = []
    readme = ["Figures exported by opdviz. Each figure comes with the data behind it (CSV); manifest.json says "
              "where the numbers came from.", ""]
    note = _approx_note(man)
    if note:
        readme += [note, ""]
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key, fig, df in items:
            stem = _file_stem(key)
            zf.writestr(f"{stem}.{fmt}", figure_bytes(_styled(fig, fmt, width), fmt))
            zf.writestr(f"{stem}.csv", data_bytes(df, "csv"))
            spec = _spec(key)
            title = spec.title if spec else (fig.layout.title.text or key)
            caption = _with_facet_note(spec.caption if spec else "", fig)
            man["figures"].append({"key": key, "file": f"{stem}.{fmt}", "data": f"{stem}.csv", "title": title,
                                   "caption": caption})
            readme += [f"{stem}.{fmt} / {stem}.csv — {title}", f"  {caption}".rstrip(), ""]
        zf.writestr("README.txt", "\n".join(readme))
        zf.writestr("manifest.json", _manifest_bytes(man))
    return buf.getvalue()


def _with_facet_note(caption: str, fig: go.Figure) -> str:
    """The caption, plus which panels a facet grid drew when it drew only some (``facets.facet_note``)."""
    note = facet_note(fig)
    return f"{caption} {note}".strip() if note else caption


def is_empty(fig: go.Figure) -> bool:
    """True for the 'no data for this selection' placeholder figure."""
    return isinstance(fig.layout.meta, dict) and bool(fig.layout.meta.get("empty"))


def export_figures(store, sel, ctx, out_dir: str | Path, fmt: str = "pdf", pages: Iterable[str] | None = None,
                   width: str = "single", on_skip: Callable[[str, str], None] | None = None,
                   only: Iterable[str] | None = None, scale: float | None = None) -> list[Path]:
    """Build every figure of ``pages`` (default: all, Overlap and Trajectory included; ``only``: just these
    figure keys) and write ``<key>.<fmt>`` plus ``<key>.csv``, a README.txt of captions and ``manifest.json``
    (provenance: store, runs with paths and fingerprints, options, filters, version, date) into ``out_dir``.
    Figures without data are skipped (reported to ``on_skip``). ``scale``: PNG pixel ratio (default ~300 dpi).
    Returns the written paths."""
    if fmt not in FIGURE_FORMATS:
        raise ExportError(f"unknown figure format {fmt!r}; use one of {', '.join(FIGURE_FORMATS)}")
    specs = all_specs(pages)
    if only:
        keys = set(only)
        unknown = keys - {f.key for f in all_specs()}
        if unknown:
            raise ExportError(f"unknown figure {', '.join(sorted(unknown))}; known: "
                              + ", ".join(f.key for f in all_specs()))
        specs = [f for f in specs if f.key in keys]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    man = manifest(store, sel, ctx)
    written, readme = [], []
    for spec in specs:
        fig, df = spec.build(store, sel, ctx)
        if is_empty(fig):
            if on_skip:
                on_skip(spec.key, "no data for this selection")
            continue
        stem = _file_stem(spec.key)
        path = out / f"{stem}.{fmt}"
        path.write_bytes(figure_bytes(_styled(fig, fmt, width), fmt, scale))
        data = out / f"{stem}.csv"
        data.write_bytes(data_bytes(df, "csv"))
        written += [path, data]
        caption = _with_facet_note(spec.caption, fig)
        man["figures"].append({"key": spec.key, "file": path.name, "data": data.name, "title": spec.title,
                               "caption": caption})
        readme += [f"{path.name} — {spec.title}", f"  {caption}", ""]
    if written:
        note = _approx_note(man)
        (out / "README.txt").write_text("Figures exported by opdviz (see each CSV for the data, manifest.json for "
                                        "where it came from).\n\n" + (note + "\n\n" if note else "")
                                        + "\n".join(readme))
        (out / "manifest.json").write_bytes(_manifest_bytes(man))
        written += [out / "README.txt", out / "manifest.json"]
    return written
