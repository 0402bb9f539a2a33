"""``OpdvizCallback``: record a live trajectory of the weight update while a ``transformers.Trainer`` trains.

At the start of training the callback copies the weights to host memory and writes them as the base
snapshot; every ``every_n_steps`` optimizer steps, and at the end, it writes the weights again as a step
snapshot. A background *process* (``opdviz.integrations.worker``, started here) analyses each step against
the base as it arrives — the normal job, run ``NAME@STEP`` with ``runs.trajectory = NAME`` — and at the end
computes the trajectory metrics (consecutive sparsity, updates outside the final mask, Sim_K) over all steps.

What training pays: one host copy of the weights per snapshot (tensor by tensor, ``.to("cpu")``; nothing is
copied on the accelerator). Writing the snapshot to disk happens in a background thread while training goes
on; the next snapshot waits for that write, so at most one host copy is in flight. The analysis runs in its
own process (no GIL or DuckDB lock shared with training) on the CPU unless ``options`` says otherwise.

Killed training: the worker sees its input pipe close, finishes the steps already written, marks the
trajectory "interrupted" and exits; every stored step run is complete (the store's fragments are atomic).
The trainer's step, last logged loss and learning rate are stored in each step run's ``runs.extra``
under ``"train"``.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import TrainerCallback

from opdviz.errors import OptionsError
from opdviz.engine.live import live_dir, read_status
from opdviz.options import AnalysisOptions

# Fault injection for tests: "train-kill:N" SIGKILLs the training process right after step N's snapshot
# is handed to the worker (as a crash or an out-of-memory kill would). Unset in normal use.
FAULT_ENV = "OPDVIZ_FAULT"


class OpdvizCallback(TrainerCallback):
    """Analyse the weight update during training, as a live opdviz trajectory.

    Args:
        db: the DuckDB store the trajectory is written to (created if missing).
        name: the trajectory name; the step runs are ``name@step``.
        method: the method label shown in the dashboard (OPD, RL, SFT, DPO…).
        every_n_steps: snapshot and analyse every N optimizer steps (and always at the end).
        options: ``AnalysisOptions`` (default: the defaults, on the CPU).
        k, hill_frac: as ``opdviz trajectory --k/--hill-frac``.
        keep_snapshots: keep every step snapshot after the trajectory metrics are computed (default: keep only
            the base and the final snapshot; the others are deleted).
        wait_at_end: at the end of training, wait until the analysis is finished (default True).
    """

    def __init__(self, db, name: str, method: str = "post-trained", every_n_steps: int = 100, *,
                 options: AnalysisOptions | None = None, k: int = 16, hill_frac: float = 0.10,
                 keep_snapshots: bool = False, wait_at_end: bool = True):
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise OptionsError(f"every_n_steps must be a positive integer, got {every_n_steps!r}")
        if not name or not isinstance(name, str):
            raise OptionsError("OpdvizCallback needs a trajectory name: OpdvizCallback(db=..., name=...)")
        self.db = Path(db)
        self.name = name
        self.method = method
        self.every = every_n_steps
        self.options = options or AnalysisOptions(device="cpu")
        self.k, self.hill_frac = k, hill_frac
        self.keep_snapshots = keep_snapshots
        self.wait_at_end = wait_at_end
        self.dir = live_dir(self.db, name)
        self.worker: subprocess.Popen | None = None
        self._jobs: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._pending: dict | None = None     # the last snapshot's metadata, sent once its loss is logged
        self._last_log: dict = {}
        self._last_step = -1

    # ------------------------------------------------------------------------------------------ Trainer hooks
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero or model is None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        for old in self.dir.glob("step-*.safetensors"):     # a previous run under the same name
            old.unlink()
        if hasattr(model, "config") and hasattr(model.config, "to_dict"):
            (self.dir / "config.json").write_text(json.dumps(model.config.to_dict(), default=str))
        self._start_worker()
        self._snapshot(model, "base.safetensors")
        self._last_step = state.global_step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.worker is None:
            return
        self._flush_pending()
        if state.global_step % self.every == 0 and state.global_step != self._last_step:
            self._take_step(state, model, kwargs.get("lr_scheduler"))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.worker is None or not logs:
            return
        if "loss" in logs:
            self._last_log = {"loss": float(logs["loss"]), "loss_step": state.global_step}
            if "learning_rate" in logs:      # the trainer's own figure for this step wins over the scheduler's
                self._last_log["logged_lr"] = float(logs["learning_rate"])
        if self._pending is not None and self._pending["step"] == state.global_step:
            self._flush_pending()

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.worker is None:
            return
        if state.global_step != self._last_step:
            self._take_step(state, model, kwargs.get("lr_scheduler"))
        self._flush_pending()
        self._jobs.put(("send", {"end": True, "final_step": state.global_step}))
        self._jobs.join()
        self._jobs.put(None)
        self._thread.join()
        self.worker.stdin.close()
        if self.wait_at_end:
            self.worker.wait()
        self._raise_if_failed()
        self.worker = None

    # ------------------------------------------------------------------------------------------ internals
    def _start_worker(self) -> None:
        cfg = {"db": str(self.db), "name": self.name, "method": self.method, "dir": str(self.dir),
               "options": self.options.to_json(), "k": self.k, "hill_frac": self.hill_frac,
               "every_n_steps": self.every, "keep_snapshots": self.keep_snapshots}
        env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
        # its own session: a Ctrl-C aimed at training does not stop the analysis of what is written
        self.worker = subprocess.Popen([sys.executable, "-m", "opdviz.integrations.worker", json.dumps(cfg)],
                                       stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env,
                                       start_new_session=True, text=True)
        self._thread = threading.Thread(target=self._drain, name="opdviz-snapshots", daemon=True)
        self._thread.start()

    def _take_step(self, state, model, scheduler) -> None:
        lr = None
        if scheduler is not None:
            try:
                lr = float(scheduler.get_last_lr()[0])
            except (AttributeError, IndexError, TypeError):
                lr = None
        self._snapshot(model, f"step-{state.global_step}.safetensors")
        self._pending = {"step": state.global_step, "file": f"step-{state.global_step}.safetensors",
                         "learning_rate": lr, "epoch": state.epoch}
        self._last_step = state.global_step

    def _flush_pending(self) -> None:
        if self._pending is None:
            return
        log = dict(self._last_log)
        logged_lr = log.pop("logged_lr", None)
        msg = {**self._pending, **log}
        if logged_lr is not None and log.get("loss_step") == msg["step"]:
            msg["learning_rate"] = logged_lr
        self._pending = None
        self._jobs.put(("send", msg))
        fault = os.environ.get(FAULT_ENV, "")
        if fault.startswith("train-kill:") and msg["step"] >= int(fault.split(":", 1)[1]):
            self._jobs.join()
            os.kill(os.getpid(), signal.SIGKILL)

    def _snapshot(self, model, filename: str) -> None:
        """Copy the weights to host memory now (training waits for this only), write them in the background."""
        self._jobs.join()                 # the previous snapshot is on disk: one host copy in flight at most
        self._raise_if_failed()
        host, seen = {}, set()
        with torch.no_grad():
            for key, t in model.state_dict().items():
                if not t.is_floating_point() or t.numel() == 0:
                    continue
                ptr = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
                if ptr in seen:           # tied weights (lm_head = embed_tokens) are stored once, as HF saves them
                    continue
                seen.add(ptr)
                host[key] = t.detach().to("cpu", copy=True).contiguous()
        self._jobs.put(("write", filename, host))

    def _drain(self) -> None:
        """Background thread: write snapshots (temp name, then atomic rename) and tell the worker, in order."""
        while True:
            job = self._jobs.get()
            try:
                if job is None:
                    return
                if self._error is None:
                    if job[0] == "write":
                        _, filename, host = job
                        tmp = self.dir / f".{filename}.tmp"
                        save_file(host, str(tmp), metadata={"format": "pt", "source": "opdviz.OpdvizCallback"})
                        os.replace(tmp, self.dir / filename)
                        del host, job
                    else:
                        self.worker.stdin.write(json.dumps(job[1]) + "\n")
                        self.worker.stdin.flush()
            except BaseException as exc:   # re-raised in the training thread at the next snapshot
                self._error = exc
            finally:
                self._jobs.task_done()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            exc, self._error = self._error, None
            state = read_status(self.db, self.name) or {}
            raise OptionsError(f"OpdvizCallback: writing a snapshot for the analysis failed ({type(exc).__name__}: "
                               f"{exc}); worker status: {state.get('status')} {state.get('message', '')}") from exc

    def __repr__(self) -> str:
        return (f"OpdvizCallback(db={str(self.db)!r}, name={self.name!r}, method={self.method!r}, "
                f"every_n_steps={self.every})")
