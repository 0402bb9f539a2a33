"""The "New analysis" page in a real browser: upload a small pair through the file uploader, start the
job, watch its progress, then open the Sparsity page and see the heatmap. Also a bad upload.

Drives Debian's Chromium through Playwright against ``streamlit run app.py``; everything the app
writes (database, uploads, queue) goes under tmp_path. Screenshots are saved in tmp_path.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

import factory
from waiting import wait_for as _wait_for

CHROMIUM = "/usr/bin/chromium"
REPO = Path(__file__).resolve().parents[2]
APP = os.environ.get("OPDVIZ_TEST_APP", str(REPO / "app.py"))  # another entry file for development only
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--no-first-run"]

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is not installed")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]



def wait_for(predicate, timeout: float, what: str):
    return _wait_for(predicate, timeout, what, every=0.2)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("app")
    (tmp / "server").mkdir()
    port = free_port()
    env = {**os.environ, "OPDVIZ_DB": str(tmp / "db" / "opdviz.duckdb"), "OPDVIZ_UPLOAD_DIR": str(tmp / "uploads"),
           "OPDVIZ_CHECKPOINT_ROOTS": str(tmp / "server"), "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"}
    env.pop("OPDVIZ_FAULT", None)
    log = open(tmp / "streamlit.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", APP, "--server.headless", "true",
                             "--server.port", str(port), "--server.address", "127.0.0.1"],
                            cwd=str(Path(APP).parent), env=env, stdout=log, stderr=subprocess.STDOUT)

    def healthy():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            assert proc.poll() is None, (tmp / "streamlit.log").read_text()
            return False

    wait_for(healthy, 60, "streamlit to start")
    yield f"http://127.0.0.1:{port}", tmp
    proc.terminate()
    proc.wait(timeout=30)
    log.close()
    # the job worker is detached from streamlit: stop it too (identified by its lock file and /proc)
    for lock in tmp.rglob("worker.lock"):
        words = lock.read_text().split()
        if len(words) == 2 and words[1].isdigit():
            try:
                cmd = Path(f"/proc/{words[1]}/cmdline").read_bytes()
            except OSError:
                continue
            if b"opdviz.engine.queue" in cmd and str(tmp).encode() in cmd:
                os.kill(int(words[1]), 15)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        yield b
        b.close()


def settled(page, timeout_ms=60_000):
    page.wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]', timeout=timeout_ms)


def open_page(browser, url):
    page = browser.new_page(viewport={"width": 1300, "height": 2400})
    # Land on the root first: Streamlit runs a deep link of the first session after start-up as a bare
    # pages/ file (multipage v1), without app.py's navigation and sidebar, until app.py has run once.
    page.goto(url)
    page.get_by_role("combobox", name="Database").wait_for(timeout=60_000)  # app.py's sidebar: it ran
    page.goto(f"{url}/new_analysis")
    page.get_by_role("heading", name="New analysis").wait_for(timeout=60_000)
    page.get_by_role("combobox", name="Database").wait_for(timeout=60_000)
    settled(page)
    return page


def files_of(folder: Path) -> list[str]:
    return [str(p) for p in sorted(folder.iterdir()) if p.is_file()]


def test_upload_start_watch_and_see_the_heatmap(server, browser):
    url, tmp = server
    cfg = factory.llama_config(layers=4, hidden=96, ffn=256, heads=4, kv_heads=2, vocab=128)
    base, post = factory.make_pair(tmp / "src", cfg=cfg)
    page = open_page(browser, url)
    page.screenshot(path=str(tmp / "1-idle.png"), full_page=True)
    start = page.get_by_role("button", name="Start analysis")
    assert start.is_disabled()

    inputs = page.locator('[data-testid="stFileUploaderDropzoneInput"]')
    inputs.nth(0).set_input_files(files_of(base))
    page.get_by_text("tensors in 2 file(s)").wait_for(timeout=60_000)
    settled(page)
    inputs.nth(1).set_input_files(files_of(post))
    page.get_by_text("tensors will be analysed").wait_for(timeout=60_000)
    page.get_by_label("Run name", exact=True).fill("browser-run")
    page.get_by_label("Run name", exact=True).press("Enter")
    settled(page)
    page.get_by_text("browser-run vs base").first.wait_for(timeout=30_000)
    page.screenshot(path=str(tmp / "2-validated.png"), full_page=True)
    assert start.is_enabled()

    start.click()
    # progress: a bar labelled "browser-run: n/N tensors · … MB …" while it runs (or once it is done)
    page.get_by_text(re.compile(r"browser-run: \d+/\d+ tensors")).first.wait_for(timeout=120_000)
    page.screenshot(path=str(tmp / "3-running.png"), full_page=True)
    page.get_by_text("browser-run: finished").wait_for(timeout=300_000)
    settled(page)
    page.screenshot(path=str(tmp / "4-done.png"), full_page=True)
    sessions = list((tmp / "uploads").iterdir())      # uploads/<this session's id>/<content hash>/, two of them
    assert len(sessions) == 1 and len(list(sessions[0].iterdir())) == 2

    page.get_by_role("link", name="Open the Sparsity page").first.click()
    page.get_by_role("heading", name="Sparsity").first.wait_for(timeout=60_000)
    page.wait_for_selector('[data-testid="stPlotlyChart"] .main-svg', timeout=120_000)
    settled(page)
    page.locator('[data-testid="stPlotlyChart"]').last.scroll_into_view_if_needed()
    page.wait_for_selector('[data-testid="stPlotlyChart"] .heatmaplayer', timeout=60_000)
    page.screenshot(path=str(tmp / "5-sparsity.png"), full_page=True)
    page.close()


def test_a_truncated_upload_is_a_clear_error(server, browser):
    url, tmp = server
    good = factory.save_checkpoint(factory.make_llama_state(), tmp / "bad-src", single_file=True)
    bad = tmp / "bad-src" / "broken.safetensors"
    bad.write_bytes(good.read_bytes()[:5000])
    page = open_page(browser, url)
    page.locator('[data-testid="stFileUploaderDropzoneInput"]').nth(0).set_input_files([str(bad)])
    alert = page.locator('[data-testid="stAlertContentError"]').filter(has_text="truncated")
    alert.first.wait_for(timeout=60_000)
    settled(page)
    assert page.get_by_text("Traceback").count() == 0
    assert page.get_by_role("button", name="Start analysis").is_disabled()
    page.screenshot(path=str(tmp / "6-error.png"), full_page=True)
    page.close()
