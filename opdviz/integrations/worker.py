"""The analysis worker of ``OpdvizCallback``: a separate process that turns snapshots into a trajectory.

Started by the callback as ``python -m opdviz.integrations.worker CONFIG_JSON``; reads one JSON line per
event on stdin, in order, each sent only after its snapshot file is completely written:

    {"step": N, "file": "step-N.safetensors", "loss": …, "loss_step": …, "learning_rate": …, "epoch": …}
    {"end": true, "final_step": N}

Each step is analysed against ``base.safetensors`` at once by the normal job (run ``NAME@N``, resumable).
At "end" the trajectory metrics are computed over every step (``opdviz.engine.trajectory.run_trajectory``) and
the intermediate snapshots are deleted unless ``keep_snapshots``. End of input without "end" means the
training process died: the steps already received are finished, the status says "interrupted", and
the command to finish the trajectory by hand is recorded in the status message.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

from opdviz.engine.runner import JobSpec, run_job
from opdviz.engine.live import write_status
from opdviz.options import AnalysisOptions
from opdviz.engine.trajectory import TrajectorySpec, run_trajectory


def _log(msg: str) -> None:
    print(f"opdviz: {msg}", file=sys.stderr, flush=True)


def main(argv: list[str]) -> int:
    cfg = json.loads(argv[0])
    db, name, method, folder = Path(cfg["db"]), cfg["name"], cfg["method"], Path(cfg["dir"])
    opts = AnalysisOptions.from_json(cfg["options"])
    base = folder / "base.safetensors"
    done: list[int] = []
    queued: list[int] = []
    write_status(db, name, status="running", pid=os.getpid(), steps_done=[], steps_queued=[], train_step=0,
                 method=method, every_n_steps=cfg["every_n_steps"], message="")
    ended = None
    try:
        for line in sys.stdin:
            event = json.loads(line)
            if event.get("end"):
                ended = event
                break
            step = int(event["step"])
            queued.append(step)
            write_status(db, name, train_step=step, steps_queued=queued)
            train = {k: event.get(k) for k in ("loss", "loss_step", "learning_rate", "epoch")}
            spec = JobSpec(base=base, post=folder / event["file"], run_id=f"{name}@{step}", method=method, db=db,
                           options=opts, trajectory=name, step=step,
                           extra={"train": {"step": step, **train}, "live": True, "trajectory_k": cfg["k"],
                                  "hill_frac": cfg["hill_frac"]})
            run_job(spec, progress=False, log=_log)
            done.append(step)
            queued.remove(step)
            write_status(db, name, steps_done=done, steps_queued=queued)
        if ended is None:
            write_status(db, name, status="interrupted", message=(
                f"training stopped at step {done[-1] if done else 0} before its end; steps {done} are stored. "
                f"Trajectory metrics: opdviz trajectory --db {db} {base} {' '.join(str(folder / f'step-{s}.safetensors') for s in done)} "
                f"--name {name} --method {method}"))
            _log(f"trajectory {name}: training ended early; {len(done)} steps stored")
            return 0
        steps = tuple((s, folder / f"step-{s}.safetensors") for s in sorted(done))
        if steps:
            run_trajectory(TrajectorySpec(base=base, checkpoints=steps, name=name, method=method, db=db, options=opts,
                                          k=cfg["k"], hill_frac=cfg["hill_frac"]), progress=False, log=_log)
        if not cfg["keep_snapshots"]:
            for _, path in steps[:-1]:
                path.unlink(missing_ok=True)
        write_status(db, name, status="done", train_step=ended.get("final_step"), message="")
        _log(f"trajectory {name}: {len(done)} steps analysed → {db}")
        return 0
    except BaseException as exc:
        write_status(db, name, status="failed", message=f"{type(exc).__name__}: {exc}")
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
