"""The opdviz dashboard: ``streamlit run app.py`` (database: ``OPDVIZ_DB=path``, default data/opdviz.duckdb).

This file only routes: page config, the page list (``opdviz/dashboard/routes.py``), the shared sidebar
filters (``opdviz/dashboard/sidebar.py``) and the chosen page. Each page is a thin file in ``pages/`` that
draws the figures ``opdviz.views`` defines for it with the helpers of ``opdviz/dashboard``.
"""

import streamlit as st

from opdviz.dashboard import routes, sidebar

st.set_page_config(**routes.PAGE_CONFIG)

page = st.navigation(routes.pages())
sidebar.sidebar(page.url_path or "overview")
routes.run(page)
