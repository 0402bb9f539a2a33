"""The opdviz dashboard: ``streamlit run app.py`` (database: ``OPDVIZ_DB=path``, default data/opdviz.duckdb).

This file only routes: page config, the shared sidebar filters (``opdviz/dashboard/ui.py``) and the page list.
Each page is a thin file in ``pages/`` that draws the figures ``opdviz.views.registry`` lists for it.
"""

import streamlit as st

from opdviz.dashboard import ui

# an emoji favicon is drawn locally (a data: URL); a :material/…: one is fetched from fonts.gstatic.com
st.set_page_config(page_title="opdviz", page_icon="📊", layout="wide")

PAGES = {
    "Explore": [
        st.Page("pages/overview.py", title="Overview", icon=":material/dashboard:", default=True),
        st.Page("pages/sparsity.py", title="Sparsity", icon=":material/grain:"),
        st.Page("pages/spectra.py", title="Spectra", icon=":material/ssid_chart:"),
        st.Page("pages/geometry.py", title="Geometry", icon=":material/architecture:"),
        st.Page("pages/tensor.py", title="Tensor", icon=":material/grid_on:"),
    ],
    "Across runs": [
        st.Page("pages/compare.py", title="Compare", icon=":material/compare:"),
        st.Page("pages/overlap.py", title="Overlap", icon=":material/join_inner:"),
        st.Page("pages/trajectory.py", title="Trajectory", icon=":material/timeline:"),
        st.Page("pages/lab.py", title="Lab sweep", icon=":material/science:"),
    ],
    "Compute": [
        st.Page("pages/new_analysis.py", title="New analysis", icon=":material/add_circle:"),
    ],
}

page = st.navigation(PAGES)
ui.sidebar(page.url_path or "overview")
page.run()
