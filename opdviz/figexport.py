"""Figure and data export: PNG/SVG/PDF through Kaleido 1.x and the system Chromium, self-contained HTML,
CSV/Parquet, a zip per page, and ``export_figures`` behind ``opdviz figures``.

Kaleido starts one Chromium per export unless a server is running (2–7 s each); the first static
export starts its sync server once (``mathjax=False``: otherwise it reaches for a CDN), later ones take
~0.2 s. Nothing is started at import and nothing is downloaded: without Chromium the export raises
``ExportError`` saying so.
"""

from __future__ import annotations

import functools
import io
import zipfile
from pathlib import Path
from typing import Callable, Iterable

import pandas as pd
import plotly.graph_objects as go

from .csvsafe import to_csv
from .errors import OpdvizError
from .figures import paper_style

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
    ``opdviz.csvsafe``) or parquet."""
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


def page_zip(items: list[tuple[str, go.Figure, pd.DataFrame]], fmt: str = "pdf", width: str = "single") -> bytes:
    """A zip of figures (paper style for static formats) + their CSV data + README.txt with the captions.

    ``items`` are (FigureSpec key, figure, data) triples; keys not in the registry get their figure title."""
    from .views import FIGURES

    specs = {f.key: f for f in FIGURES}
    buf = io.BytesIO()
    readme = ["Figures exported by opdviz. Each figure comes with the data behind it (CSV).", ""]
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key, fig, df in items:
            stem = _file_stem(key)
            zf.writestr(f"{stem}.{fmt}", figure_bytes(_styled(fig, fmt, width), fmt))
            zf.writestr(f"{stem}.csv", data_bytes(df, "csv"))
            spec = specs.get(key)
            title = spec.title if spec else (fig.layout.title.text or key)
            readme += [f"{stem}.{fmt} / {stem}.csv — {title}", f"  {spec.caption if spec else ''}".rstrip(), ""]
        zf.writestr("README.txt", "\n".join(readme))
    return buf.getvalue()


def is_empty(fig: go.Figure) -> bool:
    """True for the 'no data for this selection' placeholder figure."""
    return isinstance(fig.layout.meta, dict) and bool(fig.layout.meta.get("empty"))


def export_figures(store, sel, ctx, out_dir: str | Path, fmt: str = "pdf", pages: Iterable[str] | None = None,
                   width: str = "single", on_skip: Callable[[str, str], None] | None = None) -> list[Path]:
    """Build every figure of ``pages`` (default: all) and write ``<key>.<fmt>`` plus ``<key>.csv`` and a
    README.txt of captions into ``out_dir``. Figures without data are skipped (reported to ``on_skip``).
    Returns the written paths."""
    from .views import PAGES, figures_for

    if fmt not in FIGURE_FORMATS:
        raise ExportError(f"unknown figure format {fmt!r}; use one of {', '.join(FIGURE_FORMATS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written, readme = [], []
    for page in (tuple(pages) if pages else PAGES):
        for spec in figures_for(page):
            fig, df = spec.build(store, sel, ctx)
            if is_empty(fig):
                if on_skip:
                    on_skip(spec.key, "no data for this selection")
                continue
            stem = _file_stem(spec.key)
            path = out / f"{stem}.{fmt}"
            path.write_bytes(figure_bytes(_styled(fig, fmt, width), fmt))
            data = out / f"{stem}.csv"
            data.write_bytes(data_bytes(df, "csv"))
            written += [path, data]
            readme += [f"{path.name} — {spec.title}", f"  {spec.caption}", ""]
    if written:
        (out / "README.txt").write_text("Figures exported by opdviz (see each CSV for the data).\n\n"
                                        + "\n".join(readme))
        written.append(out / "README.txt")
    return written
