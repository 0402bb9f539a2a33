"""The New analysis form: choose checkpoints (upload or server folder), validate them, queue the job.

Uploads, confinement and validation live in ``opdviz.io.uploads``, the queue and its detached worker in
``opdviz.engine.queue``; this module draws the form's parts (``pages/new_analysis.py`` puts them in order)
and the jobs panel is ``opdviz.dashboard.jobs``. Nothing is computed in the web server.

Uploads are private to the browser session: they are stored under an unguessable id kept in
``st.session_state`` (``_na_upload_session``), listed only to that session (*Your uploads*, with
Delete), within per-session and total quotas, and swept after ``OPDVIZ_UPLOAD_MAX_AGE_H`` hours unused.
Server folders come from ``OPDVIZ_CHECKPOINT_ROOTS`` only; the queue is the confined store's.
Text from checkpoints, the store or the browser goes into Markdown through ``text.md`` / ``text.code``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import streamlit as st

from opdviz.engine import queue as jobs
from opdviz.errors import OpdvizError
from opdviz.io import folders as server, uploads, validation
from opdviz.options import AnalysisOptions
from opdviz.store import listing
from opdviz.store import Store
from opdviz.views import formatting

from opdviz.dashboard.sidebar import chosen_db, criterion_label
from opdviz.dashboard.text import code, md

UPLOAD, SERVER = "Upload files", "Folders on this server"
METHODS = ("OPD", "RL", "SFT", "DPO", "other")
MAX_POSTS = 8


@dataclass(frozen=True)
class Session:
    """Whose form this is: the store chosen in the sidebar (its queue lives in its staging folder) and
    this browser session's private upload id."""

    db: str
    sid: str

    def short(self, message: str) -> str:
        """Uploaded files named by their upload folder, not by the server's absolute path."""
        return message.replace(str(uploads.session_dir(self.sid)), "your uploads").replace(
            str(uploads.uploads_root()), "uploads")

    def clean(self, message: str) -> str:
        """A message for Markdown: ``short`` and escaped (messages quote file names and checkpoint contents)."""
        return md(self.short(message))


def session() -> Session:
    """This browser session's form: the sidebar's store and the upload id (made on first use)."""
    return Session(chosen_db(), st.session_state.setdefault("_na_upload_session", uploads.new_session_id()))


def active_paths(db: str) -> tuple[str, ...]:
    """Checkpoints that queued or running jobs of this store still read (never swept or deleted)."""
    try:
        return tuple(p for j in jobs.list_jobs(db) if j.active for p in (j.base, *(r.post for r in j.runs)))
    except OpdvizError:
        return ()


def keep_uploads(s: Session) -> None:
    """Mark this session's uploads used, and sweep uploads unused for too long."""
    try:
        uploads.touch_session(s.sid)
        uploads.sweep_uploads(keep=active_paths(s.db))
    except OpdvizError as exc:          # a bad OPDVIZ_UPLOAD_* setting: the operator's to fix
        st.error(md(exc), icon=":material/error:")


# ----------------------------------------------------------------------------------- choosing
def _stamp(path: Path) -> tuple:
    """Sizes and mtimes of a checkpoint's files: a cache key that changes when they change."""
    try:
        files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
        return tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    except OSError:
        return ()


@st.cache_data(show_spinner=False, max_entries=64)
def _validate_one(path: str, stamp: tuple) -> validation.ValidationReport:
    return validation.validate_checkpoint(path)


@st.cache_data(show_spinner=False, max_entries=64)
def _validate_pair(base: str, post: str, stamps: tuple) -> validation.PairReport:
    return validation.validate_pair(base, post)


@st.cache_data(show_spinner=False, ttl=10)
def _server_checkpoints(folders: tuple[str, ...]) -> list[str]:
    return [str(p) for p in server.list_checkpoints(roots=[Path(r) for r in folders])]


def _from_upload(s: Session, key: str, label: str) -> Path | None:
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
                folder = uploads.save_session_upload(s.sid, [(f.name, f) for f in files])
                saved[ident] = ("ok", str(uploads.checkpoint_in(folder)))
        except OpdvizError as exc:
            saved[ident] = ("error", str(exc))
    status, value = saved[ident]
    if status == "error":
        st.error(s.clean(value), icon=":material/error:")
        return None
    return Path(value)


def _from_server(s: Session, key: str, label: str) -> Path | None:
    folders = server.checkpoint_roots()
    found = _server_checkpoints(tuple(map(str, folders)))
    cached = server.cached_models()          # the operator's Hugging Face cache: snapshot path → "org/name@ref"
    found = found + [p for p in cached if p not in found]
    if not found:
        st.info("No checkpoints under " + ", ".join(code(r) for r in folders) + f" (set `{server.ROOTS_ENV}` "
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
        return server.resolve_under_roots(choice, folders)
    except OpdvizError as exc:
        st.error(md(exc), icon=":material/block:")
        return None


def choose(s: Session, source: str, key: str, label: str) -> Path | None:
    """A checkpoint picker (upload or server folder, by ``source``) and its validation; the path when valid."""
    path = (_from_upload if source == UPLOAD else _from_server)(s, f"{key}_{source[:6]}", label)
    if path is None:
        return None
    report = _validate_one(str(path), _stamp(path))
    for err in report.errors:
        st.error(s.clean(err), icon=":material/error:")
    if report.ok:
        st.caption(":material/check_circle: " + md(report.summary()))
        for w in report.warnings:
            st.caption(":material/info: " + s.clean(w))
    return path if report.ok else None


def _suggest(path: Path | None, method: str, i: int) -> str:
    """A default run name: the server folder's or the uploaded file's name, else ``<method>-<n>``."""
    if path is not None and str(path) in server.cached_models():    # "org/name@ref" → "name@ref"
        return server.cached_models()[str(path)].split("/")[-1].split(" ")[0]
    if path is not None:
        uploaded = path.resolve().is_relative_to(uploads.uploads_root())
        if not uploaded:
            return path.stem if path.is_file() else path.name
        if path.is_file() and path.stem not in ("model", "weights"):
            return path.stem
    return f"{method.lower()}-{i + 1}"


def post_form(s: Session, source: str, i: int) -> tuple[Path | None, str, str]:
    """The ``i``-th post-trained checkpoint's box: (its path when valid, run name, method label)."""
    with st.container(border=True):
        st.subheader(f"Post-trained checkpoint {i + 1}")
        path = choose(s, source, f"na_post{i}",
                      "Post-trained checkpoint files" if source == UPLOAD else "Post-trained checkpoint")
        c1, c2, c3 = st.columns([1, 1, 2])
        method = c1.selectbox("Method", METHODS, key=f"na_method{i}",
                              help="How this checkpoint was post-trained; used to group and colour runs.")
        if method == "other":
            method = c2.text_input("Method label", key=f"na_method_other{i}", placeholder="e.g. GRPO").strip() or "other"
        suggested = _suggest(path, method, i)
        name = c3.text_input("Run name", key=f"na_name{i}", placeholder=suggested,
                             help="How the run is called in the dashboard; must be new in this database "
                                  "(or the same checkpoints and options, to resume).").strip() or suggested
    return path, name, method


# ----------------------------------------------------------------------------------- uploads
def _delete(s: Session, folder: Path) -> None:
    try:
        uploads.delete_upload(s.sid, folder, keep=active_paths(s.db))
    except OpdvizError as exc:
        st.session_state["_na_delete_error"] = str(exc)
        return
    # empty the file pickers (new keys) so the deleted files are not stored again on the next rerun
    st.session_state["_na_gen"] = st.session_state.get("_na_gen", 0) + 1
    st.session_state["_na_saved"] = {}


def your_uploads(s: Session) -> None:
    """This session's uploads (no other session's are ever listed), each with Delete."""
    try:
        _your_uploads(s)
    except OpdvizError as exc:
        st.error(s.clean(str(exc)), icon=":material/error:")


def _your_uploads(s: Session) -> None:
    mine = uploads.session_uploads(s.sid)
    err = st.session_state.pop("_na_delete_error", None)
    if err:
        st.error(s.clean(err), icon=":material/error:")
    if not mine:
        return
    used = sum(u.bytes for u in mine)
    try:
        quota = f" of {uploads.session_quota_bytes() / 2**20:,.0f} MB"
    except OpdvizError:
        quota = ""
    with st.expander(f"Your uploads: {len(mine)}, {formatting.human_bytes(used)}{quota}",
                     icon=":material/upload_file:"):
        st.caption(f"Only this browser tab sees them. Uploads unused for {uploads.max_age_hours():g} h are "
                   "removed; delete them yourself when the analysis is done.")
        for u in mine:
            row = st.container(horizontal=True, vertical_alignment="center")
            row.markdown(", ".join(code(n) for n in u.files) + f" · {formatting.human_bytes(u.bytes)}")
            row.button("Delete", key=f"del_{u.folder.name}", icon=":material/delete:", on_click=_delete,
                       args=(s, u.folder), help="Remove these files from the server.")


# ----------------------------------------------------------------------------------- options, checks, start
def options_form() -> AnalysisOptions:
    """The Options expander: device, spectra, default criterion, fused tensors."""
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
                                 key="na_criterion", format_func=criterion_label,
                                 help="Every criterion is computed; this one drives masks, coverage and maps.")
        split = st.checkbox("Also analyse fused tensors (qkv, gate_up) as their parts", value=defaults.split_fused,
                            key="na_split")
        return AnalysisOptions(device=device, spectrum=spectrum, criterion=criterion, split_fused=split)


def checks(s: Session, base: Path | None, posts: list[tuple[Path | None, str, str]]) -> tuple[bool, list[str]]:
    """Draw the pair checks once every checkpoint is chosen; (all chosen, the problems that block Start)."""
    problems: list[str] = []
    ready = base is not None and all(p is not None for p, _, _ in posts)
    names = [n for _, n, _ in posts]
    if len(set(names)) != len(names):
        problems.append(f"Run names must differ: {md(', '.join(names))}.")
    try:
        stored = listing.run_ids(Store(s.db))
        in_queue = {r.run_id for j in jobs.list_jobs(s.db) if j.active for r in j.runs}
    except OpdvizError as exc:
        stored, in_queue = set(), set()
        st.error(md(exc), icon=":material/database:")
    if ready:
        st.subheader("Checks")
        for path, name, _ in posts:
            rep = _validate_pair(str(base), str(path), (_stamp(base), _stamp(path)))
            head = f"**{md(name)}** vs base"
            if rep.errors:
                problems.append(f"{md(name)}: cannot be compared with the base.")
                for err in rep.errors:
                    st.error(f"{head}: {s.clean(err)}", icon=":material/error:")
                continue
            for w in rep.warnings:
                st.warning(f"{head}: {s.clean(w)}", icon=":material/warning:")
            st.success(f"{head}: {rep.n_analysed} tensors will be analysed ({rep.bytes_to_read / 1e6:,.1f} MB to "
                       "read)" + (f", {rep.n_skipped} skipped" if rep.n_skipped else "") + ".",
                       icon=":material/check_circle:")
            if name in in_queue:
                problems.append(f"A job for run **{md(name)}** is already queued or running (see *Analyses* "
                                "below); choose another run name to start one more.")
            elif name in stored:
                st.warning(f"A run named **{md(name)}** is already stored in {code(s.db)}: starting continues it "
                           "when the checkpoints and options are the same, and fails otherwise — choose another "
                           "run name to keep both.", icon=":material/warning:")
    for p in problems:
        st.error(p, icon=":material/error:")
    return ready, problems


def start(s: Session, base: Path, posts: list[tuple[Path, str, str]], options: AnalysisOptions) -> None:
    """Queue the job (paths confined again) and make sure the store's worker runs; say how it went."""
    try:
        # checked again as the job is queued: the worker reads only what this session may read
        # (a model of the operator's Hugging Face cache is accepted as listed: exactly one of its snapshot paths)
        roots = [*server.checkpoint_roots(), uploads.session_dir(s.sid)]
        hub = server.cached_models()
        confined = [Path(p) if str(p) in hub else server.resolve_under_roots(p, roots)
                    for p in (base, *(p for p, _, _ in posts))]
        request = jobs.JobRequest(base=str(confined[0]),
                                  posts=tuple((str(c), n, m) for c, (_, n, m) in zip(confined[1:], posts)),
                                  options=options.to_json())
        job_id = jobs.submit(s.db, request)
        jobs.ensure_worker(s.db)
        st.toast(f"Queued job {job_id}", icon=":material/schedule:")
    except OpdvizError as exc:
        st.error(f"Could not queue the analysis: {s.clean(str(exc))}", icon=":material/error:")
