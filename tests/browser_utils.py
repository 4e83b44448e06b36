"""Shared by the browser tests: a real `jupyter lab` on 127.0.0.1, Chromium, and JupyterLab moves."""
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat

CHROMIUM = os.environ.get("D2LITE_CHROMIUM", "/usr/bin/chromium")
VENV_BIN = Path(sys.executable).parent

# JupyterLab settings for a test server: every cell attached to the DOM (JupyterLab 4 renders
# notebooks windowed by default), no news pop-up over the page.
SETTINGS = {
    "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
}


def missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[test]')"
    if not os.access(CHROMIUM, os.X_OK):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium; or set D2LITE_CHROMIUM)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LabServer:
    """`jupyter lab` serving ``root_dir`` on 127.0.0.1 with a token, with its own config, settings,
    workspace, runtime and home directories under ``home`` (nothing of the machine's user leaks
    in). ``nbgrader_config`` is written to its Jupyter config directory, as a shared machine's
    /etc/jupyter/nbgrader_config.py would be."""

    def __init__(self, root_dir: Path, home: Path, *, nbgrader_config: str = "", env: dict | None = None):
        self.root_dir, self.home = Path(root_dir), Path(home)
        for sub in ("config", "settings", "workspaces", "runtime", "home"):
            (self.home / sub).mkdir(parents=True, exist_ok=True)
        (self.home / "config" / "nbgrader_config.py").write_text(
            "c = get_config()  # noqa: F821\n" + nbgrader_config)
        for plugin, values in SETTINGS.items():
            path = self.home / "settings" / (plugin + ".jupyterlab-settings")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(values))
        self.port, self.token = _free_port(), secrets.token_hex(16)
        self.env = {
            "PATH": f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin",
            "HOME": str(self.home / "home"),
            "JUPYTER_CONFIG_DIR": str(self.home / "config"),
            "JUPYTERLAB_SETTINGS_DIR": str(self.home / "settings"),
            "JUPYTERLAB_WORKSPACES_DIR": str(self.home / "workspaces"),
            "JUPYTER_RUNTIME_DIR": str(self.home / "runtime"),
            "JUPYTER_DATA_DIR": str(self.home / "data"),
            "LANG": "C.UTF-8",
            "MPLBACKEND": "Agg",
            **{k: os.environ[k] for k in ("D2LITE_DATA", "TMPDIR") if k in os.environ},
            **(env or {}),
        }
        self.process = None
        self.log_path = self.home / "lab.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def link(self, path: str, **query) -> str:
        """The URL of ``path`` (e.g. "lab/tree/x.ipynb") with the token (and ?reset for lab pages)."""
        params = "&".join([f"{k}={v}" if v is not None else k for k, v in query.items()] + [f"token={self.token}"])
        return f"{self.url}/{path}?{params}"

    def start(self, timeout: float = 60.0):
        cmd = [str(VENV_BIN / "jupyter-lab"), "--no-browser", "--ip=127.0.0.1", f"--port={self.port}",
               "--ServerApp.port_retries=0", f"--IdentityProvider.token={self.token}",
               f"--ServerApp.root_dir={self.root_dir}", "--allow-root"]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(cmd, cwd=self.root_dir, env=self.env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"jupyter lab exited with {self.process.returncode}:\n{self.log()}")
            try:
                self.api("api/status")
                return self
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"jupyter lab did not answer in {timeout} s:\n{self.log()}")

    def api(self, path: str):
        with urllib.request.urlopen(self.link(path), timeout=5) as response:
            return json.loads(response.read())

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def stop(self):
        """Ends the server (and its kernels: the server's own process group) that start() began."""
        if self.process is None or self.process.poll() is not None:
            return
        pgid = self.process.pid  # start_new_session: the server leads its own group
        try:
            os.killpg(pgid, 15)
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, 9)
            self.process.wait(15)
        except ProcessLookupError:
            pass

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class Lab:
    """One Chromium page on a LabServer, and the moves a user makes in JupyterLab."""

    def __init__(self, page, server: LabServer, shots: Path):
        self.page, self.server, self.shots = page, server, shots
        self.shots.mkdir(parents=True, exist_ok=True)

    def shot(self, name: str, locator=None) -> Path:
        path = self.shots / f"{name}.png"
        (locator or self.page).screenshot(path=str(path))
        return path

    def open_notebook(self, path: str):
        self.page.goto(self.server.link(f"lab/tree/{path}", reset=None))
        self.page.locator(".jp-NotebookPanel").first.wait_for(timeout=60_000)
        self.wait_kernel_idle(timeout=60)

    def wait_kernel_idle(self, timeout: float = 120, settle: float = 1.0):
        """Until the notebook's kernel is idle and no cell shows [*] for ``settle`` seconds."""
        deadline, quiet_since = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            kernels = self.server.api("api/kernels")
            busy = (not kernels or any(k["execution_state"] != "idle" for k in kernels)
                    or self.page.locator(".jp-InputPrompt", has_text="[*]").count() > 0)
            if busy:
                quiet_since = None
            elif quiet_since is None:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= settle:
                return
            time.sleep(0.25)
        raise TimeoutError(f"the kernel stayed busy for {timeout} s\n" + self.server.log())

    def menu(self, *labels: str):
        """Clicks through the menu bar, e.g. menu("Run", "Run All Cells")."""
        self.page.locator(".lm-MenuBar-itemLabel", has_text=labels[0]).first.click()
        for label in labels[1:]:
            self.page.locator(".lm-Menu-itemLabel").get_by_text(label, exact=True).first.click()

    def cell(self, *texts: str):
        """The notebook cell whose text contains every one of ``texts``."""
        cells = self.page.locator(".jp-Notebook .jp-Cell")
        for text in texts:
            cells = cells.filter(has_text=text)
        return cells.first

    def type_lines(self, lines: list[str]):
        """Types ``lines`` key by key where the cursor is. The editor indents a new line by itself;
        each line's own indentation replaces what it chose (Shift+Home selects it)."""
        keyboard = self.page.keyboard
        for i, line in enumerate(lines):
            if i:
                keyboard.press("Enter")
                keyboard.press("Shift+Home")
                if not line.strip():
                    keyboard.press("Delete")
                    continue
            keyboard.type(line if i else line.lstrip())

    def replace_line(self, cell, old: str, new: str):
        """Clicks on the line of ``cell`` that contains ``old`` and types ``new`` over its text."""
        line = cell.locator(".cm-line", has_text=old).first
        line.click()
        self.page.keyboard.press("End")
        self.page.keyboard.press("Shift+Home")  # to the start of the text, after the indentation
        self.page.keyboard.type(new.lstrip())

    def save(self, path: Path):
        """Saves the open notebook (Ctrl+S) and waits until ``path`` on disk has changed."""
        before = path.stat().st_mtime_ns if path.exists() else 0
        self.page.keyboard.press("Control+s")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if path.exists() and path.stat().st_mtime_ns != before:
                time.sleep(0.3)  # the server writes atomically; give it its rename
                return nbformat.read(str(path), as_version=4)
            time.sleep(0.2)
        raise TimeoutError(f"{path} was not saved")

    def dialog(self, timeout: float = 120):
        """The JupyterLab dialog that opens next (its text), closed with its OK button."""
        box = self.page.locator(".jp-Dialog-content")
        box.wait_for(timeout=timeout * 1000)
        text = box.inner_text()
        return box, text

    def close_dialog(self):
        self.page.locator(".jp-Dialog-content .jp-mod-accept").first.click()
        self.page.locator(".jp-Dialog-content").wait_for(state="detached")


def copy_release(dest: Path, chapters: Path):
    """A student's working directory: a copy of the released notebooks."""
    shutil.copytree(chapters, dest / chapters.name)
    return dest / chapters.name
