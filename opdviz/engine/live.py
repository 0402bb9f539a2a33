"""Live trajectories: where a training run's snapshots go and how far their analysis is (no torch here).

``opdviz.integrations.OpdvizCallback`` writes weight snapshots into ``live_dir(db, name)`` and a
background worker (``opdviz.integrations.worker``) analyses them into the store as the trajectory
``name`` (runs ``name@step``). The worker keeps ``live_status`` up to date in one small JSON file,
replaced atomically, which the Trajectory page reads to know whether to keep refreshing:

    {"trajectory", "status": "running" | "done" | "interrupted" | "failed", "pid", "train_step",
     "steps_done": [...], "steps_queued": [...], "message", "updated"}
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from opdviz.store import slug
from opdviz.store.progress import trajectory_run_extras

REFRESH_S = 5.0          # how often the Trajectory page refreshes while a live trajectory grows


def live_dir(db, name: str) -> Path:
    """Folder of the snapshots of live trajectory ``name`` (next to the store: ``<db>.live/<slug>/``)."""
    return Path(str(db) + ".live") / slug(name)


def status_path(db, name: str) -> Path:
    return live_dir(db, name) / "status.json"


def write_status(db, name: str, **fields) -> dict:
    """Merge ``fields`` into the status file (atomic replace; the worker is its only writer)."""
    path = status_path(db, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = read_status(db, name) or {"trajectory": name}
    state.update(fields, updated=time.time())
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, path)
    return state


def read_status(db, name: str) -> dict | None:
    """The status of live trajectory ``name``, or None when it was not recorded by the callback. A status
    "running" whose worker process is gone reads as "interrupted"."""
    try:
        state = json.loads(status_path(db, name).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict):
        return None
    if state.get("status") == "running" and not _alive(state.get("pid")):
        state["status"] = "interrupted"
        state.setdefault("message", "the analysis worker stopped before the end of training")
    return state


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:   # a zombie (exited, not yet reaped by its parent) is gone for our purposes
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


def training_log(store, name: str):
    """Per stored step of trajectory ``name``: step, loss, loss_step, learning_rate, epoch — as recorded by
    ``OpdvizCallback`` in each step run's ``runs.extra["train"]`` (empty for offline trajectories)."""
    import pandas as pd

    runs = trajectory_run_extras(store, name)
    rows = []
    for step, extra in zip(runs["step"], runs["extra"]):
        try:
            train = json.loads(extra or "{}").get("train")
        except (ValueError, AttributeError):
            train = None
        if isinstance(train, dict):
            rows.append({"step": int(step), **{k: train.get(k) for k in ("loss", "loss_step", "learning_rate", "epoch")}})
    return pd.DataFrame(rows, columns=["step", "loss", "loss_step", "learning_rate", "epoch"])
