"""JupyterLab 4 in Chromium, driven by Playwright: the one launcher of the real-browser tests
(tests/test_browser.py) and the browser benchmark (benchmarks/widget_latency.py).

    with jupyterlab(work, ["notebooks/tour.ipynb"]) as lab, chromium() as page:
        open_notebook(page, lab, "tour.ipynb")
        run_all(page)

The server runs in a folder of its own (config, runtime, settings and workspaces inside it, so a
user's JupyterLab settings play no part): no news or update checks, autosave off (what is saved
is saved on purpose), widget state saved with the notebook, and ``window.jupyterapp`` exposed
(theme changes, kernel probes).  Chromium is the system's (/usr/bin/chromium); Playwright's own
browser downloads are never needed.
"""
from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
DARK, LIGHT = "JupyterLab Dark", "JupyterLab Light"


def missing() -> str | None:
    """Why the browser cannot run here (None when it can)."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed"
    if CHROMIUM is None:
        return "Chromium is not installed (apt-get install -y chromium)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Lab:
    url: str
    token: str
    work: object  # pathlib.Path: the server's root folder
    proc: subprocess.Popen

    def api(self, path, method="GET", timeout=30):
        req = urllib.request.Request(f"{self.url}/api/{path}?token={self.token}", method=method)
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.read()

    def shut_down_kernels(self):
        """End every session (and its kernel), as closing the notebook and its kernel does."""
        import json
        for s in json.loads(self.api("sessions")):
            self.api(f"sessions/{s['id']}", method="DELETE")


def _settings(work):
    for folder, name, text in (
            ("@jupyterlab/apputils-extension", "notification", '{"fetchNews": "false", "checkForUpdates": false}'),
            ("@jupyterlab/docmanager-extension", "plugin", '{"autosave": false}'),  # saved on purpose only
            ("@jupyter-widgets/jupyterlab-manager", "plugin", '{"saveState": true}')):  # Save Widget State
        d = work / "settings" / folder
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{name}.jupyterlab-settings").write_text(text)


@contextlib.contextmanager
def jupyterlab(work, notebooks=(), env=None, start_timeout=120):
    """A JupyterLab server rooted at ``work`` (a pathlib.Path), with copies of ``notebooks``
    (paths); yields a ``Lab``.  The server's log is ``work/lab.log``."""
    for nb in notebooks:
        shutil.copy(nb, work / os.path.basename(nb))
    _settings(work)
    port, token = free_port(), secrets.token_hex(16)
    env = dict(os.environ if env is None else env, JUPYTER_CONFIG_DIR=str(work / "config"),
               JUPYTER_RUNTIME_DIR=str(work / "runtime"), JUPYTERLAB_WORKSPACES_DIR=str(work / "workspaces"),
               JUPYTERLAB_SETTINGS_DIR=str(work / "settings"))
    log = open(work / "lab.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
                             "--allow-root", f"--ServerApp.port={port}", f"--IdentityProvider.token={token}",
                             f"--ServerApp.root_dir={work}", "--LabApp.news_url=",
                             "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
                             "--LabApp.extension_manager=readonly",
                             "--LabApp.expose_app_in_browser=True"],  # window.jupyterapp
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    lab = Lab(f"http://127.0.0.1:{port}", token, work, proc)
    try:
        deadline = time.time() + start_timeout
        while True:
            try:
                lab.api("status", timeout=2)
                break
            except Exception:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("JupyterLab did not start: " + (work / "lab.log").read_text()[-3000:])
                time.sleep(0.5)
        yield lab
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@contextlib.contextmanager
def chromium(width=1500, height=1100, errors=None, timeout_ms=60_000):
    """A headless Chromium page; console errors and page errors are appended to ``errors``."""
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(timeout_ms)
            if errors is not None:
                page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
                page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
            yield page
        finally:
            browser.close()


def accept_kernel_dialog(page):
    """JupyterLab may ask which kernel to start: the default."""
    from playwright.sync_api import TimeoutError
    try:
        page.wait_for_selector(".jp-Dialog .jp-mod-accept", timeout=8_000)
        page.click(".jp-Dialog .jp-mod-accept")
    except TimeoutError:
        pass


def open_notebook(page, lab, name, timeout_ms=120_000):
    """Open ``name`` (in the server's root) and wait until its kernel is idle."""
    page.goto(f"{lab.url}/lab/tree/{name}?token={lab.token}")
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=timeout_ms)
    accept_kernel_dialog(page)
    page.wait_for_function("""name => { const app = window.jupyterapp, w = app && app.shell.currentWidget;
        const kernel = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
        return !!(app && app.commands && w.context && w.context.path === name && kernel && kernel.status === 'idle'); }""",
                           arg=name, timeout=timeout_ms, polling=200)


def run_all(page):
    """Run > Run All Cells, as a user clicks it; the time of the click (time.perf_counter)."""
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile("^Run$")).click()
    item = page.locator("li.lm-Menu-item", has=page.locator(".lm-Menu-itemLabel",
                                                              has_text=re.compile("^Run All Cells$")))
    item.wait_for()
    t0 = time.perf_counter()
    item.click()
    return t0


def wait_or_traceback(page, selector, timeout):
    """Wait for ``selector`` to be attached; fail at once, with its text, if a cell shows a
    Python traceback instead (Run All stops at an error, and the widgets would never come)."""
    found = page.wait_for_function("""s => {
        if (document.querySelector(s)) return 'ok';
        for (const e of document.querySelectorAll('.jp-OutputArea-output')) {
            if (e.textContent.includes('Traceback (most recent call last)')) return e.textContent;
        }
        return false; }""", arg=selector, timeout=timeout, polling=100).json_value()
    assert found == "ok", f"a cell failed while waiting for {selector}:\n{found[-3000:]}"


def set_theme(page, theme):
    """Settings > Theme, and wait until its stylesheet applies."""
    page.evaluate("t => window.jupyterapp.commands.execute('apputils:change-theme', {theme: t})", theme)
    light = "false" if theme == DARK else "true"
    page.wait_for_function("l => document.body.dataset.jpThemeLight === l && document.body.dataset.jpThemeName",
                           arg=light, timeout=60_000)
    page.wait_for_function("n => document.body.dataset.jpThemeName === n", arg=theme, timeout=60_000)
    page.wait_for_timeout(500)


# Every view of the notebook shown: ``n`` gandissect views attached, each with its pictures'
# bytes in place (every <img> not hidden has its src; JupyterLab may leave the decoding of cells out of sight
# until they are scrolled to), none busy ("rendering…", a progress line), the kernel idle.
VIEWS_SHOWN = r"""n => {
    const views = [...document.querySelectorAll('.gandissect-view')];
    if (views.length < n) return false;
    for (const v of views) {
        const imgs = [...v.querySelectorAll('img')].filter(i => i.checkVisibility());  // not display: none
        if (!imgs.length || !imgs.every(i => i.getAttribute('src'))) return false;
        if (v.textContent.includes('rendering…')) return false;
        const p = v.querySelector('.gd-progress');
        if (p && getComputedStyle(p).display !== 'none') return false;
    }
    const k = document.querySelector('.jp-Notebook-ExecutionIndicator');
    return !k || k.dataset.status === 'idle'; }"""


def wait_views_shown(page, n, timeout_ms=600_000):
    """Block until ``VIEWS_SHOWN``; the time it held (time.perf_counter)."""
    page.wait_for_function(VIEWS_SHOWN, arg=n, timeout=timeout_ms, polling=100)
    return time.perf_counter()
