"""``run_sweep``: when does the update become sparse? OPD, RL and SFT from one base over a grid.

Every run post-trains the lab's student base (``<lab>/base``, teacher ``<lab>/teacher``) with one
method, learning rate, precision, weight decay and seed, saves the bf16 checkpoint with its settings
and held-out accuracy in ``metrics.json``, and analyses it with the normal job into the store
(``runs.extra`` holds the settings: ``sweep``, ``lr``, ``precision``, ``weight_decay``, ``seed``,
``accuracy``, ``base_accuracy``). With ``subnetwork`` on, each OPD run is retrained from the base on
only the coordinates it changed (``mask: changed``) and on a random mask of the same size per tensor
(``mask: random``); those runs are stored the same way.

    from opdviz.lab.sweep import SweepGrid, run_sweep
    run_sweep(SweepGrid(lrs=(1e-6, 1e-4), seeds=(0,)), lab=Path("data/demo"), out=Path("data/lab-sweep"),
              db=Path("data/opdviz.duckdb"), progress=print)     # or: opdviz lab sweep

Precisions: ``fp32`` — AdamW on fp32 master weights, the checkpoint rounded to bf16 once at the end
(updates smaller than half a bf16 step of a weight vanish only then); ``bf16`` — weights, gradients
and AdamW state kept in bf16 throughout, so each step's update is rounded away when it is below half
a bf16 step (the mechanism 2606.13657 and 2505.11711 point to for sparse updates).

Runs are deterministic for a given grid point (explicit generators; the same seed draws the same
prompts for every method and rate). A run whose analysis is complete in the store is skipped, so a
stopped sweep resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable

import torch

from opdviz.errors import OptionsError
from opdviz.lab.model import Llama, bf16_state, load_hf, save_hf
from opdviz.lab.grid import MASKS, METHODS, SweepGrid, SweepPoint  # noqa: F401 (re-exported)
from opdviz.lab.settings import LOSS_NAMES, LabSettings
from opdviz.lab.subnetwork import changed_masks, random_masks_like
from opdviz.lab.task import AdditionTask
from opdviz.lab.train import RunSpec, accuracy, train

@dataclasses.dataclass
class LabInputs:
    """What every run of a sweep starts from: the bf16 base state, the teacher, the task and its splits."""

    base: Llama
    base_state: dict[str, torch.Tensor]
    teacher: Llama
    task: AdditionTask
    test: torch.Tensor
    val: torch.Tensor
    base_accuracy: float

    @classmethod
    def load(cls, lab: Path, data_seed: int = 0, task: tuple[int, int] | None = None) -> "LabInputs":
        """Read ``lab/base`` and ``lab/teacher`` (folders written by ``opdviz lab``) and the task
        (``task`` = (digits, test_size), else from ``lab/lab.json``, else the lab's defaults)."""
        lab = Path(lab)
        try:
            settings = json.loads((lab / "lab.json").read_text())["settings"]
            digits, test_size = task or (int(settings["digits"]), int(settings["test_size"]))
        except (OSError, ValueError, KeyError, TypeError):
            defaults = LabSettings()
            digits, test_size = task or (defaults.digits, defaults.test_size)
        base, teacher = load_hf(lab / "base"), load_hf(lab / "teacher")
        teacher.eval()
        task = AdditionTask(digits=digits, test_size=test_size)
        test = task.test_pairs(data_seed)
        return cls(base, bf16_state(base), teacher, task, test, task.val_pairs(data_seed),
                   accuracy(base, task, test))


def train_point(p: SweepPoint, inputs: LabInputs, masks: dict[str, torch.Tensor] | None = None,
                progress: Callable[[int, int], None] | None = None) -> tuple[Llama, dict]:
    """Post-train a copy of the base for grid point ``p``; returns the model and its metrics.json dict."""
    model = Llama(inputs.base.config)
    model.load_state_dict({k: v.float() for k, v in inputs.base_state.items()})
    if p.precision == "bf16":
        model = model.to(torch.bfloat16)
    spec = RunSpec(p.method, p.steps, p.lr, p.batch, weight_decay=p.weight_decay, group=p.group)
    # the same seed draws the same prompts (and sampling stream) whatever the method and rate
    g = torch.Generator().manual_seed(7919 * (p.seed + 1))
    t = time.perf_counter()
    hist = train(model, spec, inputs.task, inputs.test, g, teacher=inputs.teacher, masks=masks,
                 progress=progress, val_pairs=inputs.val)
    metrics = {"method": p.label, "method_key": p.method, "loss_name": LOSS_NAMES[p.method], **p.settings(),
               "accuracy": hist[-1]["accuracy"], "base_accuracy": inputs.base_accuracy, "test_size": len(inputs.test),
               "loss": _tail_loss(hist),
               "group": p.group, "train_s": round(time.perf_counter() - t, 1), "torch": torch.__version__,
               "device": "cpu"}
    return model, metrics


def _tail_loss(hist: list[dict]) -> float:
    tail = hist[-max(1, len(hist) // 10):]
    return round(sum(r["loss"] for r in tail) / len(tail), 6)


def checkpoint_folder(out: Path, p: SweepPoint) -> Path:
    return Path(out) / p.run_id


def run_sweep(grid: SweepGrid, lab: Path, out: Path, db: Path, *, progress: Callable[[str], None] | None = None,
              runs: list[SweepPoint] | None = None, options=None) -> list[dict]:
    """Train and analyse every point of ``grid`` (or the given ``runs``) not yet complete in ``db``.

    Checkpoints go to ``out/<run_id>/`` (bf16 HF folders with ``metrics.json``); each is analysed against
    ``lab/base`` by the normal job into ``db``. Returns one dict per run: run_id, status (``done``,
    ``skipped``: already stored), accuracy, seconds. ``options``: the ``AnalysisOptions`` of every analysis
    (default: the defaults of ``opdviz compute``).
    """
    from opdviz.engine.runner import JobSpec, run_job
    from opdviz.options import AnalysisOptions
    from opdviz.store import Store

    emit = progress or (lambda line: None)
    lab, out, db = Path(lab), Path(out), Path(db)
    points = runs if runs is not None else grid.points()
    store = Store(db)
    prev = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    # one thread: results do not depend on the machine's core count, and 8 sweeps can share 2 cores
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    report: list[dict] = []
    try:
        inputs = None
        todo = _with_masks(points, grid.subnetwork)
        for n, p in enumerate(todo, 1):
            row = store.run_row(p.run_id) if store.exists() else None
            if row is not None and row.get("status") == "done":
                report.append({"run_id": p.run_id, "status": "skipped", "accuracy": _acc(row), "seconds": 0.0})
                continue
            inputs = inputs or LabInputs.load(lab)
            t = time.perf_counter()
            folder = checkpoint_folder(out, p)
            masks = None
            if p.mask is not None:
                full = dataclasses.replace(p, mask=None)
                full_state = _saved_state(checkpoint_folder(out, full), full.run_id)
                masks = changed_masks(inputs.base_state, full_state)
                if p.mask == "random":
                    masks = random_masks_like(masks, seed=104_729 + p.seed)
            emit(f"[sweep] {n}/{len(todo)} training {p.run_id}")
            model, metrics = train_point(p, inputs, masks=masks)
            if masks is not None:
                total = sum(m.numel() for m in masks.values())
                metrics["mask_density"] = round(sum(int(m.sum()) for m in masks.values()) / max(1, total), 6)
                metrics["mask_of"] = dataclasses.replace(p, mask=None).run_id
            save_hf(model, folder, {"lab_tokenizer.json": inputs.task.tokenizer.to_json(), "metrics.json": metrics})
            emit(f"[sweep] {n}/{len(todo)} analysing {p.run_id} (accuracy {metrics['accuracy']:.3f})")
            run_job(JobSpec(base=lab / "base", post=folder, run_id=p.run_id, method=METHODS[p.method], db=db,
                            options=options or AnalysisOptions()),
                    progress=False, overwrite=True, log=emit)
            report.append({"run_id": p.run_id, "status": "done", "accuracy": metrics["accuracy"],
                           "seconds": round(time.perf_counter() - t, 1)})
    finally:
        torch.use_deterministic_algorithms(prev[0])
        torch.set_num_threads(prev[1])
    return report


def _with_masks(points: list[SweepPoint], subnetwork: bool) -> list[SweepPoint]:
    """Each OPD point followed by its masked retrainings (mask from that run, random control)."""
    out = []
    for p in points:
        out.append(p)
        if subnetwork and p.method == "opd" and p.mask is None:
            out.extend(dataclasses.replace(p, mask=m) for m in MASKS)
    return out


def _saved_state(folder: Path, run_id: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = folder / "model.safetensors"
    if not path.is_file():
        raise OptionsError(f"the masked retraining needs the checkpoint of {run_id} at {path}, which is missing; "
                           "rerun the sweep with the same --out (or remove that run from the store to retrain it)")
    return load_file(str(path))


def _acc(row: dict) -> float | None:
    try:
        return json.loads(row.get("extra") or "{}").get("accuracy")
    except ValueError:
        return None


def sparse_points(s: LabSettings, seed: int = 0) -> tuple[SweepPoint, ...]:
    """The lab's sparse-regime runs: OPD, RL, SFT with weights in bf16 throughout at ``s.sparse_lr`` (a rate
    where accuracy still rises; measured with `opdviz lab sweep`, see README "Demo"), no weight decay."""
    return tuple(SweepPoint(m, s.sparse_lr, "bf16", 0.0, seed, s.sparse_steps, s.sparse_batch, s.group)
                 for m in ("opd", "rl", "sft"))


# what data/demo/sparse/<method>/ holds
DEMO_SPARSE = sparse_points(LabSettings())


def write_demo_sparse(lab: Path, points: tuple[SweepPoint, ...] = DEMO_SPARSE,
                      progress: Callable[[str], None] | None = None, data_seed: int = 0,
                      task: tuple[int, int] | None = None) -> dict[str, dict]:
    """Train the sparse-regime ``points`` from ``lab/base`` and write them to ``lab/sparse/<method>/``
    (``task`` = (digits, test_size) of the lab; default: from ``lab/lab.json``).

    Deterministic (one thread, deterministic algorithms, fixed generators): rerunning writes
    byte-identical checkpoints. Returns method → metrics.json dict.
    """
    lab = Path(lab)
    prev = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    out = {}
    try:
        inputs = LabInputs.load(lab, data_seed, task)
        for p in points:
            if progress:
                progress(f"[lab] sparse regime: {p.label}")
            model, metrics = train_point(p, inputs)
            metrics["method"] = METHODS[p.method]
            metrics.pop("train_s", None)         # wall time would make metrics.json differ between reruns
            save_hf(model, lab / "sparse" / p.method, {"lab_tokenizer.json": inputs.task.tokenizer.to_json(),
                                                        "metrics.json": metrics})
            out[p.method] = metrics
    finally:
        torch.use_deterministic_algorithms(prev[0])
        torch.set_num_threads(prev[1])
    return out
