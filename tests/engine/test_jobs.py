"""The job queue behind the "New analysis" page: one worker per database, jobs one after another,
cancel, resume after a kill, a worker that died, and clear errors for bad locations and inputs."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import factory
from opdviz.engine import jobfiles, worker
from opdviz.engine import queue as jobs
from opdviz.cli import jobs as jobs_cmd
from opdviz.errors import OptionsError, StoreError
from opdviz.engine.queue import JobRequest
from opdviz.store import Store
from waiting import wait_for as _wait_for

N_TENSORS = len(factory.make_llama_state())



def wait_for(predicate, timeout=180.0, what="condition"):
    return _wait_for(predicate, timeout, what)


def states(db) -> dict[str, str]:
    return {j.id: j.state for j in jobs.list_jobs(db)}


def request(pair, *names, method="OPD") -> JobRequest:
    return JobRequest(base=str(pair[0]), posts=tuple((str(pair[1]), n, method) for n in names))


@pytest.fixture
def stop_workers(tmp_path):
    """Workers a test started detached are stopped at its end (by the pid in their lock file, checked
    against /proc so that no other process is touched)."""
    yield
    for lock in tmp_path.rglob("worker.lock"):
        words = lock.read_text().split()
        if len(words) != 2 or not words[1].isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{words[1]}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "opdviz.engine.queue" in cmdline and str(tmp_path) in cmdline:
            os.kill(int(words[1]), 15)


def test_two_submissions_run_one_after_the_other(llama_pair, tmp_path, stop_workers):
    db = tmp_path / "q.duckdb"
    ids: list[str] = []
    threads = [threading.Thread(target=lambda n=n: ids.append(jobs.submit(db, request(llama_pair, n))))
               for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ids)) == 2 and set(states(db).values()) == {"queued"}
    started = [jobs.ensure_worker(db, idle_exit_s=2), jobs.ensure_worker(db, idle_exit_s=2)]
    assert started == [True, False]  # one worker per database

    seen_running: list[tuple[str, ...]] = []

    def all_done():
        listed = jobs.list_jobs(db)
        seen_running.append(tuple(j.id for j in listed if j.state == "running"))
        return all(j.state == "done" for j in listed)

    wait_for(all_done, what="both jobs done")
    assert max(len(r) for r in seen_running) <= 1
    a, b = sorted(jobs.list_jobs(db), key=lambda j: j.started)
    assert a.finished <= b.started  # never two compute processes at once
    runs = Store(db).runs().set_index("run_id")
    assert set(runs.index) == {"a", "b"} and (runs.status == "done").all()
    for job in (a, b):
        (r,) = job.runs
        assert r.status == "done" and r.n_done == r.n_total == N_TENSORS and r.bytes_done == r.bytes_total > 0
    wait_for(lambda: not jobs.worker_alive(db), timeout=30, what="the idle worker to exit")


def test_a_run_name_cannot_be_queued_twice(llama_pair, tmp_path):
    db = tmp_path / "q.duckdb"
    jobs.submit(db, request(llama_pair, "a"))
    with pytest.raises(OptionsError, match="already queued"):
        jobs.submit(db, request(llama_pair, "a"))
    with pytest.raises(OptionsError, match="must differ"):
        jobs.submit(db, request(llama_pair, "x", "x"))
    with pytest.raises(OptionsError, match="criterion"):
        jobs.submit(db, JobRequest(str(llama_pair[0]), ((str(llama_pair[1]), "c", "RL"),),
                                   options=json.dumps({"criterion": "nope"})))


def test_cancel_a_queued_job_then_resume_it(llama_pair, tmp_path):
    db = tmp_path / "q.duckdb"
    first = jobs.submit(db, request(llama_pair, "a"))
    second = jobs.submit(db, request(llama_pair, "b"))
    assert jobs.cancel(db, second) == "cancelled"
    assert jobs.work(db, idle_exit_s=0)
    assert states(db) == {first: "done", second: "cancelled"}
    with pytest.raises(OptionsError, match="only a failed or cancelled"):
        jobs.resume(db, first)
    jobs.resume(db, second)
    assert states(db)[second] == "queued"
    assert jobs.work(db, idle_exit_s=0)
    assert states(db) == {first: "done", second: "done"}


@pytest.fixture(scope="module")
def bigger_pair(tmp_path_factory):
    cfg = factory.llama_config(layers=4, hidden=96, ffn=256, heads=4, kv_heads=2, vocab=128)
    return factory.make_pair(tmp_path_factory.mktemp("big"), cfg=cfg)


def test_cancel_a_running_job_keeps_it_resumable(bigger_pair, tmp_path, stop_workers):
    db = tmp_path / "q.duckdb"
    job_id = jobs.submit(db, request(bigger_pair, "big"))
    jobs.ensure_worker(db, idle_exit_s=1)
    wait_for(lambda: jobs.get_job(db, job_id).runs[0].n_done >= 2, what="the job to store tensors")
    assert jobs.cancel(db, job_id) == "running"  # SIGTERM sent; the worker records the end
    job = wait_for(lambda: (j := jobs.get_job(db, job_id)).state == "cancelled" and j, what="cancelled")
    assert "Resume" in job.error
    stored = Store(db).run_row("big")
    assert stored["status"] == "interrupted"  # the engine recorded the interruption itself
    n_stored = len(Store(db).done_tensors("big"))
    jobs.resume(db, job_id)
    jobs.ensure_worker(db, idle_exit_s=1)
    job = wait_for(lambda: (j := jobs.get_job(db, job_id)).state == "done" and j, what="resumed job done")
    assert job.attempts == 2 and Store(db).run_row("big")["status"] == "done"
    assert len(Store(db).done_tensors("big")) >= n_stored
    log = job.log.read_text()
    assert "resuming 'big'" in log


def test_a_killed_job_fails_with_resume_and_resumes(bigger_pair, tmp_path, monkeypatch):
    db = tmp_path / "q.duckdb"
    job_id = jobs.submit(db, request(bigger_pair, "k"))
    monkeypatch.setenv("OPDVIZ_FAULT", "after:3")  # the compute child SIGKILLs itself after 3 tensors
    assert jobs.work(db, idle_exit_s=0)
    job = jobs.get_job(db, job_id)
    assert job.state == "failed" and "SIGKILL" in job.error and "Resume" in job.error
    (r,) = job.runs
    assert r.n_done == 3 and r.status == "interrupted" and r.n_total > 3
    monkeypatch.delenv("OPDVIZ_FAULT")
    jobs.resume(db, job_id)
    assert jobs.work(db, idle_exit_s=0)
    job = jobs.get_job(db, job_id)
    assert job.state == "done" and job.runs[0].n_done == job.runs[0].n_total
    assert "resuming 'k': 3 of" in job.log.read_text()


def test_a_dead_worker_leaves_a_resumable_failed_job(llama_pair, tmp_path):
    db = tmp_path / "q.duckdb"
    job_id = jobs.submit(db, request(llama_pair, "w"))
    with jobfiles.queue_lock(db):
        worker.claim_next(db)  # claimed by a worker that then vanished (no worker lock held)
    job = jobs.get_job(db, job_id)
    assert job.state == "failed" and "worker stopped" in job.error
    jobs.resume(db, job_id)
    assert jobs.work(db, idle_exit_s=0)
    assert jobs.get_job(db, job_id).state == "done"


def test_bad_input_fails_the_job_with_the_readers_message(llama_pair, tmp_path):
    db = tmp_path / "q.duckdb"
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((10 ** 12).to_bytes(8, "little") + b"{}")
    job_id = jobs.submit(db, JobRequest(str(llama_pair[0]), ((str(bad), "bad", "RL"),)))
    assert jobs.work(db, idle_exit_s=0)
    job = jobs.get_job(db, job_id)
    assert job.state == "failed" and "exceeds the safetensors cap" in job.error and "Traceback" not in job.error


def test_nan_weights_are_recorded_failures_and_the_job_goes_on(tmp_path):
    cfg = factory.llama_config(layers=1, hidden=32, ffn=64, vocab=48)
    base = factory.make_llama_state(cfg)
    post = factory.post_train(base)
    post["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
    post["model.layers.0.mlp.down_proj.weight"][1, 1] = float("inf")
    b = factory.save_checkpoint(base, tmp_path / "b", config=cfg)
    p = factory.save_checkpoint(post, tmp_path / "p", config=cfg)
    db = tmp_path / "q.duckdb"
    job_id = jobs.submit(db, JobRequest(str(b), ((str(p), "nan", "SFT"),)))
    assert jobs.work(db, idle_exit_s=0)
    job = jobs.get_job(db, job_id)
    assert job.state == "done"
    (r,) = job.runs
    assert r.n_failed == 2 and r.n_done == len(base)


def test_unwritable_database_location_is_a_store_error(llama_pair, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="must be writable"):
        jobs.submit(blocker / "q.duckdb", request(llama_pair, "a"))


def test_full_disk_is_a_store_error_and_leaves_no_job(llama_pair, tmp_path, monkeypatch):
    import errno

    db = tmp_path / "q.duckdb"

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(jobfiles.os, "replace", full)
    with pytest.raises(StoreError, match="disk is full"):
        jobs.submit(db, request(llama_pair, "a"))
    monkeypatch.undo()
    assert jobs.list_jobs(db) == [] and not list(jobs.queue_dir(db).glob("*.tmp"))


def test_cli_lists_and_cancels(llama_pair, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    jobs_cmd.register(parser.add_subparsers(dest="command"))
    db = tmp_path / "q.duckdb"
    job_id = jobs.submit(db, request(llama_pair, "cli"))
    args = parser.parse_args(["jobs", "--db", str(db)])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert job_id in out and "queued" in out and "cli (OPD)" in out
    args = parser.parse_args(["jobs", "--db", str(db), "--cancel", job_id])
    assert args.func(args) == 0 and "cancelled" in capsys.readouterr().out
    args = parser.parse_args(["worker", "--db", str(db), "--idle-exit", "0"])
    assert args.func(args) == 0


def test_worker_command_runs_in_its_own_process(llama_pair, tmp_path):
    """``python -m opdviz.engine.queue worker`` is what ensure_worker starts; it exits when the queue is empty."""
    db = tmp_path / "q.duckdb"
    job_id = jobs.submit(db, request(llama_pair, "p"))
    proc = subprocess.run([sys.executable, "-m", "opdviz.engine.queue", "worker", "--db", str(db), "--idle-exit", "0"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert jobs.get_job(db, job_id).state == "done"
    assert Path(str(db) + ".staging/queue").is_dir()
