"""One way to show a number: every page, table, figure label and export formats through here.

The unit of a number comes from the metric catalog (``opdviz.metrics.registry``: each family and each
view-level ``DERIVED`` number declares ``unit`` and ``agg``), so a ratio can never be shown as a
percent, nor a fraction as a bare 0.93. Stored values and CSV/Parquet exports keep the catalog's unit
(fractions stay fractions); only what a person reads is scaled:

    fraction → ×100 and "%"      ratio → plain      count → integer when whole
    radians → degrees and "°"    bytes → KiB/MiB/GiB   NaN → "—" (undefined, see the metric's doc)

    >>> from opdviz.views.formatting import format_value
    >>> format_value("sparsity_abs_1e-5", 0.93712), format_value("jaccard_ratio", 1.73)
    ('93.71 %', '1.73')

Also ``escape``: untrusted text (run names, method labels, tensor names) rendered literally in Plotly,
which otherwise interprets ``<b>``, ``<br>``, ``<a href>`` in titles, legends, hover and axis labels.
"""

from __future__ import annotations

import html
import json
import math
import re

from opdviz import options
from opdviz.metrics.registry import MetricInfo, agg_label, family_of

SCALE = {"fraction": 100.0, "radians": 180.0 / math.pi}
SUFFIX = {"fraction": " %", "percent": " %", "radians": "°"}
# printf formats for Streamlit's NumberColumn (applied to the display-scaled value)
PRINTF = {"fraction": "%.2f %%", "percent": "%.1f %%", "ratio": "%.3g", "count": "%.4g", "radians": "%.3g°",
          "weight": "%.3e", "weight²": "%.3e", "flag": "%d", "bytes": "%d"}
APPROX_MARK = "≈"


def info(name: str) -> MetricInfo | None:
    """The catalog entry of a metric or view column (stored metrics first, then ``DERIVED``); None
    for a column that is not a number of the catalog (run, tensor, layer…)."""
    try:
        return family_of(_strip(name), derived=True)
    except KeyError:
        return None


def _strip(name: str) -> str:
    # view columns add an aggregation suffix to a stored name: top16_energy_mean → top16_energy
    return re.sub(r"_(mean|median)$", "", name)


def unit_of(name: str) -> str:
    i = info(name)
    return i.unit if i else "text"


def scale_of(name: str) -> float:
    """Factor from the stored value to the shown one (100 for fractions, 180/π for radians, else 1)."""
    return SCALE.get(unit_of(name), 1.0)


def label_of(name: str, with_unit: bool = True) -> str:
    """Display label, with the unit in brackets (``sparsity (%)``, ``stable rank (count)``)."""
    i = info(name)
    if i is None:
        return name
    label = i.label or name
    if not with_unit:
        return label
    unit = {"fraction": "%", "percent": "%", "radians": "degrees", "ratio": "", "flag": "", "count": "",
            "text": ""}.get(i.unit, i.unit)
    return f"{label} ({unit})" if unit else label


def agg_of(name: str) -> str:
    """The catalog's pooling rule (a key of ``AGGREGATIONS``) of a metric; ``matrix_mean`` for a name the
    catalog does not know (each matrix counts once)."""
    i = info(name)
    return i.agg if i else "matrix_mean"


def axis_title(name: str, pooled: bool = True, member: bool = False, sep: str = ", ") -> str:
    """An axis or colour-bar title for one catalog metric: its label and unit (``label_of``), and with
    ``pooled`` what a group's number is, from the catalog's rule (``stable rank, mean over matrices``,
    ``sparsity (%), parameter-weighted``). ``member`` names the member of a parametrised family
    (``top-k energy [top16_energy] (%)``); ``sep`` joins label and rule (``"<br>"``: two lines on an axis)."""
    i = info(name)
    label = label_of(name)
    if i is not None and member and "{" in i.family:
        label = label.replace(i.label, f"{i.label} [{name}]", 1)
    agg = agg_of(name)
    return f"{label}{sep}{agg_label(agg)}" if pooled and agg not in ("none", "counts") else label


def format_value(name: str, value, approx: bool = False) -> str:
    """``value`` of metric/column ``name`` as text, in the catalog's unit; ``approx`` prefixes "≈"
    (a value from a randomized top-k spectrum). None/NaN → "—"."""
    return format_unit(unit_of(name), value, approx)


def format_unit(unit: str, value, approx: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if unit == "text" or isinstance(value, str):
        return str(value)
    v = float(value)
    mark = APPROX_MARK if approx else ""
    if unit == "bytes":
        return mark + human_bytes(v)
    if unit == "flag":
        return "yes" if v else "no"
    v *= SCALE.get(unit, 1.0)
    if unit == "count":
        text = f"{int(v):d}" if v == int(v) else f"{v:.4g}"
    elif unit == "fraction":
        text = f"{v:.2f}" if 0.01 <= abs(v) < 1e4 or v == 0 else f"{v:.3g}"
    elif unit in ("percent", "radians"):
        text = f"{v:.3g}"
    else:
        text = f"{v:.3g}"
    return mark + text + SUFFIX.get(unit, "")


def printf(name: str) -> str:
    """A printf format for the display-scaled value of ``name`` (Streamlit ``NumberColumn(format=…)``)."""
    return PRINTF.get(unit_of(name), "%.4g")


def display(df, columns=None):
    """A copy of ``df`` with every catalog column scaled to its display unit (fractions → %, radians →
    degrees): what a table shows, next to ``printf`` for the format. The CSV export keeps ``df``."""
    out = df.copy()
    for c in (columns if columns is not None else out.columns):
        s = scale_of(str(c))
        if s != 1.0 and c in out:
            out[c] = s * out[c].astype(float)
    return out


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def escape(text) -> str:
    """``text`` safe to put in a Plotly title, legend, hover or axis label: ``&``, ``<``, ``>`` become
    HTML entities so Plotly shows them literally instead of reading tags (``<b>``, ``<br>``, ``<a href>``)."""
    return html.escape(str(text), quote=False)


def column_formats(df, labels: dict[str, str] | None = None) -> dict[str, tuple[str, str]]:
    """column → (header, printf) for every catalog column of ``df``: the header is ``labels[col]`` (else the
    catalog label) with the unit appended; pair it with ``display(df)``. Whole-number counts print as integers."""
    out = {}
    for c in df.columns:
        i = info(str(c))
        if i is None:
            continue
        head = (labels or {}).get(c)
        unit = label_of(str(c))[len(i.label or str(c)):]     # " (%)", " (count)", "" …
        fmt = printf(str(c))
        if i.unit == "count":
            v = df[c].dropna().astype(float)
            fmt = "%d" if len(v) and (v == v.round()).all() else fmt
        out[c] = ((head + unit) if head else label_of(str(c)), fmt)
    return out


def criterion_label(c: str) -> str:
    """What a criterion counts as changed, for titles: ``abs_1e-5`` → ``|ΔW| > 1e-5``."""
    return options.criterion_label(c)


def catalog_name(metric: str, criterion: str = "abs_1e-5") -> str:
    """The catalog name of a Compare-page metric: ``sparsity`` is ``sparsity_<criterion>``."""
    return f"sparsity_{criterion}" if metric == "sparsity" else metric


def metric_label(metric: str, criterion: str = "abs_1e-5") -> str:
    """Axis title of a Compare-page metric, all from the catalog: label, unit and how a group pools it
    on a second line (``sparsity (%)<br>parameter-weighted``: ``formatting.axis_title``). The figure's title
    names the metric itself (``top16_energy per module``)."""
    return axis_title(catalog_name(metric, criterion), sep="<br>")


def json_dict(text) -> dict:
    """A provenance JSON column (options, versions, extra) as a dict: {} when empty, ``{"raw": text}`` when not
    JSON, ``{"value": …}`` when JSON but not an object."""
    if not isinstance(text, str) or not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {"raw": text}
    return value if isinstance(value, dict) else {"value": value}
