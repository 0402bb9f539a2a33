"""Time every dashboard page on a 7B-sized store (Llama-2-7B shapes: 32 layers × 7 projections + embed/head,
3 runs, every metric and array), with Streamlit's AppTest — no browser, so this is server-side time.

    .venv/bin/python bench/bench_pages.py [--out bench/out] [--repeat 5] [--browser] [--runs 3] [--layers 32]

``--runs N`` builds the store with N runs (a sweep: OPD, RL, SFT, … cycling method labels) to check
that a store with many runs stays as responsive as one with 3; ``--layers`` shrinks the model.
``--runs 3,50`` times both stores, alternating between them render by render (a shared machine's speed
drifts by ±50 % over minutes; alternating keeps the two on the same footing) and prints their ratio.

Columns:
  cold   first render with empty caches (st.cache_data, the built figures and the query memo cleared: every query runs;
         the background warmer is off). Not cleared: what depends on no store (the Plotly template and the
         layout of each facet-grid shape, made once per server process, like the imports)
  warm   the same page rendered again (cached queries: what a rerun, a revisit, or a page the background
         warmer already built costs)
Each number is the median of --repeat runs. The store is built once under --out (about 300 MB).

--browser also times what a user sees: ``streamlit run app.py`` on the store (warmer off) driven by
Debian's Chromium through Playwright; from a click on the page's link in the sidebar until the script
is idle and every figure of the page is drawn. ``first`` is the first visit of the page in a fresh
server (its figures not cached yet), ``again`` a later visit; once with the background warmer off, once
with it on (the default: after a page is drawn, the server builds the other pages' figures).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

# bump when the stored layout changes, so a cached store from an older layout is not timed
STORE_LAYOUT = "v5"
PAGES = ("overview", "sparsity", "spectra", "geometry", "tensor", "compare")


def sweep_runs(n: int) -> tuple:
    """3 runs: OPD, RL, SFT (as before); more: a sweep of (run id, method) pairs cycling the three."""
    if n == 3:
        return ("OPD", "RL", "SFT")
    return tuple((f"{m}-{i:02d}", m) for i, m in zip(range(n), ("OPD", "RL", "SFT") * n))


def build_store(out: Path, runs: int = 3, layers: int | None = None) -> Path:
    from synthetic import SEVEN_B, make_synthetic_store

    shape = {**SEVEN_B, **({"layers": layers} if layers else {})}
    tag = "" if (runs, shape["layers"]) == (3, SEVEN_B["layers"]) else f"_{runs}runs_{shape['layers']}l"
    db = out / f"pages_7b_{STORE_LAYOUT}{tag}.duckdb"
    if not db.exists():
        out.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        make_synthetic_store(db, runs=sweep_runs(runs), seed=0, **shape)
        print(f"built {db} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    return db


def _app():
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    at.run()
    return at


def _timed_run(at) -> float:
    t = time.perf_counter()
    at.run()
    dt = time.perf_counter() - t
    assert not at.exception, [e.message for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    return dt


def cold_and_warm(page: str, db: Path | None = None) -> tuple[float, float]:
    import streamlit as st

    from opdviz.dashboard import cache

    if db is not None:
        os.environ["OPDVIZ_DB"] = str(db)
    at = _app()
    st.cache_data.clear()
    cache.MEMO.clear()
    cache.warmer().clear()
    if page != "overview":
        at.switch_page(f"pages/{page}.py")
    return _timed_run(at), _timed_run(at)


def browser_times(db: Path, port: int = 8765, warmer: bool = False) -> list[tuple[str, float, float]]:
    import subprocess
    import urllib.request

    from playwright.sync_api import sync_playwright

    from opdviz.views.registry import figures_for

    env = {**os.environ, "OPDVIZ_DB": str(db), "OPDVIZ_PREWARM": "1" if warmer else "0"}
    server = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.headless",
                               "true", "--server.port", str(port)], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"]
    drawn = """([title, n]) => {
        const h = document.querySelector('h1');
        const app = document.querySelector('[data-testid="stApp"]');
        const charts = [...document.querySelectorAll('[data-testid="stPlotlyChart"]')];
        return h && h.innerText.trim() === title && app.dataset.testScriptState === 'notRunning'
            && charts.length >= n && charts.every(c => c.querySelector('.main-svg'));
    }"""
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(f"http://localhost:{port}/_stcore/health", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        out = []
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=args)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"http://localhost:{port}/")
            page.wait_for_function(drawn, arg=["Overview", len(figures_for("overview"))], timeout=300_000)
            visits: dict[str, list[float]] = {}
            order = PAGES[1:] + PAGES       # overview was the landing page: its first visit is not timed
            for name in order:
                title = name.capitalize()
                t = time.perf_counter()
                page.get_by_role("link", name=title).first.click()
                page.wait_for_function(drawn, arg=[title, len(figures_for(name))], timeout=300_000)
                visits.setdefault(name, []).append(time.perf_counter() - t)
            browser.close()
        for name in PAGES:
            v = visits[name]
            out.append((name, v[0] if len(v) > 1 else float("nan"), v[-1]))
        return out
    finally:
        server.terminate()
        server.wait(timeout=30)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--browser", action="store_true", help="also time page switches in Chromium (see above)")
    ap.add_argument("--runs", default="3", help="runs in the store (default 3; e.g. 50 for a sweep; 3,50: both, "
                                                "alternating, with their ratio)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: Llama-2-7B's 32)")
    args = ap.parse_args(argv)
    counts = [int(n) for n in str(args.runs).split(",")]
    dbs = [build_store(args.out, n, args.layers) for n in counts]
    os.environ["OPDVIZ_DB"] = str(dbs[0])
    os.environ["OPDVIZ_PREWARM"] = "0"        # background warming would blur "cold"
    import logging

    logging.getLogger("streamlit").setLevel(logging.ERROR)
    from opdviz.views.registry import figures_for

    load0 = os.getloadavg()[0]
    times: dict[tuple[str, Path], list[tuple[float, float]]] = {}
    for page in PAGES:
        for _ in range(args.repeat):
            for db in dbs:                    # alternate: both stores see the same machine
                times.setdefault((page, db), []).append(cold_and_warm(page, db))
    for n, db in zip(counts, dbs):
        print(f"store: {db} ({db.stat().st_size / 2**20:.0f} MiB), {n} runs × {(args.layers or 32) * 7 + 2} matrices")
    print(f"load {load0:.1f} → {os.getloadavg()[0]:.1f}; median of {args.repeat}; seconds per page render "
          "(AppTest, server side), cold / warm")
    head = "".join(f" {f'{n} runs':>15}" for n in counts) + (f" {'ratio cold':>11}" if len(dbs) > 1 else "")
    print(f"{'page':<10} {'figures':>7}{head}")
    for page in PAGES:
        cells, colds = "", []
        for db in dbs:
            cold = statistics.median(c for c, _ in times[(page, db)])
            warm = statistics.median(w for _, w in times[(page, db)])
            colds.append(cold)
            cells += f" {cold:>7.2f} / {warm:<5.2f}"
        ratio = f" {colds[-1] / colds[0]:>10.2f}×" if len(dbs) > 1 else ""
        print(f"{page:<10} {len(figures_for(page)):>7}{cells}{ratio}")
    if args.browser:
        for warmer in (False, True):
            print(f"\nin Chromium (click on the page's link → every figure drawn), seconds; background warmer "
                  f"{'on (the default): pages clicked as soon as the previous one is drawn' if warmer else 'off'}")
            print(f"{'page':<10} {'first':>7} {'again':>7}")
            for page, first, again in browser_times(dbs[0], warmer=warmer):
                print(f"{page:<10} {first:>7.2f} {again:>7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
