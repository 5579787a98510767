"""The `frisket` client process: where it is, one job's files, and a blocking job runner
(GIMP, tests; Krita runs the same arguments through a QProcess)."""

import os
import shutil
import subprocess
import sys
import threading

from .errors import ClientNotFound, FrisketError, ProtocolError, describe_exit
from .events import JobState, LineBuffer
from .masks import protect_mask_from_selection
from .options import build_generate_args, new_job_id

CLIENT_ENV = "FRISKET_CLIENT"


def client_executable_names(platform=None):
    platform = platform or sys.platform
    return ["frisket.exe", "frisket"] if platform.startswith("win") else ["frisket"]


def _is_executable(path):
    return bool(path) and os.path.isfile(path) and os.access(path, os.X_OK)


def client_candidates(setting=None, environ=None, plugin_dir=None, path=None, platform=None):
    """Where to look for the `frisket` client, in order, as (source, path) pairs:
    1. the plugin's setting (a file, or a folder holding the client),
    2. $FRISKET_CLIENT,
    3. next to the plugin: PLUGIN_DIR/frisket, PLUGIN_DIR/bin/frisket (and one folder up,
       so a client dropped beside the installed package folder is found too),
    4. the PATH.
    """
    environ = os.environ if environ is None else environ
    names = client_executable_names(platform)
    out = []

    def add(source, value):
        if not value:
            return
        value = os.path.expanduser(value)
        if os.path.isdir(value):
            for n in names:
                out.append((source, os.path.join(value, n)))
        else:
            out.append((source, value))

    add("setting", (setting or "").strip())
    add(CLIENT_ENV, (environ.get(CLIENT_ENV) or "").strip())
    if plugin_dir:
        for d in (plugin_dir, os.path.join(plugin_dir, "bin"), os.path.dirname(plugin_dir.rstrip("/\\"))):
            for n in names:
                out.append(("plugin folder", os.path.join(d, n)))
    search = environ.get("PATH", "") if path is None else path
    for d in search.split(os.pathsep):
        if d:
            for n in names:
                out.append(("PATH", os.path.join(d, n)))
    return out


def find_client(setting=None, environ=None, plugin_dir=None, path=None, platform=None):
    """The client to run: (path, source). A setting or $FRISKET_CLIENT that names a
    missing file is an error (the user asked for it), not silently skipped."""
    environ = os.environ if environ is None else environ
    tried = []
    for source, candidate in client_candidates(setting, environ, plugin_dir, path, platform):
        if _is_executable(candidate):
            return candidate, source
        if source in ("setting", CLIENT_ENV):
            raise ClientNotFound(
                "The Frisket client configured by the {} ({}) is not an executable file. "
                "Fix the client path in the plugin's settings.".format(
                    "plugin setting" if source == "setting" else "$" + CLIENT_ENV, candidate
                )
            )
        tried.append(candidate)
    raise ClientNotFound(
        "The Frisket client `frisket` was not found: set its path in the plugin's settings, "
        "set ${}, put it next to the plugin or on the PATH (build it with `cargo build -p frisket`).".format(CLIENT_ENV)
    )


class JobRun(object):
    """Files of one job: a fresh temporary folder with reference.png, protect.png,
    result.png and dump/."""

    def __init__(self, workdir):
        self.workdir = workdir
        self.reference = os.path.join(workdir, "reference.png")
        self.protect = os.path.join(workdir, "protect.png")
        self.out = os.path.join(workdir, "result.png")
        self.dump_dir = os.path.join(workdir, "dump")

    def cleanup(self):
        shutil.rmtree(self.workdir, ignore_errors=True)


def prepare_job(workdir, width, height, rgb, selection, mode, *, write_png):
    """Writes reference.png (RGB bytes) and, when something is protected, protect.png
    (from the 8-bit selection, see protect_mask_from_selection). `write_png(path, width,
    height, channels, data)` is the PNG encoder: the editor's own (Qt, GEGL) inside an editor,
    image_io.write_png without one. Returns (JobRun, protect_path or None)."""
    run = JobRun(workdir)
    os.makedirs(workdir, exist_ok=True)
    write_png(run.reference, width, height, 3, rgb)
    mask = protect_mask_from_selection(selection, mode) if selection is not None else None
    if mask is not None:
        if len(mask) != width * height:
            raise FrisketError("the selection mask has %d pixels, the image %d" % (len(mask), width * height))
        write_png(run.protect, width, height, 1, mask)
        return run, run.protect
    return run, None


def run_job(client, opts, run, protect=None, job_id=None, on_event=None, timeout=None, popen=subprocess.Popen):
    """Runs `frisket generate --json` to the end, calling on_event(state, event) for
    every line; returns the JobState (its `error` set on failure, never raises for a
    failed job)."""
    job_id = job_id or new_job_id()
    args = build_generate_args(
        opts, run.out, reference=run.reference, protect=protect, dump_dir=run.dump_dir, job_id=job_id
    )
    state = JobState(job_id)
    try:
        proc = popen([client] + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except OSError as e:
        state.error = {"code": "CLIENT", "message": "could not start the Frisket client {}: {}".format(client, e)}
        return state
    buf = LineBuffer()
    err_chunks = []
    reader = threading.Thread(target=lambda: err_chunks.append(proc.stderr.read()), daemon=True)
    reader.start()
    try:
        for raw in iter(proc.stdout.readline, b""):
            for event in buf.feed(raw):
                state.apply(event)
                if on_event:
                    on_event(state, event)
        for event in buf.flush():
            state.apply(event)
            if on_event:
                on_event(state, event)
        code = proc.wait(timeout=timeout)
    except (ProtocolError, subprocess.TimeoutExpired) as e:
        proc.kill()
        proc.wait()
        state.error = {"code": "PROTOCOL", "message": str(e)}
        return state
    reader.join(5)
    for pipe in (proc.stdout, proc.stderr):
        try:
            pipe.close()
        except Exception:
            pass
    if not state.finished:
        stderr_text = b"".join(c for c in err_chunks if c).decode("utf-8", "replace")
        state.error = {"code": "CLIENT", "message": describe_exit(code, stderr_text, opts.server)}
    return state
