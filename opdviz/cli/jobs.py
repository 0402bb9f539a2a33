"""``opdviz worker`` and ``opdviz jobs``: the queue behind the dashboard's "New analysis" page.

``opdviz worker --db PATH`` runs queued jobs one at a time (the dashboard starts one by itself,
detached; at most one runs per database) and exits once the queue has been empty for a while.
``opdviz jobs --db PATH`` lists the jobs with their progress; ``--cancel ID`` stops one,
``--resume ID`` queues a failed or cancelled one again (stored tensors are not recomputed).
"""

from __future__ import annotations

import argparse
import time

from opdviz.options import finite_number
from opdviz.cli.compute import DEFAULT_DB


def register(sub) -> None:
    w = sub.add_parser("worker", help="run queued analyses one at a time (the dashboard starts this itself)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    w.add_argument("--db", default=DEFAULT_DB, help=f"DuckDB store (default: {DEFAULT_DB})")
    w.add_argument("--idle-exit", type=finite_number(0), default=None, metavar="SECONDS",
                   help="exit after the queue has been empty this long (default: 30)")
    w.set_defaults(func=worker_main)

    j = sub.add_parser("jobs", help="list queued, running and finished analyses; cancel or resume one",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    j.add_argument("--db", default=DEFAULT_DB, help=f"DuckDB store (default: {DEFAULT_DB})")
    act = j.add_mutually_exclusive_group()
    act.add_argument("--cancel", metavar="ID", help="cancel a queued or running job (it stays resumable)")
    act.add_argument("--resume", metavar="ID", help="queue a failed or cancelled job again and start a worker")
    j.set_defaults(func=jobs_main)


def worker_main(args: argparse.Namespace) -> int:
    from opdviz.engine import queue as jobs

    kw = {} if args.idle_exit is None else {"idle_exit_s": args.idle_exit}
    if not jobs.work(args.db, **kw):
        print(f"a worker is already running for {args.db}")
    return 0


def jobs_main(args: argparse.Namespace) -> int:
    from opdviz.engine import queue as jobs

    if args.cancel:
        print(f"{args.cancel}: {jobs.cancel(args.db, args.cancel)}")
        return 0
    if args.resume:
        jobs.resume(args.db, args.resume)
        jobs.ensure_worker(args.db)
        print(f"{args.resume}: queued")
        return 0
    listed = jobs.list_jobs(args.db)
    if not listed:
        print(f"no jobs for {args.db}")
    for job in listed:
        print(f"{job.id}  {job.state:<9}  {time.strftime('%Y-%m-%d %H:%M', time.localtime(job.created))}  "
              f"base {job.base}")
        for r in job.runs:
            total = "?" if r.n_total is None else r.n_total
            failed = f", {r.n_failed} failed" if r.n_failed else ""
            state = (f"interrupted after {r.n_done} of {total} tensors" if r.status == "interrupted"
                     else f"{r.status} {r.n_done}/{total} tensors")
            print(f"    {r.run_id} ({r.method}): {state}{failed}" + (f"  · {r.current}" if r.current else ""))
        if job.error:
            print(f"    error: {job.error}")
    return 0
