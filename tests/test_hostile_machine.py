"""A failing machine: concurrent writers and readers, killed workers, cancel, foreign or broken stores, a
full disk. Each case asserts the exit code and message, what the store then says, and that resuming gives
the export of an uninterrupted run."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import duckdb
import pandas as pd
import pytest

import factory
from opdviz.engine import jobfiles
from opdviz.engine import queue as jobs
from opdviz.cli import main as cli
from opdviz.engine.queue import JobRequest
from opdviz.store import Store, computing
from waiting import wait_for as _wait_for

LONG_CFG = factory.llama_config(layers=8, hidden=128, ffn=352, heads=4, kv_heads=2, vocab=160)



def wait_for(predicate, timeout=240.0, what="condition"):
    return _wait_for(predicate, timeout, what)


def compute_cmd(base, post, db, name="run1", *extra) -> list[str]:
    return [sys.executable, "-m", "opdviz.cli", "compute", str(base), str(post), "--name", name, "--method", "OPD",
            "--db", str(db), "--no-progress", *extra]


def compute(base, post, db, name="run1", env=None) -> subprocess.CompletedProcess:
    return subprocess.run(compute_cmd(base, post, db, name), capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


def export(db, out: Path, run: str) -> pd.DataFrame:
    """What ``opdviz metrics`` writes for ``run`` (the public export), without the run name."""
    assert cli(["metrics", "--db", str(db), "--run", run, "--format", "parquet", "-o", str(out)]) == 0
    return pd.read_parquet(out).drop(columns="run").sort_values(["tensor", "metric"]).reset_index(drop=True)


def runs_text(db) -> str:
    proc = subprocess.run([sys.executable, "-m", "opdviz.cli", "runs", "--db", str(db)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def n_stored(db, run: str) -> int:
    return Store(db).stored_counts().get(run, 0)


def gone(pid: int) -> bool:
    """True once ``pid`` no longer runs (a zombie waiting for a reaper counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    cfg = factory.llama_config(layers=4, hidden=96, ffn=256, heads=4, kv_heads=2, vocab=128)
    return factory.make_pair(tmp_path_factory.mktemp("pair"), cfg=cfg)


@pytest.fixture(scope="module")
def reference(pair, tmp_path_factory) -> pd.DataFrame:
    """The export of an uninterrupted run of ``pair``."""
    root = tmp_path_factory.mktemp("ref")
    proc = compute(*pair, root / "ref.duckdb")
    assert proc.returncode == 0, proc.stderr
    return export(root / "ref.duckdb", root / "ref.parquet", "run1")


@pytest.fixture(scope="module")
def long_pair(tmp_path_factory):
    """A pair with enough tensors that a job is still running when a test stops it."""
    return factory.make_pair(tmp_path_factory.mktemp("long"), cfg=LONG_CFG)


@pytest.fixture
def stop_workers(tmp_path):
    """Workers a test started are stopped at its end (pid from their lock file, checked against /proc)."""
    yield
    for lock in tmp_path.rglob("worker.lock"):
        words = lock.read_text().split()
        if len(words) == 2 and words[1].isdigit() and not gone(int(words[1])):
            if str(tmp_path) in Path(f"/proc/{words[1]}/cmdline").read_bytes().decode(errors="replace"):
                os.kill(int(words[1]), signal.SIGTERM)


# ------------------------------------------------------------------------------ concurrent writers/readers

def test_two_computes_into_one_store_both_complete(pair, reference, tmp_path):
    db = tmp_path / "shared.duckdb"
    procs = [subprocess.Popen(compute_cmd(*pair, db, name), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for name in ("one", "two")]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err
    store = Store(db)
    for name in ("one", "two"):
        row = store.run_row(name)
        assert row["status"] == "done" and row["n_done"] == row["n_tensors"]
        pd.testing.assert_frame_equal(export(db, tmp_path / f"{name}.parquet", name), reference)
    assert cli(["fold", "--db", str(db)]) == 0
    assert not list((Store(db).staging / "tensors").glob("*.parquet"))


def test_concurrent_folds_never_fail_a_job_that_computed_everything(pair, reference, tmp_path):
    """Folds of other processes (``opdviz fold``) run all the while a job computes and ends."""
    db = tmp_path / "folded.duckdb"
    job = subprocess.Popen(compute_cmd(*pair, db), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stop = tmp_path / "stop"
    folders = [subprocess.Popen([sys.executable, "-c", f"""
import time
from pathlib import Path
from opdviz.store import Store
store, end = Store({str(db)!r}), time.monotonic() + 600
while time.monotonic() < end and not Path({str(stop)!r}).exists():
    store.fold(wait=0.05)
    time.sleep(0.02)
"""], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    out, err = job.communicate(timeout=600)
    stop.touch()
    for f in folders:
        _, ferr = f.communicate(timeout=120)
        assert f.returncode == 0, ferr           # no fold failed either
    assert job.returncode == 0, err
    assert Store(db).run_row("run1")["status"] == "done"
    pd.testing.assert_frame_equal(export(db, tmp_path / "e.parquet", "run1"), reference)


def test_a_reader_holding_the_file_delays_folding_but_never_fails_it(pair, reference, tmp_path, monkeypatch):
    """A process holds a read-write connection on the file while the job ends: the job ends 0, its results
    stay staged and readable, and a later fold succeeds."""
    from opdviz.engine import runner as job_mod
    from opdviz.engine.runner import JobSpec, run_job

    db = tmp_path / "held.duckdb"
    small = factory.make_pair(tmp_path / "small", cfg=factory.llama_config(layers=1, hidden=32, ffn=64, vocab=48))
    assert compute(*small, db, "earlier").returncode == 0       # the file exists and holds a run
    holder: list[subprocess.Popen] = []
    real_finish = job_mod._finish_run

    def finish_while_held(*args, **kw):     # the job has computed everything: now a reader takes the file
        if not holder:
            holder.append(subprocess.Popen([sys.executable, "-c", f"""
import duckdb, sys
con = duckdb.connect({str(db)!r})          # read-write: every other process is locked out
con.execute("SELECT count(*) FROM runs").fetchall()
print("holding", flush=True)
sys.stdin.readline()
"""], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
            assert holder[0].stdout.readline().strip() == "holding"
        return real_finish(*args, **kw)

    monkeypatch.setattr(job_mod, "_finish_run", finish_while_held)
    monkeypatch.setattr(job_mod, "FOLD_WAIT_S", 1.0)
    notes: list[str] = []
    try:
        row = run_job(JobSpec(base=pair[0], post=pair[1], run_id="run1", method="OPD", db=db), progress=False,
                      log=notes.append)
        assert row["status"] == "done" and row["n_done"] == row["n_tensors"]
        assert any("was busy" in n for n in notes), notes
    finally:
        for h in holder:
            h.communicate("release\n", timeout=60)
    assert list((Store(db).staging / "tensors").glob("*.parquet")), "the results stay staged"
    assert Store(db).run_row("run1")["status"] == "done"
    pd.testing.assert_frame_equal(export(db, tmp_path / "staged.parquet", "run1"), reference)
    assert cli(["fold", "--db", str(db)]) == 0
    assert not list((Store(db).staging / "tensors").glob("*.parquet"))
    pd.testing.assert_frame_equal(export(db, tmp_path / "folded.parquet", "run1"), reference)
    assert Store(db).run_row("earlier")["status"] == "done"


# -------------------------------------------------------------------------------- no orphans, honest status

def test_kill_9_of_the_worker_stops_its_compute(long_pair, tmp_path, stop_workers, capsys):
    db = tmp_path / "q.duckdb"
    job_id = jobs.submit(db, JobRequest(str(long_pair[0]), ((str(long_pair[1]), "long", "OPD"),)))
    worker = subprocess.Popen([sys.executable, "-m", "opdviz.engine.queue", "worker", "--db", str(db), "--idle-exit", "0"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        child = wait_for(lambda: (jobfiles.read_json(jobfiles.job_path(db, job_id)) or {}).get("child_pid"),
                         what="the compute process")
        wait_for(lambda: jobs.get_job(db, job_id).runs[0].n_done >= 2, what="two stored tensors")
        assert not gone(child) and jobs.get_job(db, job_id).state == "running"
        worker.kill()
        worker.wait(timeout=30)
        wait_for(lambda: gone(child), timeout=30, what=f"the compute process {child} to stop")
    finally:
        if worker.poll() is None:
            worker.kill()
    job = jobs.get_job(db, job_id)
    (run,) = job.runs
    stored = n_stored(db, "long")
    assert job.state == "failed" and "Resume" in job.error
    assert run.status == "interrupted" and run.n_done == stored and 2 <= stored < run.n_total
    text = runs_text(db)
    assert " running " not in text and f"interrupted after {stored} of {run.n_total}" in text
    capsys.readouterr()
    assert cli(["jobs", "--db", str(db)]) == 0
    assert f"long (OPD): interrupted after {stored} of {run.n_total} tensors" in capsys.readouterr().out
    # resume continues from there to what an uninterrupted run stores
    jobs.resume(db, job_id)
    assert jobs.work(db, idle_exit_s=0)
    assert jobs.get_job(db, job_id).state == "done"
    ref = tmp_path / "ref.duckdb"
    assert compute(*long_pair, ref, "long").returncode == 0
    pd.testing.assert_frame_equal(export(db, tmp_path / "a.parquet", "long"),
                                  export(ref, tmp_path / "b.parquet", "long"))


def test_cancel_stops_the_compute_and_counts_what_is_stored(pair, reference, tmp_path, stop_workers):
    db = tmp_path / "q.duckdb"
    job_id = jobs.submit(db, JobRequest(str(pair[0]), ((str(pair[1]), "run1", "OPD"),)))
    jobs.ensure_worker(db, idle_exit_s=1)
    child = wait_for(lambda: (jobfiles.read_json(jobfiles.job_path(db, job_id)) or {}).get("child_pid"),
                     what="the compute process")
    wait_for(lambda: jobs.get_job(db, job_id).runs[0].n_done >= 2, what="two stored tensors")
    jobs.cancel(db, job_id)
    wait_for(lambda: gone(child), timeout=30, what="the compute process to stop")
    job = wait_for(lambda: (j := jobs.get_job(db, job_id)).state == "cancelled" and j, what="cancelled")
    stored = n_stored(db, "run1")
    from opdviz.store.queries import runs
    row = runs(Store(db)).set_index("run_id").loc["run1"]
    assert row["status"] == "interrupted" and row["n_done"] == stored
    assert f"interrupted after {stored} of {row['n_tensors']} tensors" in row["error"]
    assert job.runs[0].n_done == stored and job.runs[0].status == "interrupted"
    jobs.resume(db, job_id)
    jobs.ensure_worker(db, idle_exit_s=1)
    wait_for(lambda: jobs.get_job(db, job_id).state == "done", what="the resumed job")
    pd.testing.assert_frame_equal(export(db, tmp_path / "e.parquet", "run1"), reference)


def test_runs_never_shows_a_dead_run_as_running(pair, tmp_path):
    db = tmp_path / "dead.duckdb"
    killed = compute(*pair, db, env={"OPDVIZ_FAULT": "after:5"})
    assert killed.returncode == -signal.SIGKILL
    assert Store(db).run_row("run1")["status"] == "running"      # what the killed job left behind
    assert computing(Store(db), "run1") is False
    text = runs_text(db)
    n_total = Store(db).run_row("run1")["n_tensors"]
    assert " running " not in text and "interrupted" in text
    assert f"interrupted after 5 of {n_total} tensors" in text and n_stored(db, "run1") == 5


# ------------------------------------------------------------------------------ the store is checked first

def _foreign_duckdb(path: Path) -> Path:
    with duckdb.connect(str(path)) as con:
        con.execute("CREATE TABLE inventory (item VARCHAR, n INTEGER)")
        con.execute("INSERT INTO inventory VALUES ('bolts', 12)")
    return path


BAD_STORES = {
    "foreign duckdb": (_foreign_duckdb, "not an opdviz store"),
    "text file": (lambda p: p.write_text("name,value\na,1\n") and p, "not a DuckDB file"),
    "empty file": (lambda p: p.write_bytes(b"") or p, "empty (0-byte) file"),
    "folder": (lambda p: p.mkdir() or p, "is a folder"),
}


def _commands(pair, db: Path, tmp: Path) -> dict:
    base, post = map(str, pair)
    batch = tmp / "b.yaml"
    batch.write_text(f"bases:\n  - path: {base}\n    posts:\n      - {{path: {post}, name: x}}\n")
    return {
        "compute": ["compute", base, post, "--name", "x", "--db", str(db), "--no-progress"],
        "batch": ["batch", str(batch), "--db", str(db), "--no-progress"],
        "overlap": ["overlap", "--db", str(db), "--base", base, "--a", post, "--b", post, "--run-a", "a",
                    "--run-b", "b", "--method-a", "A", "--method-b", "B", "--no-progress"],
        "trajectory": ["trajectory", "--db", str(db), base, post, "--steps", "1", "--name", "t", "--method", "RL",
                       "--no-progress"],
        "worker": ["worker", "--db", str(db), "--idle-exit", "0"],
        "demo": ["demo", "--db", str(db), "--no-serve"],
        "fold": ["fold", "--db", str(db), "--wait", "0"],
    }


def _snapshot(path: Path):
    if path.is_dir():
        return sorted(p.name for p in path.iterdir())
    return digest(path)


@pytest.mark.parametrize("kind", list(BAD_STORES))
@pytest.mark.parametrize("command", ["compute", "batch", "overlap", "trajectory", "worker", "demo", "fold"])
def test_a_store_is_checked_before_any_work(pair, tmp_path, capsys, kind, command):
    make, words = BAD_STORES[kind]
    db = make(tmp_path / "store.duckdb")
    before = _snapshot(db)
    assert cli(_commands(pair, db, tmp_path)[command]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and err.count("error:") == 1
    assert _snapshot(db) == before                       # byte-identical (a folder: unchanged listing)
    assert not Path(str(db) + ".staging").exists()       # nothing was staged next to it
    assert not Store(db).staging.exists()


@pytest.mark.parametrize("kind", list(BAD_STORES))
def test_the_dashboard_queue_checks_the_store_first(pair, tmp_path, kind):
    from opdviz.errors import StoreError

    make, words = BAD_STORES[kind]
    db = make(tmp_path / "store.duckdb")
    before = _snapshot(db)
    with pytest.raises(StoreError, match=re.escape(words)):
        jobs.submit(db, JobRequest(str(pair[0]), ((str(pair[1]), "x", "RL"),)))
    assert _snapshot(db) == before and not Store(db).staging.exists()


# ---------------------------------------------------------------------------------------------- disk full

def test_a_full_disk_stops_with_one_message_and_resumes_identically(pair, reference, tmp_path):
    db = tmp_path / "full.duckdb"
    small = factory.make_pair(tmp_path / "small", cfg=factory.llama_config(layers=1, hidden=32, ffn=64, vocab=48))
    assert compute(*small, db, "other").returncode == 0
    other_before = export(db, tmp_path / "o1.parquet", "other")
    other_row = Store(db).run_row("other")
    full = compute(*pair, db, env={"OPDVIZ_FAULT": "enospc:5"})
    assert full.returncode == 2
    err = full.stderr.strip()
    assert "Traceback" not in err and err.count("error:") == 1, err
    assert "is full" in err and "No space left on device" in err and "rerun the same command" in err
    assert "run 'run1': 4 of" in err and "other runs in the store are unchanged" in err
    row = Store(db).run_row("run1")
    assert row["status"] == "interrupted" and row["n_done"] == 4 == n_stored(db, "run1")
    assert "interrupted after 4 of" in runs_text(db)
    pd.testing.assert_frame_equal(export(db, tmp_path / "o2.parquet", "other"), other_before)
    assert Store(db).run_row("other")["updated_at"] == other_row["updated_at"]
    resumed = compute(*pair, db)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming 'run1': 4 of" in resumed.stdout + resumed.stderr
    assert Store(db).run_row("run1")["status"] == "done"
    pd.testing.assert_frame_equal(export(db, tmp_path / "e.parquet", "run1"), reference)


def test_a_full_disk_while_writing_the_status_file_is_the_same_clear_error(tmp_path, monkeypatch):
    import errno

    from opdviz.errors import DiskFullError
    from opdviz.engine.progress import Progress

    store = Store(tmp_path / "s.duckdb")
    bar = Progress(store, "r", 3, 30, 0, 0, show=False)

    def full(self, *a, **k):
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(DiskFullError, match="is full .*Disk quota exceeded.*rerun the same command"):
        bar.advance(10)
    monkeypatch.undo()
    assert not list(bar.path.parent.glob("*.tmp"))


def test_a_full_disk_while_folding_keeps_the_fragments(tmp_path, monkeypatch):
    from opdviz.errors import DiskFullError
    from opdviz.store import RunWriter

    store = Store(tmp_path / "s.duckdb")
    RunWriter(store, "r").write_run({"status": "running"})
    real = duckdb.connect

    def full(*a, **k):
        raise duckdb.IOException("Could not write file \"s.duckdb\": No space left on device")

    monkeypatch.setattr(duckdb, "connect", full)
    with pytest.raises(DiskFullError, match="is full"):
        store.fold(wait=0)
    monkeypatch.setattr(duckdb, "connect", real)
    assert store._fragments("runs") and store.run_row("r")["status"] == "running"
    assert store.fold(wait=1) and not store._fragments("runs")
