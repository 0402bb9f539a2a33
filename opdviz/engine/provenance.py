"""Where a run's results came from, as stored in its ``runs`` row: package versions, the trainer's
metadata, the main dtype of its checkpoints, and the details a resumed run keeps."""

from __future__ import annotations

import json
import platform
from importlib.metadata import version
from pathlib import Path

import torch

from opdviz.version import __version__
from opdviz.errors import CheckpointError
from opdviz.io.reader import PairItem
from opdviz.io.safefiles import Limits, read_json


def package_versions() -> dict:
    """Versions of the packages that shape the results, stored with every run."""
    import numpy
    import safetensors

    return {"opdviz": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": numpy.__version__, "safetensors": safetensors.__version__, "duckdb": version("duckdb")}


def training_metadata(post: Path, log=None) -> dict:
    """``metrics.json`` written by the trainer next to the post-trained weights (accuracy, loss, steps…),
    kept in ``runs.extra`` so the dashboard can show it beside the update metrics. Absent or invalid → {}.
    It is optional, so one that is refused (a symlink, over the size or depth caps of ``opdviz.io.safefiles``)
    is ignored with a warning to ``log`` instead of failing the run; none of its bytes are kept."""
    folder = Path(post) if Path(post).is_dir() else Path(post).parent
    try:
        data = read_json(folder, "metrics.json", Limits.from_env(), lenient=True)
    except CheckpointError as exc:
        if log:
            log(f"warning: ignoring the training metadata: {exc}")
        return {}
    except OSError:
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if k != "history"}


def old_extra(old: dict | None) -> dict:
    """A resumed run keeps the details recorded when it started (e.g. a live trajectory's loss and step)."""
    try:
        extra = json.loads(old["extra"]) if old is not None and old.get("extra") else {}
    except (TypeError, ValueError):
        return {}
    return extra if isinstance(extra, dict) else {}


def main_dtype(items: list[PairItem]) -> str:
    by: dict[str, int] = {}
    for i in items:
        by[i.base.dtype] = by.get(i.base.dtype, 0) + i.base.nbytes
    return max(by, key=by.get) if by else ""
