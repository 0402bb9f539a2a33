"""Executors: where the tensors of a job are computed. The driver (``opdviz.engine.runner``) stays the only writer.

An executor has ``name``, ``device_label(options)`` (the device recorded with the runs) and
``run(works, on_result, on_tasks)``: compute every ``Work`` and hand each tensor's rows to ``on_result``.
``LocalExecutor`` (``opdviz.engine.local``) is the plain loop in this process; ``RayExecutor``
(``opdviz.engine.raycluster``) spreads the tensors over a Ray cluster. This module builds one from the
CLI flags.
"""

from __future__ import annotations

from opdviz.engine.local import LocalExecutor
from opdviz.engine.raycluster import RAY_INSTALL_HINT, RayExecutor
from opdviz.errors import OptionsError
from opdviz.options import finite_number

EXECUTORS = ("local", "ray")


def make_executor(name: str, *, ray_address: str | None = None, ray_gpus_per_task: float = 1.0,
                  ray_cpus_per_task: int | None = None):
    """An executor from the CLI flags (``--executor``, ``--ray-address``, ``--ray-gpus-per-task``,
    ``--ray-cpus-per-task``)."""
    if name == "local":
        if ray_address:
            raise OptionsError("--ray-address needs --executor ray")
        return LocalExecutor()
    if name == "ray":
        return RayExecutor(address=ray_address, gpus_per_task=ray_gpus_per_task, cpus_per_task=ray_cpus_per_task)
    raise OptionsError(f"--executor must be one of {', '.join(EXECUTORS)}, not {name!r}")


def add_executor_flags(parser) -> None:
    """``--executor``, ``--ray-address``, ``--ray-gpus-per-task`` (shared by compute and batch)."""
    g = parser.add_argument_group("execution")
    g.add_argument("--executor", choices=EXECUTORS, default="local",
                   help="where tensors are computed: local (this process) or ray (a Ray cluster; "
                        f'needs {RAY_INSTALL_HINT}) (default: local)')
    g.add_argument("--ray-address", default=None, metavar="ADDRESS",
                   help="Ray cluster to join (auto, HOST:6379, ray://HOST:10001); default: start a local Ray "
                        "or use $RAY_ADDRESS")
    g.add_argument("--ray-gpus-per-task", type=finite_number(0), default=1.0, metavar="N",
                   help="GPUs per Ray task when the cluster has GPUs (default: 1; 0.5 puts two tasks on a GPU)")
    g.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads of the job (default: $OPDVIZ_THREADS, else the cores this process may "
                        "run on); OpenMP threads wait passively (OMP_WAIT_POLICY=PASSIVE unless set). On CPU two "
                        "tensors are analysed at once on half the threads each ($OPDVIZ_TENSOR_WORKERS=1: one)")
    g.add_argument("--ray-cpus-per-task", type=int, default=None, metavar="N",
                   help="CPUs (and torch threads) per Ray task on CPU workers (default: this machine's torch "
                        "thread count, so results equal --executor local bit for bit)")
