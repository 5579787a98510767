"""The generate path: the visible image and the selection out, `frisket generate --json`
run in a QProcess (the UI never blocks), previews and the result back as layers.

The docker's Generate button calls GenerateController.start(); tests drive the same
object (tests/krita/)."""

import os
import shutil
import sys
import tempfile
import traceback

from PyQt5.QtCore import QObject, QProcess, QTimer, pyqtSignal

from . import krita_io
from ._core import core

KEEP_TEMP_ENV = "FRISKET_KEEP_TEMP"


def _log(message):
    print("frisket: " + message, file=sys.stderr)


def _note_destruction(obj):
    """Gives `obj` the `_gone` flag that _unless_destroyed reads. A list, not an attribute
    set from a method: the handler must not hold `obj` itself."""
    gone = obj._gone = []
    obj.destroyed.connect(lambda *_: gone.append(True))


def _unless_destroyed(slot):
    """A slot of a ClientCall or GenerateController that does nothing once its object is being
    destroyed (its owner, a docker, was closed or freed with the call or job in flight). The
    destruction can come at any point, also inside the slot (Python's cycle collector runs on
    an allocation and may free the docker there), so a timer, the process or a signal may
    vanish between two lines: a RuntimeError ("wrapped C/C++ object ... has been deleted")
    then means nobody waits for the answer."""

    def wrapper(self, *args):
        if self._gone:
            return None
        try:
            return slot(self, *args)
        except RuntimeError:
            if not self._gone:
                raise
            return None

    wrapper.__name__ = slot.__name__
    return wrapper


class ClientCall(QObject):
    """One short client command (`models`, `tokenize`, `cancel`), without blocking.
    `done(result, error)`: the parsed output, or None and a message."""

    done = pyqtSignal(object, str)

    def __init__(self, client, args, parse, server=None, timeout_ms=20000, parent=None):
        super().__init__(parent)
        self._parse = parse
        self._server = server
        self._finished = False
        # Without it, "wrapped C/C++ object of type QTimer has been deleted" reached Krita's
        # traceback dialog.
        _note_destruction(self)
        self._proc = QProcess(self)
        self._proc.finished.connect(self._on_finished)
        self._proc.errorOccurred.connect(self._on_error)
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.timeout.connect(self._on_timeout)
        self._timer.start(timeout_ms)
        self._proc.start(client, args)

    def _emit(self, result, error):
        if self._finished:
            return
        self._finished = True
        self._timer.stop()
        self.done.emit(result, error)
        self.deleteLater()

    @_unless_destroyed
    def _on_error(self, err):
        if err == QProcess.FailedToStart:
            self._emit(None, "Could not start the Frisket client ({}).".format(self._proc.errorString()))

    @_unless_destroyed
    def _on_timeout(self):
        self._proc.kill()
        self._emit(None, "The Frisket client did not answer in time.")

    @_unless_destroyed
    def _on_finished(self, code, status):
        out = bytes(self._proc.readAllStandardOutput()).decode("utf-8", "replace")
        err = bytes(self._proc.readAllStandardError()).decode("utf-8", "replace")
        try:
            result = self._parse(out)
        except core.FrisketError as e:
            self._emit(None, str(e))
            return
        except Exception as e:  # never a traceback in the UI
            if code != 0:
                self._emit(None, core.describe_exit(code, err, self._server))
            else:
                self._emit(None, "Unexpected output from the Frisket client: {}".format(e))
            return
        self._emit(result, "")


def guarded(method):
    """Slots never raise into Krita (it would show a traceback): failures end the job with a message."""

    def wrapper(self, *args):
        try:
            return method(self, *args)
        except Exception as e:  # noqa: BLE001
            _log(traceback.format_exc())
            self._fail("Internal error in the Frisket plugin: {}".format(e))

    wrapper.__name__ = method.__name__
    return wrapper


class GenerateController(QObject):
    """Runs one job at a time for a document."""

    statusChanged = pyqtSignal(str)
    progressChanged = pyqtSignal(float)
    previewShown = pyqtSignal(int)
    finished = pyqtSignal(bool, str)  # ok, message

    def __init__(self, parent=None):
        super().__init__(parent)
        self.process = None
        self.doc = None
        self.opts = None
        self.client = None
        self.run = None
        self.job_id = None
        self.state = None
        self.buffer = None
        self._reset_job_outputs()
        self._done = True
        _note_destruction(self)

    def _reset_job_outputs(self):
        """What one job builds up; cleared when the next one starts."""
        self.preview_node = None
        self.preview_count = 0
        self.preview_was_locked = False
        self.result_node = None
        self.group_node = None
        self.artifact_nodes = []
        self.message = ""
        self.ok = None
        self._stderr = b""

    # ----------------------------------------------------------------- public
    def is_running(self):
        return not self._done

    def start(self, doc, opts, client, models=None):
        """Starts a job; raises core.FrisketError (a message for the user) when it cannot."""
        if self.is_running():
            raise core.FrisketError("A Frisket job is already running; cancel it first.")
        if doc is None:
            raise core.FrisketError("Open an image first.")
        problems = core.validate(opts, models, (doc.width(), doc.height()))
        if problems:
            raise core.FrisketError("\n".join(problems))
        w, h, rgb = krita_io.read_reference(doc)
        selection = krita_io.read_selection(doc)
        mask = core.protect_mask_from_selection(selection, opts.selection_mode) if selection is not None else None
        if mask is not None and mask.count(0) == 0:
            raise core.FrisketError(
                "The whole image would be protected, so nothing can change: select less, "
                "or switch the selection to 'region to change'."
            )
        workdir = tempfile.mkdtemp(prefix="frisket-krita-")
        try:
            run, protect = core.prepare_job(
                workdir, w, h, rgb, selection, opts.selection_mode, write_png=krita_io.write_png
            )
        except Exception:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        self.doc, self.opts, self.client, self.run = doc, opts, client, run
        self.job_id = core.new_job_id("krita")
        self.state = core.JobState(self.job_id)
        self.buffer = core.LineBuffer()
        self._reset_job_outputs()
        self._done = False
        args = core.build_generate_args(
            opts, run.out, reference=run.reference, protect=protect, dump_dir=run.dump_dir, job_id=self.job_id
        )
        self.process = QProcess(self)
        self.process.setWorkingDirectory(workdir)
        self.process.readyReadStandardOutput.connect(self._on_stdout)
        self.process.readyReadStandardError.connect(self._on_stderr)
        self.process.finished.connect(self._on_finished)
        self.process.errorOccurred.connect(self._on_process_error)
        self._status(
            "Starting…"
            if protect is None
            else "Starting… ({:.0%} of the image protected)".format(core.mask_coverage(mask))
        )
        self.process.start(client, args)
        return self.job_id

    def cancel(self):
        """Stops the job on the server (`frisket cancel JOB_ID`); kills the client if the
        server does not know the job yet or does not stop it within 5 seconds."""
        if not self.is_running():
            return
        self.state.cancel_requested = True
        self._status("Cancelling…")
        call = ClientCall(
            self.client,
            core.build_cancel_args(self.opts.server, self.job_id),
            core.parse_single_line,
            self.opts.server,
            5000,
            self,
        )
        call.done.connect(self._on_cancel_answer)
        QTimer.singleShot(5000, self._kill)

    # ----------------------------------------------------------------- process
    @_unless_destroyed
    def _on_cancel_answer(self, result, error):
        if not self.is_running():
            return
        if error or not (result or {}).get("found"):
            # The server has not seen the job yet (or cannot be asked): dropping the
            # stream cancels it as well.
            self._kill()

    @_unless_destroyed
    def _kill(self):
        if self.is_running() and self.process is not None and self.process.state() != QProcess.NotRunning:
            self.process.kill()

    @_unless_destroyed
    @guarded
    def _on_stdout(self):
        data = bytes(self.process.readAllStandardOutput())
        for event in self.buffer.feed(data):
            self._handle(event)

    @_unless_destroyed
    def _on_stderr(self):
        self._stderr += bytes(self.process.readAllStandardError())

    def _handle(self, event):
        try:
            name = self.state.apply(event)
        except core.ProtocolError as e:
            self._kill()
            self._fail(str(e))
            return
        if name == "preview":
            self._show_preview(event)
        if name in ("started", "step", "queued"):
            self.progressChanged.emit(self.state.progress())
        if not self.state.cancel_requested:
            self._status(self.state.status_text())

    @_unless_destroyed
    @guarded
    def _on_finished(self, code, exit_status):
        if self._done:
            return
        if self.process is not None:
            rest = bytes(self.process.readAllStandardOutput())
            for event in self.buffer.feed(rest) + self.buffer.flush():
                self._handle(event)
            self._stderr += bytes(self.process.readAllStandardError())
        if self._done:
            return
        if self.state.result is not None:
            self._insert_result()
            self._finish(True, self.state.status_text())
        elif self.state.cancel_requested:
            self._finish(False, "Cancelled.")
        elif self.state.error is not None:
            self._finish(False, core.describe_error(self.state.error, self.opts.server))
        else:
            crashed = exit_status != QProcess.NormalExit
            self._finish(
                False,
                core.describe_exit(
                    None if crashed else code, self._stderr.decode("utf-8", "replace"), self.opts.server
                ),
            )

    @_unless_destroyed
    def _on_process_error(self, err):
        if err == QProcess.FailedToStart and not self._done:
            self._fail(
                "Could not start the Frisket client {} ({}). Fix the client path in the docker's settings.".format(
                    self.client, self.process.errorString()
                )
            )

    # ----------------------------------------------------------------- layers
    def _show_preview(self, event):
        path = event.get("path")
        img = krita_io.load_image(path) if path and os.path.exists(path) else None
        if img is None:
            return
        if self.preview_node is None:
            self.preview_node = krita_io.add_paint_layer(self.doc, core.PREVIEW_LAYER_NAME)
            self.preview_node.setLocked(True)
        krita_io.set_pixels(self.doc, self.preview_node, img, smooth=True)
        self.preview_was_locked = self.preview_was_locked or self.preview_node.locked()
        krita_io.refresh(self.doc)
        self.preview_count += 1
        self.previewShown.emit(int(event.get("step", -1)))

    def _remove_preview(self):
        if self.preview_node is not None:
            try:
                self.preview_node.setLocked(False)
                self.preview_node.remove()
            except Exception:  # the document may be gone
                pass
            self.preview_node = None

    def _insert_result(self):
        result = self.state.result
        path = result.get("dump_path") or result.get("path")
        img = krita_io.load_image(path) if path else None
        if img is None:
            raise core.FrisketError("The result image {} could not be read.".format(path))
        self._remove_preview()
        doc = self.doc
        name = core.result_layer_name(self.opts.prompt, self.state.seed)
        self.result_node = krita_io.add_paint_layer(doc, name)
        krita_io.set_pixels(doc, self.result_node, img, smooth=True)
        artifacts = self.state.artifacts()
        if artifacts:
            self.group_node = krita_io.add_group_layer(doc, core.group_layer_name(self.opts.prompt, self.state.seed))
            for kind, layer_name, apath, _event in artifacts:
                aimg = krita_io.load_image(apath) if os.path.exists(apath) else None
                if aimg is None:
                    _log("skipping {} ({}): unreadable".format(layer_name, apath))
                    continue
                node = krita_io.add_paint_layer(doc, layer_name, parent=self.group_node, visible=False)
                krita_io.set_pixels(doc, node, aimg, smooth=(kind in ("heatmap", "change_map")))
                node.setVisible(False)
                self.artifact_nodes.append((kind, node))
        krita_io.refresh(doc)

    # ----------------------------------------------------------------- ending
    def _status(self, text):
        self.message = text
        self.statusChanged.emit(text)

    def _fail(self, message):
        if self._done:
            return
        self._kill()
        self._finish(False, message)

    def _finish(self, ok, message):
        self._done = True
        self.ok = ok
        self._remove_preview()
        try:
            krita_io.refresh(self.doc)
        except Exception:
            pass
        if self.run is not None and not os.environ.get(KEEP_TEMP_ENV):
            self.run.cleanup()
        self.progressChanged.emit(1.0 if ok else 0.0)
        self._status(message)
        self.finished.emit(ok, message)
