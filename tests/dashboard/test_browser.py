"""End-to-end: the real dashboard in Debian's Chromium, driven by Playwright.

A module fixture computes a small store with ``opdviz compute`` from two tiny Llama pairs that share a base
(tests/factory.py), starts ``streamlit run app.py`` on a free port, and the tests open every page (a deep
link first, on a fresh server), change a filter, and download figures through the buttons.

    .venv/bin/pytest tests/dashboard/test_browser.py -m browser -q          # screenshots: $OPDVIZ_SCREENSHOTS or a tmp dir

Skipped when /usr/bin/chromium or playwright is missing. Never runs ``playwright install``.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[2]
PAGES = ("sparsity", "overview", "spectra", "geometry", "tensor", "compare")   # a deep link comes first
IDLE = '[data-testid="stApp"][data-test-script-state="notRunning"]'
DRAWN = '[data-testid="stPlotlyChart"] .main-svg'

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is missing"),
]
playwright_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def db(tmp_path_factory) -> Path:
    """Two runs (OPD-like sparse, SFT-like dense) of one base, computed by the real ``opdviz compute``."""
    import factory

    root = tmp_path_factory.mktemp("browser")
    base, sparse = factory.make_pair(root / "a", seed=0, density=0.3)
    _, dense = factory.make_pair(root / "b", seed=0, density=0.95, scale=4e-3)
    path = root / "store.duckdb"
    done = subprocess.run([sys.executable, "-m", "opdviz.cli", "compute", str(base), str(sparse), str(dense),
                           "--method", "OPD", "SFT", "--name", "opd", "sft", "--db", str(path), "--no-progress"],
                          cwd=root, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stderr
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(db, tmp_path_factory):
    """(url, log file) of a ``streamlit run app.py`` on a free port, stopped after the module."""
    port = _free_port()
    log = tmp_path_factory.mktemp("streamlit") / "streamlit.log"
    env = {**os.environ, "OPDVIZ_DB": str(db), "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true",
                                 "--server.port", str(port), "--server.address", "127.0.0.1"],
                                # no other settings: the project's .streamlit/config.toml governs (tested below)
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    try:
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            try:                                      # waits 0.2 s, and notices an early exit
                proc.wait(timeout=0.2)
                pytest.fail(f"streamlit exited with {proc.returncode}:\n{log.read_text()}")
            except subprocess.TimeoutExpired:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"streamlit did not become healthy in 60 s:\n{log.read_text()}")
        yield url, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def server(served) -> str:
    return served[0]


@pytest.fixture(scope="module")
def requests_seen() -> list[str]:
    return []


@pytest.fixture(scope="module")
def page(server, requests_seen):
    with playwright_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        context = browser.new_context(viewport={"width": 1400, "height": 4200}, accept_downloads=True)
        tab = context.new_page()
        tab.on("request", lambda req: requests_seen.append(req.url))
        tab.set_default_timeout(60_000)
        yield tab
        context.close()
        browser.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("OPDVIZ_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _url(server: str, name: str) -> str:
    return f"{server}/" if name == "overview" else f"{server}/{name}"     # the default page lives at /


def _open(page, url: str, title: str) -> None:
    page.goto(url)
    page.get_by_role("heading", name=title, level=1).wait_for()
    page.wait_for_selector(IDLE)
    page.wait_for_selector(DRAWN)
    page.wait_for_selector(IDLE)
    assert page.get_by_role("dialog").count() == 0, page.get_by_role("dialog").first.inner_text()


def test_every_page_draws_its_figures(page, server, shots):
    for name in PAGES:
        _open(page, _url(server, name), name.capitalize())
        assert page.locator('[data-testid="stSidebar"]').get_by_text("Database").count() == 1
        assert page.locator(DRAWN).count() >= 1
        assert page.locator('[data-testid="stException"]').count() == 0
        page.screenshot(path=str(shots / f"{name}.png"), full_page=True)
    print(f"screenshots in {shots}")


def test_changing_the_criterion_redraws_and_updates_the_url(page, server):
    _open(page, f"{server}/sparsity", "Sparsity")
    chart_title = page.locator('[data-testid="stPlotlyChart"] .gtitle').first
    before = chart_title.text_content()
    box = page.locator('[data-testid="stSidebar"] [data-testid="stSelectbox"]').filter(has_text="means")
    box.click()
    page.get_by_role("option", name="exact: any stored bit changed").click()
    playwright_api.expect(chart_title).not_to_have_text(before)
    playwright_api.expect(page).to_have_url(re.compile(r"crit=exact"))
    page.wait_for_selector(IDLE)
    assert "bitwise" in chart_title.text_content()


@pytest.mark.parametrize("fmt, magic", [("PNG", b"\x89PNG\r\n\x1a\n"), ("SVG", b"<svg"), ("PDF", b"%PDF-")])
def test_figure_downloads_are_real_files(page, server, fmt, magic):
    if page.url.rstrip("/") != server:
        _open(page, _url(server, "overview"), "Overview")
    button = page.locator('[data-testid="stDownloadButton"]').get_by_role("button", name=fmt, exact=True).first
    with page.expect_download(timeout=90_000) as info:
        button.click()
    data = Path(info.value.path()).read_bytes()
    assert magic in data[:512], data[:64]
    assert info.value.suggested_filename.endswith(f".{fmt.lower()}")


def test_no_request_leaves_the_machine(page, server, served, requests_seen):
    """Every page, opened as a user would, only ever talks to the dashboard's own host: no usage statistics,
    fonts, favicon or scripts from elsewhere (the project's .streamlit/config.toml, no flags). The server
    watches no files (server.fileWatcherType = "none"), so no inotify warning about the virtualenv."""
    import tomllib
    from urllib.parse import urlparse

    for name in PAGES:
        _open(page, _url(server, name), name.capitalize())
    for path, title in (("overlap", "Overlap"), ("trajectory", "Trajectory"), ("new_analysis", "New analysis")):
        page.goto(f"{server}/{path}")                  # no overlap/trajectory in this store: their notices
        page.get_by_role("heading", name=title, level=1).wait_for()
        page.wait_for_selector(IDLE)
    assert requests_seen, "no request was recorded"
    hosts = {urlparse(u).hostname for u in requests_seen if urlparse(u).scheme in ("http", "https", "ws", "wss")}
    assert hosts == {"127.0.0.1"}, sorted(u for u in requests_seen if urlparse(u).hostname != "127.0.0.1")[:10]
    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    assert config["browser"]["gatherUsageStats"] is False and config["server"]["fileWatcherType"] == "none"
    log = served[1].read_text()
    assert "inotify" not in log.lower() and "watch" not in log.lower(), log


def test_figure_zip_carries_its_provenance(page, server):
    import json
    import zipfile

    _open(page, _url(server, "overview"), "Overview")
    button = page.locator('[data-testid="stDownloadButton"]').get_by_role("button", name="ZIP", exact=True).first
    with page.expect_download(timeout=90_000) as info:
        button.click()
    zf = zipfile.ZipFile(info.value.path())
    names = set(zf.namelist())
    assert {"manifest.json", "README.txt"} <= names and any(n.endswith(".pdf") for n in names) \
        and any(n.endswith(".png") for n in names) and any(n.endswith(".csv") for n in names)
    man = json.loads(zf.read("manifest.json"))
    assert {r["run_id"] for r in man["runs"]} == {"opd", "sft"}
    assert all(r["base_fingerprint"] and r["post_path"] for r in man["runs"]) and man["created_at"]
