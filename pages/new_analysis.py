"""New analysis page: pick a base and post-trained checkpoints (upload or server folder), validate them,
queue the analysis and watch it run.

Thin: uploads, confinement and validation live in ``opdviz.io.uploads``, the queue and its detached
worker in ``opdviz.engine.queue``. Nothing is computed in the web server: the job runs in a worker process
that outlives this session (reloads, closed tabs), so this page reads its state from disk.

Uploads are private to the browser session: they are stored under an unguessable id kept in
``st.session_state`` (``_na_upload_session``), listed only to that session (*Your uploads*, with
Delete), within per-session and total quotas, and swept after ``OPDVIZ_UPLOAD_MAX_AGE_H`` hours unused.
Server folders come from ``OPDVIZ_CHECKPOINT_ROOTS`` only; the queue is the confined store's.
Text from checkpoints, the store or the browser goes into Markdown through ``ui.md`` / ``ui.code``.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from opdviz.engine import queue as jobs
from opdviz.store import queries
from opdviz.io import roots
from opdviz.io import uploads
from opdviz.errors import OpdvizError
from opdviz.options import AnalysisOptions
from opdviz.store import Store
from opdviz.dashboard import ui

UPLOAD, SERVER = "Upload files", "Folders on this server"
METHODS = ("OPD", "RL", "SFT", "DPO", "other")
MAX_POSTS = 8
SHOWN_JOBS = 8

ui.route_through_app()   # a deep link on a fresh server must still get app.py's navigation and sidebar
# the store chosen in the sidebar (one of the operator's, see opdviz/dashboard/ui.py); the queue lives in its staging folder
db = (st.session_state.get(ui._STATE) or {}).get("db") or roots.default_db()
sid = st.session_state.setdefault("_na_upload_session", uploads.new_session_id())

st.title("New analysis")
st.markdown("""\
Choose a **base** checkpoint and one or more **post-trained** checkpoints of it (OPD, RL, SFT, DPO…).
Each is a `.safetensors` file or a Hugging Face folder (sharded: the shards plus
`model.safetensors.index.json`; add `config.json` so fused tensors are split correctly). A post-trained
checkpoint may also be a PEFT LoRA adapter folder (`adapter_config.json` + `adapter_model.safetensors`),
analysed as its merge into the base; models in the server's Hugging Face cache are listed as *HF cache · org/name*. The analysis
runs in the background, one job at a time; it keeps running if you close this tab, and a cancelled or
interrupted job resumes from the tensors already stored.""")
st.caption(f"Results go to {ui.code(db)} (the sidebar's *Database*).")


def _active_paths() -> tuple[str, ...]:
    """Checkpoints that queued or running jobs of this store still read (never swept or deleted)."""
    try:
        return tuple(p for j in jobs.list_jobs(db) if j.active for p in (j.base, *(r.post for r in j.runs)))
    except OpdvizError:
        return ()


try:
    uploads.touch_session(sid)
    uploads.sweep_uploads(keep=_active_paths())
except OpdvizError as exc:          # a bad OPDVIZ_UPLOAD_* setting: the operator's to fix
    st.error(ui.md(exc), icon=":material/error:")


# ----------------------------------------------------------------------------------- choosing
def _short(message: str) -> str:
    """Uploaded files named by their upload folder, not by the server's absolute path."""
    return message.replace(str(uploads.session_dir(sid)), "your uploads").replace(str(uploads.uploads_root()), "uploads")


def _clean(message: str) -> str:
    """A message for Markdown: ``_short`` and escaped (messages quote file names and checkpoint contents)."""
    return ui.md(_short(message))


def _stamp(path: Path) -> tuple:
    """Sizes and mtimes of a checkpoint's files: a cache key that changes when they change."""
    try:
        files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
        return tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    except OSError:
        return ()


@st.cache_data(show_spinner=False, max_entries=64)
def _validate_one(path: str, stamp: tuple) -> uploads.ValidationReport:
    return uploads.validate_checkpoint(path)


@st.cache_data(show_spinner=False, max_entries=64)
def _validate_pair(base: str, post: str, stamps: tuple) -> uploads.PairReport:
    return uploads.validate_pair(base, post)


@st.cache_data(show_spinner=False, ttl=10)
def _server_checkpoints(folders: tuple[str, ...]) -> list[str]:
    return [str(p) for p in uploads.list_checkpoints(roots=[Path(r) for r in folders])]


def _page_roots() -> list[Path]:
    """What this session may analyse: the operator's checkpoint folders and its own uploads."""
    return [*uploads.checkpoint_roots(), uploads.session_dir(sid)]


def _hub_models() -> dict[str, str]:
    return uploads.cached_models()


def _from_upload(key: str, label: str) -> Path | None:
    files = st.file_uploader(label, type=["safetensors", "json"], accept_multiple_files=True,
                             key=f"{key}_{st.session_state.get('_na_gen', 0)}",   # a new key empties it (Delete)
                             max_upload_size=max(1, uploads.max_upload_bytes() >> 20),
                             help="Select every file of the checkpoint at once: the .safetensors weights (all "
                                  "shards), model.safetensors.index.json when sharded, and config.json.")
    if not files:
        return None
    ident = tuple((f.file_id, f.name, f.size) for f in files)
    saved = st.session_state.setdefault("_na_saved", {})
    if ident not in saved:
        try:
            with st.spinner("Storing the upload…"):
                folder = uploads.save_session_upload(sid, [(f.name, f) for f in files])
                saved[ident] = ("ok", str(uploads.checkpoint_in(folder)))
        except OpdvizError as exc:
            saved[ident] = ("error", str(exc))
    status, value = saved[ident]
    if status == "error":
        st.error(_clean(value), icon=":material/error:")
        return None
    return Path(value)


def _from_server(key: str, label: str) -> Path | None:
    folders = uploads.checkpoint_roots()
    found = _server_checkpoints(tuple(map(str, folders)))
    cached = _hub_models()                    # the operator's Hugging Face cache: snapshot path → "org/name@ref"
    found = found + [p for p in cached if p not in found]
    if not found:
        st.info("No checkpoints under " + ", ".join(ui.code(r) for r in folders) + f" (set `{uploads.ROOTS_ENV}` "
                "to list other folders).", icon=":material/folder_off:")
        return None

    def short(p: str) -> str:
        if p in cached:
            return f"HF cache · {cached[p]}"
        for r in folders:
            if Path(p).is_relative_to(r):
                return f"{r.name}/{Path(p).relative_to(r)}"
        return p

    choice = st.selectbox(label, found, index=None, key=key, format_func=short, placeholder="choose a checkpoint")
    if choice is None:
        return None
    if choice in cached:                      # chosen from the server's own cache listing
        return Path(choice)
    try:
        return uploads.resolve_under_roots(choice, folders)
    except OpdvizError as exc:
        st.error(ui.md(exc), icon=":material/block:")
        return None


def choose(key: str, label: str) -> Path | None:
    path = (_from_upload if source == UPLOAD else _from_server)(f"{key}_{source[:6]}", label)
    if path is None:
        return None
    report = _validate_one(str(path), _stamp(path))
    for err in report.errors:
        st.error(_clean(err), icon=":material/error:")
    if report.ok:
        st.caption(":material/check_circle: " + ui.md(report.summary()))
        for w in report.warnings:
            st.caption(":material/info: " + _clean(w))
    return path if report.ok else None


def _suggest(path: Path | None, method: str, i: int) -> str:
    """A default run name: the server folder's or the uploaded file's name, else ``<method>-<n>``."""
    if path is not None and str(path) in _hub_models():    # "org/name@ref" → "name@ref"
        return _hub_models()[str(path)].split("/")[-1].split(" ")[0]
    if path is not None:
        uploaded = path.resolve().is_relative_to(uploads.uploads_root())
        if not uploaded:
            return path.stem if path.is_file() else path.name
        if path.is_file() and path.stem not in ("model", "weights"):
            return path.stem
    return f"{method.lower()}-{i + 1}"


def _delete(folder: Path) -> None:
    try:
        uploads.delete_upload(sid, folder, keep=_active_paths())
    except OpdvizError as exc:
        st.session_state["_na_delete_error"] = str(exc)
        return
    # empty the file pickers (new keys) so the deleted files are not stored again on the next rerun
    st.session_state["_na_gen"] = st.session_state.get("_na_gen", 0) + 1
    st.session_state["_na_saved"] = {}


def _your_uploads() -> None:
    """This session's uploads (no other session's are ever listed), each with Delete."""
    mine = uploads.session_uploads(sid)
    err = st.session_state.pop("_na_delete_error", None)
    if err:
        st.error(_clean(err), icon=":material/error:")
    if not mine:
        return
    used = sum(u.bytes for u in mine)
    try:
        quota = f" of {uploads.session_quota_bytes() / 2**20:,.0f} MB"
    except OpdvizError:
        quota = ""
    with st.expander(f"Your uploads: {len(mine)}, {ui._human_bytes(used)}{quota}", icon=":material/upload_file:"):
        st.caption(f"Only this browser tab sees them. Uploads unused for {uploads.max_age_hours():g} h are "
                   "removed; delete them yourself when the analysis is done.")
        for u in mine:
            row = st.container(horizontal=True, vertical_alignment="center")
            row.markdown(", ".join(ui.code(n) for n in u.files) + f" · {ui._human_bytes(u.bytes)}")
            row.button("Delete", key=f"del_{u.folder.name}", icon=":material/delete:", on_click=_delete,
                       args=(u.folder,), help="Remove these files from the server.")


source = st.radio("Checkpoints from", (UPLOAD, SERVER), horizontal=True, key="na_source",
                  help="Uploads are private to this browser tab and stored once per content; server folders "
                       f"are limited to {uploads.ROOTS_ENV}.")

with st.container(border=True):
    st.subheader("Base checkpoint")
    base = choose("na_base", "Base checkpoint files" if source == UPLOAD else "Base checkpoint")

n_posts = st.number_input("Post-trained checkpoints", min_value=1, max_value=MAX_POSTS, value=1, step=1,
                          key="na_n_posts")
posts: list[tuple[Path | None, str, str]] = []
for i in range(int(n_posts)):
    with st.container(border=True):
        st.subheader(f"Post-trained checkpoint {i + 1}")
        path = choose(f"na_post{i}", "Post-trained checkpoint files" if source == UPLOAD else "Post-trained checkpoint")
        c1, c2, c3 = st.columns([1, 1, 2])
        method = c1.selectbox("Method", METHODS, key=f"na_method{i}",
                              help="How this checkpoint was post-trained; used to group and colour runs.")
        if method == "other":
            method = c2.text_input("Method label", key=f"na_method_other{i}", placeholder="e.g. GRPO").strip() or "other"
        suggested = _suggest(path, method, i)
        name = c3.text_input("Run name", key=f"na_name{i}", placeholder=suggested,
                             help="How the run is called in the dashboard; must be new in this database "
                                  "(or the same checkpoints and options, to resume).").strip() or suggested
        posts.append((path, name, method))

try:
    _your_uploads()
except OpdvizError as exc:
    st.error(_clean(str(exc)), icon=":material/error:")

with st.expander("Options", icon=":material/tune:"):
    defaults = AnalysisOptions()
    o1, o2 = st.columns(2)
    device = o1.radio("Device", ("auto", "cpu", "cuda"), horizontal=True, key="na_device",
                      help="auto uses the GPU when there is one.")
    spectrum = o2.radio("Singular spectra", ("auto", "exact", "approx"), horizontal=True, key="na_spectrum",
                        help="auto: exact, except on CPU for matrices whose smaller side exceeds "
                             f"{defaults.exact_max_dim} (then randomized top-{defaults.approx_rank}, flagged).")
    criteria = list(defaults.criteria())
    criterion = st.selectbox("Default “changed” criterion", criteria, index=criteria.index(defaults.criterion),
                             key="na_criterion", format_func=ui.criterion_label,
                             help="Every criterion is computed; this one drives masks, coverage and maps.")
    split = st.checkbox("Also analyse fused tensors (qkv, gate_up) as their parts", value=defaults.split_fused,
                        key="na_split")
    options = AnalysisOptions(device=device, spectrum=spectrum, criterion=criterion, split_fused=split)


# ----------------------------------------------------------------------------------- validation
problems: list[str] = []
ready = base is not None and all(p is not None for p, _, _ in posts)
names = [n for _, n, _ in posts]
if len(set(names)) != len(names):
    problems.append(f"Run names must differ: {ui.md(', '.join(names))}.")
try:
    stored = set(queries.runs(Store(db))["run_id"]) if Store(db).exists() else set()
    in_queue = {r.run_id for j in jobs.list_jobs(db) if j.active for r in j.runs}
except OpdvizError as exc:
    stored, in_queue = set(), set()
    st.error(ui.md(exc), icon=":material/database:")
if ready:
    st.subheader("Checks")
    for path, name, _ in posts:
        rep = _validate_pair(str(base), str(path), (_stamp(base), _stamp(path)))
        head = f"**{ui.md(name)}** vs base"
        if rep.errors:
            problems.append(f"{ui.md(name)}: cannot be compared with the base.")
            for err in rep.errors:
                st.error(f"{head}: {_clean(err)}", icon=":material/error:")
            continue
        for w in rep.warnings:
            st.warning(f"{head}: {_clean(w)}", icon=":material/warning:")
        st.success(f"{head}: {rep.n_analysed} tensors will be analysed ({rep.bytes_to_read / 1e6:,.1f} MB to read)"
                   + (f", {rep.n_skipped} skipped" if rep.n_skipped else "") + ".", icon=":material/check_circle:")
        if name in in_queue:
            problems.append(f"A job for run **{ui.md(name)}** is already queued or running (see *Analyses* below); "
                            "choose another run name to start one more.")
        elif name in stored:
            st.warning(f"A run named **{ui.md(name)}** is already stored in {ui.code(db)}: starting continues it when the "
                       "checkpoints and options are the same, and fails otherwise — choose another run name "
                       "to keep both.", icon=":material/warning:")
for p in problems:
    st.error(p, icon=":material/error:")

start = st.button("Start analysis", type="primary", icon=":material/play_arrow:", key="na_start",
                  disabled=not ready or bool(problems),
                  help=None if ready and not problems else "Choose valid checkpoints first.")
if start:
    try:
        # checked again as the job is queued: the worker reads only what this session may read
        # (a model of the operator's Hugging Face cache is accepted as listed: exactly one of its snapshot paths)
        confined = [Path(p) if str(p) in _hub_models() else uploads.resolve_under_roots(p, _page_roots())
                    for p in (base, *(p for p, _, _ in posts))]
        request = jobs.JobRequest(base=str(confined[0]),
                                  posts=tuple((str(c), n, m) for c, (_, n, m) in zip(confined[1:], posts)),
                                  options=options.to_json())
        job_id = jobs.submit(db, request)
        jobs.ensure_worker(db)
        st.toast(f"Queued job {job_id}", icon=":material/schedule:")
    except OpdvizError as exc:
        st.error(f"Could not queue the analysis: {_clean(str(exc))}", icon=":material/error:")


# ----------------------------------------------------------------------------------- jobs
def _eta(seconds) -> str:
    if seconds is None:
        return "ETA …"
    s = int(seconds)
    return f"ETA {s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"ETA {s // 60}:{s % 60:02d}"


def _run_line(r: jobs.RunProgress, state: str) -> str:
    if r.n_total is None:
        return f"{ui.md(r.run_id)}: " + ("starting (reading the checkpoint headers)…" if state == "running" else "not started")
    parts = [f"{ui.md(r.run_id)}: {r.n_done}/{r.n_total} tensors"]
    if r.bytes_total:
        parts.append(f"{r.bytes_done / 1e6:,.1f}/{r.bytes_total / 1e6:,.1f} MB")
    if r.status == "running":
        parts.append(_eta(r.eta_s))
        if r.current:
            parts.append(ui.md(r.current))
    return " · ".join(parts)


def _show_job(job: jobs.JobStatus, waiting: bool) -> None:
    label = {"queued": ":material/schedule: queued", "running": ":material/progress_activity: running",
             "done": ":material/check_circle: done", "failed": ":material/error: failed",
             "cancelled": ":material/cancel: cancelled"}[job.state]
    runs = ui.md(", ".join(f"{r.run_id} ({r.method})" for r in job.runs))
    st.markdown(f"**{runs}** · {label} · base {ui.code(_short(job.base))} · job {ui.code(job.id)}")
    if job.state == "queued":
        st.caption("Waiting for the job ahead of it to finish." if waiting else "Starting…")
    for r in job.runs:
        if job.state in ("running", "failed", "cancelled") or r.n_total:
            st.progress(r.fraction, text=_run_line(r, job.state))
    if job.state == "done":
        for r in job.runs:
            bits = [f"{r.n_skipped} skipped"] if r.n_skipped else []
            if r.n_failed:
                bits.append(f"{r.n_failed} failed")
            st.success(f"{ui.md(r.run_id)}: finished" + (f" ({', '.join(bits)})" if bits else "") + ".",
                       icon=":material/check_circle:")
            if r.n_failed:
                _failures(r.run_id)
    elif job.state == "failed":
        st.error(_clean(job.error) or "the job failed", icon=":material/error:")
    elif job.state == "cancelled":
        st.warning(_clean(job.error or "cancelled"), icon=":material/cancel:")
    row = st.container(horizontal=True)
    if job.state in ("queued", "running"):
        if row.button("Cancel", key=f"cancel_{job.id}", icon=":material/stop:"):
            _act(jobs.cancel, job.id)
    if job.state in ("failed", "cancelled"):
        if row.button("Resume", key=f"resume_{job.id}", icon=":material/replay:",
                      help="Queue it again; tensors already stored are not recomputed."):
            _act(jobs.resume, job.id, start=True)
    if any(r.n_done for r in job.runs):
        row.page_link("pages/sparsity.py", label="Open the Sparsity page", icon=":material/grain:",
                      query_params={"run": [r.run_id for r in job.runs]})


def _failures(run_id: str) -> None:
    try:
        df = queries.failures(Store(db), run_id)
    except OpdvizError as exc:
        st.error(ui.md(exc))
        return
    if not df.empty:
        with st.expander(f"{len(df)} tensor(s) of {ui.md(run_id)} failed (e.g. NaN/Inf weights) — recorded, the job went on"):
            st.dataframe(df[["tensor", "stage", "error", "message"]], hide_index=True)


def _act(fn, job_id: str, start: bool = False) -> None:
    try:
        fn(db, job_id)
        if start:
            jobs.ensure_worker(db)
    except OpdvizError as exc:
        st.error(_clean(str(exc)), icon=":material/error:")
        return
    st.rerun(scope="app")


def _jobs_panel(polling: bool) -> None:
    try:
        listed = jobs.list_jobs(db)
        if any(j.state == "queued" for j in listed):
            jobs.ensure_worker(db)  # no-op while a worker runs; restarts one that went away
    except OpdvizError as exc:
        st.error(_clean(str(exc)), icon=":material/error:")
        return
    if not listed:
        st.caption("No analyses yet.")
        return
    if polling and not any(j.active for j in listed):
        st.rerun(scope="app")  # everything finished: redraw the page once and stop polling
    ahead = [j for j in listed if j.active]
    for job in reversed(listed[-SHOWN_JOBS:]):
        with st.container(border=True, key=f"job_{job.id}"):
            _show_job(job, waiting=bool(ahead) and ahead[0].id != job.id)


st.subheader("Analyses")
try:
    polling = any(j.active for j in jobs.list_jobs(db))
except OpdvizError:
    polling = False
st.fragment(_jobs_panel, run_every=1.0 if polling else None)(polling)
