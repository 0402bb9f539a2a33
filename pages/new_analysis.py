"""New analysis page: pick a base and post-trained checkpoints (upload or server folder), validate them,
queue the analysis and watch it run.

Thin: the form's parts are ``opdviz.dashboard.new_analysis`` (uploads, validation, queueing through
``opdviz.io.uploads`` and ``opdviz.engine.queue``), the jobs panel ``opdviz.dashboard.jobs``. Nothing is
computed in the web server: the job runs in a worker process that outlives this session (reloads, closed
tabs), so this page reads its state from disk.
"""

from __future__ import annotations

import streamlit as st

from opdviz.dashboard import jobs, routes, text
from opdviz.dashboard import new_analysis as form
from opdviz.io import folders as server

routes.route_through_app()   # a deep link on a fresh server must still get app.py's navigation and sidebar
s = form.session()           # the sidebar's store (its queue lives in its staging folder) and this tab's uploads

st.title("New analysis")
st.markdown("""\
Choose a **base** checkpoint and one or more **post-trained** checkpoints of it (OPD, RL, SFT, DPO…).
Each is a `.safetensors` file or a Hugging Face folder (sharded: the shards plus
`model.safetensors.index.json`; add `config.json` so fused tensors are split correctly). A post-trained
checkpoint may also be a PEFT LoRA adapter folder (`adapter_config.json` + `adapter_model.safetensors`),
analysed as its merge into the base; models in the server's Hugging Face cache are listed as *HF cache · org/name*. The analysis
runs in the background, one job at a time; it keeps running if you close this tab, and a cancelled or
interrupted job resumes from the tensors already stored.""")
st.caption(f"Results go to {text.code(s.db)} (the sidebar's *Database*).")
form.keep_uploads(s)

source = st.radio("Checkpoints from", (form.UPLOAD, form.SERVER), horizontal=True, key="na_source",
                  help="Uploads are private to this browser tab and stored once per content; server folders "
                       f"are limited to {server.ROOTS_ENV}.")
with st.container(border=True):
    st.subheader("Base checkpoint")
    base = form.choose(s, source, "na_base", "Base checkpoint files" if source == form.UPLOAD else "Base checkpoint")
n_posts = st.number_input("Post-trained checkpoints", min_value=1, max_value=form.MAX_POSTS, value=1, step=1,
                          key="na_n_posts")
posts = [form.post_form(s, source, i) for i in range(int(n_posts))]
form.your_uploads(s)
options = form.options_form()

ready, problems = form.checks(s, base, posts)
if st.button("Start analysis", type="primary", icon=":material/play_arrow:", key="na_start",
             disabled=not ready or bool(problems),
             help=None if ready and not problems else "Choose valid checkpoints first."):
    form.start(s, base, posts, options)

jobs.panel(s)
