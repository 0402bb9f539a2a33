"""Batch: many analyses from one YAML/JSON file, run as one job (``opdviz batch FILE --db PATH``).

The file lists bases, the post-trained checkpoints of each (name, method), optional trajectories
(checkpoints with their steps; each checkpoint is run as ``NAME@step``) and the analysis options
(fields of ``opdviz.options.AnalysisOptions``, for every run). Relative paths are relative to the file; a path
that does not exist there but reads ``org/name[@revision]`` is a Hugging Face model ID from the local cache; a
post path may be a PEFT LoRA adapter::

    options: {spectrum: exact, abs_eps: [1e-6, 1e-5]}
    bases:
      - path: /shared/qwen2.5-0.5b
        posts:
          - {name: qwen-opd, path: /shared/runs/opd/final, method: OPD}
          - {name: qwen-rl, path: /shared/runs/rl/final, method: RL}
          - {name: qwen-lora, path: me/qwen-lora-sft, method: SFT}       # a LoRA adapter in the HF cache
        trajectories:
          - name: qwen-opd-traj
            method: OPD
            checkpoints:
              - {step: 100, path: /shared/runs/opd/checkpoint-100}
              - {step: 200, path: /shared/runs/opd/checkpoint-200}

Everything is validated before anything runs (unknown keys, missing paths, unreadable checkpoints,
duplicate run names), with every problem listed at once. The runs then go through
``opdviz.engine.runner.run_jobs`` together: with ``--executor ray`` the tensors of all runs share one pool of
tasks and the driver writes each run with its own ``RunWriter``. Trajectory metrics (the
``trajectory`` table) are computed afterwards by ``opdviz.engine.trajectory.run_trajectory``, on the driver.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from opdviz.io.adapters import check_post
from opdviz.errors import OpdvizError, OptionsError
from opdviz.io.hub import looks_like_repo_id, resolve_checkpoint
from opdviz.engine.runner import JobSpec, run_jobs
from opdviz.options import MAX_LABEL_CHARS, AnalysisOptions, check_label
from opdviz.io.safefiles import Limits, loads_json
from opdviz.engine.trajectory import DEFAULT_HILL_FRAC, DEFAULT_K, TrajectorySpec

TOP_KEYS = ("options", "bases")
BASE_KEYS = ("path", "posts", "trajectories")
POST_KEYS = ("name", "path", "method")
TRAJ_KEYS = ("name", "method", "checkpoints", "k", "hill_frac")
CKPT_KEYS = ("step", "path")
DEFAULT_METHOD = "post-trained"
MAX_BATCH_BYTES = 16_000_000       # a batch file lists paths: far below this


@dataclass(frozen=True)
class Batch:
    """A validated batch: the pair runs (trajectory steps included) and the trajectories."""

    specs: tuple[JobSpec, ...]
    trajectories: tuple[TrajectorySpec, ...]


class _Problems:
    """Collects every validation problem so the user sees them all at once."""

    def __init__(self, source: Path):
        self.source = source
        self.lines: list[str] = []

    def add(self, where: str, what: str) -> None:
        self.lines.append(f"{where}: {what}")

    def keys(self, where: str, obj, allowed: tuple[str, ...], required: tuple[str, ...] = ()) -> bool:
        if not isinstance(obj, dict):
            self.add(where, f"expected a mapping with keys {', '.join(allowed)}, got {type(obj).__name__}")
            return False
        for k in obj:
            if k not in allowed:
                self.add(where, f"unknown key {k!r} (known: {', '.join(allowed)})")
        for k in required:
            if k not in obj:
                self.add(where, f"missing key {k!r}")
        return True

    def raise_if_any(self) -> None:
        if self.lines:
            raise OptionsError(f"{self.source}: {len(self.lines)} problem(s), nothing was run:\n  "
                               + "\n  ".join(self.lines))


def read_batch_file(path: str | Path) -> dict:
    """The raw mapping of a ``.yaml``/``.yml``/``.json`` batch file."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_BATCH_BYTES + 1)
    except OSError as exc:
        raise OptionsError(f"cannot read the batch file {path}: {exc}") from None
    if len(raw) > MAX_BATCH_BYTES:
        raise OptionsError(f"{path}: larger than {MAX_BATCH_BYTES // 1_000_000} MB; is this a batch file?")
    if path.suffix.lower() == ".json":
        return loads_json(raw, path, Limits.from_env(), error=OptionsError)
    import yaml

    try:
        return yaml.safe_load(raw.decode("utf-8"))
    except RecursionError:
        raise OptionsError(f"{path}: YAML nested too deeply to read; is this a batch file?") from None
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        raise OptionsError(f"{path}: not valid YAML: {exc}") from None


def options_from_mapping(data, where: str, problems: _Problems) -> AnalysisOptions:
    """AnalysisOptions from a mapping of field names (``abs_eps`` or ``abs-eps``) with type checks."""
    fields = {f.name: f for f in dataclasses.fields(AnalysisOptions)}
    if data is None:
        return AnalysisOptions()
    if not problems.keys(where, data, tuple(fields)):
        return AnalysisOptions()
    kw = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in fields:
            continue                      # already reported as unknown
        default = fields[name].default
        if isinstance(default, tuple):
            value = value if isinstance(value, list) else [value]
            elem = type(default[0]) if default else float
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and (elem is float or isinstance(v, int))
                       for v in value):
                problems.add(f"{where}.{key}", f"expected a list of {elem.__name__}, got {value!r}")
                continue
            value = tuple(elem(v) for v in value)
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                problems.add(f"{where}.{key}", f"expected true or false, got {value!r}")
                continue
        elif isinstance(default, (int, float)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    (isinstance(default, int) and not isinstance(value, int)):
                problems.add(f"{where}.{key}", f"expected a {type(default).__name__}, got {value!r}")
                continue
        elif not isinstance(value, str):
            problems.add(f"{where}.{key}", f"expected a string, got {value!r}")
            continue
        kw[name] = value
    try:
        return AnalysisOptions(**kw)
    except OptionsError as exc:
        problems.add(where, str(exc))
        return AnalysisOptions()


def load_batch(path: str | Path, db: str | Path, *, download: bool = False) -> Batch:
    """Read and validate a batch file; every run will write to ``db``. Raises OptionsError listing all
    problems (unknown keys, missing or unreadable checkpoints, duplicate names) before anything runs.

    A ``path`` may be a Hugging Face model ID (``org/name[@revision]``) when no such relative path exists;
    it resolves from the local cache, and is fetched only with ``download``. A post ``path`` may be a PEFT
    LoRA adapter folder (``opdviz.io.adapters``)."""
    path = Path(path)
    data = read_batch_file(path)
    problems = _Problems(path)
    root = path.resolve().parent
    if not problems.keys("(top level)", data, TOP_KEYS, ("bases",)):
        problems.raise_if_any()
    opts = options_from_mapping(data.get("options"), "options", problems)
    specs: list[JobSpec] = []
    trajectories: list[TrajectorySpec] = []
    opened: dict[Path, bool] = {}
    ids: dict[Path, str] = {}      # snapshot path → the model ID it was given as (for default run names)

    def checkpoint(where: str, value) -> Path | None:
        if not isinstance(value, str) or not value:
            problems.add(where, f"expected a checkpoint path, got {value!r}")
            return None
        p = Path(value).expanduser()
        p = p if p.is_absolute() else root / p
        if not p.exists() and looks_like_repo_id(value):
            try:
                p = resolve_checkpoint(value, download=download)
            except OpdvizError as exc:
                problems.add(where, str(exc))
                return None
            ids[p] = value
        if p not in opened:
            try:
                check_post(p, allow_pickle=opts.allow_pickle)
                opened[p] = True
            except OpdvizError as exc:
                opened[p] = False
                problems.add(where, str(exc))
        return p if opened[p] else None

    def label(where: str, value, what: str, max_chars: int = MAX_LABEL_CHARS) -> bool:
        try:
            check_label(value, what, max_chars)
            return True
        except OptionsError as exc:
            problems.add(where, str(exc))
            return False

    bases = data.get("bases")
    if not isinstance(bases, list) or not bases:
        problems.add("bases", "expected a non-empty list of bases")
        bases = []
    for b, base in enumerate(bases):
        where = f"bases[{b}]"
        if not problems.keys(where, base, BASE_KEYS, ("path",)):
            continue
        base_path = checkpoint(f"{where}.path", base.get("path"))
        posts, trajs = base.get("posts") or [], base.get("trajectories") or []
        if not isinstance(posts, list) or not isinstance(trajs, list):
            problems.add(where, "posts and trajectories must be lists")
            continue
        if not posts and not trajs:
            problems.add(where, "no posts and no trajectories: nothing to compare with this base")
        for i, post in enumerate(posts):
            w = f"{where}.posts[{i}]"
            if not problems.keys(w, post, POST_KEYS, ("path",)):
                continue
            post_path = checkpoint(f"{w}.path", post.get("path"))
            name = post.get("name")
            if name is None and post_path:
                name = (ids[post_path].split("/")[-1] if post_path in ids else
                        post_path.stem if post_path.is_file() else post_path.name)
            ok_name = label(f"{w}.name", name, "run name")
            method = DEFAULT_METHOD if post.get("method") is None else post.get("method")
            ok_method = label(f"{w}.method", method, "method label")
            if base_path and post_path and ok_name and ok_method:
                specs.append(JobSpec(base=base_path, post=post_path, run_id=name,
                                     method=method, db=Path(db), options=opts))
        for t, traj in enumerate(trajs):
            w = f"{where}.trajectories[{t}]"
            if not problems.keys(w, traj, TRAJ_KEYS, ("name", "checkpoints")):
                continue
            name = traj.get("name")
            method = DEFAULT_METHOD if traj.get("method") is None else traj.get("method")
            good = label(f"{w}.name", name, "trajectory name", MAX_LABEL_CHARS - 24)
            good = label(f"{w}.method", method, "method label") and good
            ckpts = traj.get("checkpoints")
            if not isinstance(ckpts, list) or not ckpts:
                problems.add(f"{w}.checkpoints", "expected a non-empty list of {step, path}")
                continue
            steps: list[tuple[int, Path]] = []
            for c, ck in enumerate(ckpts):
                wc = f"{w}.checkpoints[{c}]"
                if not problems.keys(wc, ck, CKPT_KEYS, ("step", "path")):
                    continue
                step = ck.get("step")
                if isinstance(step, bool) or not isinstance(step, int) or step < 0:
                    problems.add(f"{wc}.step", f"expected a non-negative integer, got {step!r}")
                    continue
                p = checkpoint(f"{wc}.path", ck.get("path"))
                if p:
                    steps.append((step, p))
            if len({s for s, _ in steps}) != len(steps):
                problems.add(f"{w}.checkpoints", "steps must differ")
                continue
            k, hill = traj.get("k", DEFAULT_K), traj.get("hill_frac", DEFAULT_HILL_FRAC)
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                problems.add(f"{w}.k", f"expected an integer ≥ 1, got {k!r}")
                good = False
            if isinstance(hill, bool) or not isinstance(hill, (int, float)) or not 0 < hill < 1:
                problems.add(f"{w}.hill_frac", f"expected a number in (0, 1), got {hill!r}")
                good = False
            if not base_path or len(steps) != len(ckpts) or not good:
                continue
            steps.sort()
            extra = {"trajectory_k": k, "hill_frac": hill, "steps": [s for s, _ in steps]}
            specs.extend(JobSpec(base=base_path, post=p, run_id=f"{name}@{s}", method=method, db=Path(db),
                                 options=opts, trajectory=name, step=s, extra=extra) for s, p in steps)
            trajectories.append(TrajectorySpec(base=base_path, checkpoints=tuple(steps), name=name, method=method,
                                               db=Path(db), options=opts, k=k, hill_frac=float(hill)))
    names = [s.run_id for s in specs]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        problems.add("runs", f"run name {dup!r} is used more than once; give each post a distinct name")
    problems.raise_if_any()
    if not specs:
        raise OptionsError(f"{path}: lists no runs")
    return Batch(tuple(specs), tuple(trajectories))


def run_batch(batch: Batch, *, executor=None, progress: bool = True, overwrite: bool = False,
              log=print) -> list[dict]:
    """Run every analysis of ``batch`` as one job (resumable like ``opdviz compute``), then the trajectory
    metrics. Returns the final run rows, in the order of ``batch.specs``."""
    from opdviz.engine.trajectory import run_trajectory

    rows = run_jobs(list(batch.specs), progress=progress, overwrite=overwrite, log=log, executor=executor)
    for traj in batch.trajectories:
        # the per-step runs are stored: run_trajectory finds nothing left to do for them
        run_trajectory(traj, progress=progress, overwrite=False, log=lambda *_: None)
    return rows
