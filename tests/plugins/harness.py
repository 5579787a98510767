"""Shared pieces of the plugin tests: paths, the model under test, a real frisket-server on
a loopback port with the fixture models (one per test process, stopped at exit).

Environment (all optional):
  FRISKET_PLUGIN_TEST_MODEL   model name to test with (default: shapes, the trained tiny model
                              shipped in models/; the random fixtures, e.g. sd1, also work)
  FRISKET_PLUGIN_TEST_SIZE    WxH of the test image (default 64x64, the size shapes was trained at)
  FRISKET_MODELS              models folder (default: models/ for shapes, else $FRISKET_FIXTURES/models,
                              else target/fixtures/models)
  FRISKET_SERVER_BIN, FRISKET_CLIENT_BIN   binaries (default target/debug/frisket-server, target/debug/frisket)
  FRISKET_PLUGIN_TEST_SERVER  use this running server instead of starting one (no log checks then)
"""

import atexit
import os
import re
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PLUGINS = os.path.join(ROOT, "plugins")
sys.path.insert(0, os.path.join(PLUGINS, "common"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import frisket_core as core  # noqa: E402, F401  (the tests' `from harness import core`)
from harness_image import known_image as _known_image  # noqa: E402

MODEL = os.environ.get("FRISKET_PLUGIN_TEST_MODEL", "shapes")
WIDTH, HEIGHT = (int(x) for x in os.environ.get("FRISKET_PLUGIN_TEST_SIZE", "64x64").lower().split("x"))
TARGET = os.path.join(ROOT, "target")


def fixtures_dir():
    return os.environ.get("FRISKET_FIXTURES") or os.path.join(TARGET, "fixtures")


def models_dir():
    if os.environ.get("FRISKET_MODELS"):
        return os.environ["FRISKET_MODELS"]
    shipped = os.path.join(ROOT, "models")
    if os.path.isfile(os.path.join(shipped, MODEL, "unet", "config.json")):
        return shipped
    return os.path.join(fixtures_dir(), "models")


def server_bin():
    return os.environ.get("FRISKET_SERVER_BIN") or os.path.join(TARGET, "debug", "frisket-server")


def client_bin():
    return os.environ.get("FRISKET_CLIENT_BIN") or os.path.join(TARGET, "debug", "frisket")


def require_binaries():
    missing = [p for p in (server_bin(), client_bin()) if not os.access(p, os.X_OK)]
    if missing:
        raise RuntimeError("missing {}: run `make build` (or cargo build --workspace)".format(", ".join(missing)))
    if not os.path.isfile(os.path.join(models_dir(), MODEL, "unet", "config.json")):
        raise RuntimeError(
            "model {} not found in {} (shapes ships in models/; the fixtures come from `make fixtures`)".format(
                MODEL, models_dir()
            )
        )


class Server(object):
    """`frisket-server serve` on 127.0.0.1:0; its stderr (the log) goes to self.log_path."""

    def __init__(self, extra_args=()):
        require_binaries()
        self.dir = tempfile.mkdtemp(prefix="frisket-plugin-test-")
        self.log_path = os.path.join(self.dir, "server.log")
        self._log = open(self.log_path, "wb")
        env = dict(os.environ)
        env.setdefault("RUST_LOG", "info")
        env["NO_COLOR"] = "1"
        self.proc = subprocess.Popen(
            [server_bin(), "serve", "--models", models_dir(), "--listen", "127.0.0.1:0"] + list(extra_args),
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
        )
        self.address = None
        deadline = time.time() + 120
        line = b""
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            m = re.search(rb"listening on (\S+)", line)
            if m:
                self.address = m.group(1).decode()
                break
        if self.address is None:
            self.stop()
            raise RuntimeError("frisket-server did not start; its log:\n" + self.log())
        # Drain stdout so the server never blocks on it.
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()
        self.url = "http://" + self.address

    def log(self):
        try:
            self._log.flush()
        except ValueError:
            pass
        with open(self.log_path, "rb") as f:
            return re.sub(r"\x1b\[[0-9;]*m", "", f.read().decode("utf-8", "replace"))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        try:
            self.proc.stdout.close()
        except Exception:
            pass
        try:
            self._log.close()
        except Exception:
            pass


class External(object):
    """A server the caller runs (FRISKET_PLUGIN_TEST_SERVER)."""

    def __init__(self, url):
        self.url = url if "://" in url else "http://" + url
        self.log_path = None

    def log(self):
        return ""

    def stop(self):
        pass


_server = None


def server():
    global _server
    if _server is None:
        url = os.environ.get("FRISKET_PLUGIN_TEST_SERVER")
        _server = External(url) if url else Server()
        atexit.register(_server.stop)
    return _server


def known_image(width=WIDTH, height=HEIGHT):
    return _known_image(width, height)


def rect_selection(width, height, x0, y0, x1, y1, value=255):
    """An 8-bit selection with [x0, x1) x [y0, y1) selected."""
    sel = bytearray(width * height)
    for y in range(y0, y1):
        sel[y * width + x0 : y * width + x1] = bytes([value]) * (x1 - x0)
    return bytes(sel)


def without_virtualenvs(env):
    """The environment for Krita: without Python virtual environments on the PATH. Krita's
    embedded Python takes its prefix from the first `python3` on the PATH, and a venv there
    (such as the torch venv `make` puts first) hides the system's PyQt5, so Krita cannot
    load its Python plugins at all."""
    env = dict(env)
    keep = [
        d
        for d in env.get("PATH", "").split(os.pathsep)
        if d and not os.path.isfile(os.path.join(os.path.dirname(d.rstrip("/")), "pyvenv.cfg"))
    ]
    env["PATH"] = os.pathsep.join(keep)
    env.pop("VIRTUAL_ENV", None)
    env.pop("PYTHONHOME", None)
    return env


def compare_protected(original_rgb, result_rgb, mask, channels=3):
    """(protected pixels that differ, outside pixels, outside pixels that differ)."""
    bad = outside = changed = 0
    for i, m in enumerate(mask):
        a = original_rgb[channels * i : channels * i + channels]
        b = result_rgb[channels * i : channels * i + channels]
        if m:
            if a != b:
                bad += 1
        else:
            outside += 1
            if a != b:
                changed += 1
    return bad, outside, changed
