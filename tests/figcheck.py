"""A check every built figure passes: Plotly's validation accepts it as it is."""

from __future__ import annotations

import json

import plotly.graph_objects as go


def assert_valid(fig: go.Figure) -> None:
    """Remade through a validating Figure, ``fig`` gives the same JSON (figures add their traces without
    Plotly's validation: ``opdviz.views.style.with_traces``; an unknown property raises here)."""
    assert json.loads(go.Figure(fig.to_dict()).to_json()) == json.loads(fig.to_json())
