"""Runs INSIDE Krita: `QT_QPA_PLATFORM=offscreen kritarunner -s krita_plugin_test -f main`.

kritarunner always exits 0, so this writes every check into the JSON file named by
$FRISKET_TEST_RESULT; tests/plugins/test_krita.py starts the server, runs this and asserts
on that file. Each case instantiates the real docker off-screen, fills its widgets and
presses Generate / Cancel (docker.generate() / docker.cancel(): the buttons' slots),
pinned to a document created here, and processes Qt events until the job ends.

Environment: FRISKET_TEST_RESULT, FRISKET_TEST_PYKRITA (folder holding the installed
plugin package `frisket`), FRISKET_TEST_SERVER (URL), FRISKET_TEST_MODEL,
FRISKET_TEST_SIZE (WxH), FRISKET_CLIENT (the client binary, found by the plugin's
discovery), FRISKET_TEST_CASES (optional comma-separated subset).
"""

import faulthandler
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback

RESULT = {"cases": {}, "fatal": None, "uncaught": [], "order": []}


def _write():
    path = os.environ.get("FRISKET_TEST_RESULT", "/tmp/frisket-krita-test.json")
    with open(path + ".tmp", "w") as f:
        json.dump(RESULT, f, indent=1, default=str)
    os.replace(path + ".tmp", path)


class Case(object):
    def __init__(self, name):
        self.name = name
        self.checks = []
        self.info = {}
        RESULT["cases"][name] = {"checks": self.checks, "info": self.info, "error": None}
        RESULT["order"].append(name)

    def check(self, what, ok, detail=""):
        self.checks.append({"check": what, "ok": bool(ok), "detail": str(detail)})
        return bool(ok)


def main(*_args):
    start = time.time()
    # On a stall the runner sends SIGUSR1 and reads where every thread was (Python frames),
    # written from the signal handler even while a C++ call holds the main thread.
    stacks = open(os.environ.get("FRISKET_TEST_RESULT", "/tmp/frisket-krita-test.json") + ".stacks", "w")
    faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)
    try:
        _main()
    except Exception:
        RESULT["fatal"] = traceback.format_exc()
    RESULT["seconds"] = time.time() - start
    _write()


def _main():
    sys.path.insert(0, os.environ["FRISKET_TEST_PYKRITA"])
    from krita import Krita, Selection  # noqa: F401
    from PyQt5.QtCore import QEventLoop, Qt
    from PyQt5.QtWidgets import QApplication

    # Exceptions escaping a Qt slot would be a traceback dialog in Krita: record them. Krita's
    # own hook is not called: its modal dialog never closes offscreen, and that was the
    # stalled kritarunner (stacks: excepthook.on_error under processEvents).
    previous_hook = sys.excepthook

    def hook(kind, value, tb):
        during = RESULT["order"][-1] if RESULT["order"] else "set-up"
        text = "during {}: ".format(during) + "".join(traceback.format_exception(kind, value, tb))
        RESULT["uncaught"].append(text)
        sys.stderr.write(text)
        _write()

    sys.excepthook = hook

    import frisket  # noqa: F401  (registers the docker factory and the extension, as Krita does)
    from frisket import krita_io
    from frisket._core import core
    from frisket.docker import FrisketDocker

    RESULT["plugin_file"] = frisket.__file__
    RESULT["core_file"] = core.__file__
    RESULT["krita_version"] = Krita.instance().version()
    server = os.environ["FRISKET_TEST_SERVER"]
    model = os.environ.get("FRISKET_TEST_MODEL", "shapes")
    width, height = (int(v) for v in os.environ.get("FRISKET_TEST_SIZE", "64x64").split("x"))
    wanted = [c for c in os.environ.get("FRISKET_TEST_CASES", "").split(",") if c]
    app = QApplication.instance()

    def pump(seconds=0.05):
        end = time.time() + seconds
        while time.time() < end:
            app.processEvents(QEventLoop.AllEvents, 20)
            time.sleep(0.005)

    def wait_for(predicate, timeout):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if predicate():
                return True
            pump(0.02)
        return predicate()

    # ------------------------------------------------------------------ fixtures
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "plugins"))
    original_rgb = _known_image(width, height)

    def new_document(name):
        doc = Krita.instance().createDocument(width, height, name, "RGBA", "U8", "", 72.0)
        layer = doc.createNode("original", "paintlayer")
        doc.rootNode().addChildNode(layer, None)
        from PyQt5.QtCore import QByteArray

        layer.setPixelData(QByteArray(core.rgb_to_bgra(original_rgb, width, height)), 0, 0, width, height)
        doc.refreshProjection()
        doc.waitForDone()
        return doc

    def select_rect(doc, x, y, w, h):
        sel = Selection()
        sel.select(x, y, w, h, 255)
        doc.setSelection(sel)
        doc.waitForDone()

    def new_docker(doc):
        docker = FrisketDocker()
        docker.show_message_boxes = False
        docker.set_document(doc)
        docker.client_path.setText("")  # discovery: $FRISKET_CLIENT
        docker.resize(320, 640)
        docker.show()
        pump(0.1)
        return docker

    def start_long_job(c, name, seed, prompt):
        """A new document and docker whose 400-step job has reached its first step; the
        docker is None when Generate did not start it."""
        doc = new_document(name)
        docker = new_docker(doc)
        docker.set_options(options(steps=400, strength=1.0, seed=seed, prompt=prompt))
        if not c.check("Generate started the job", docker.generate(), docker.status.text()):
            return doc, None
        ctl = docker.controller
        c.check(
            "the job reached its first step", wait_for(lambda: ctl.state.steps_done >= 1, 180), docker.status.text()
        )
        return doc, docker

    def options(**kw):
        base = dict(
            server=server,
            model=model,
            prompt="a red circle on the left",
            negative_prompt="blurry",
            subjects=[],
            strength=0.7,
            steps=4,
            seed=7,
            explain="off",
            selection_mode="protect",
        )
        base.update(kw)
        return core.GenerateOptions(**base)

    def layer_rgb(node):
        data = bytes(node.pixelData(0, 0, width, height))
        return core.bgra_to_rgb(data, width, height)

    def nodes_named(doc, predicate):
        return krita_io.find_nodes(doc, lambda n: predicate(n.name()))

    def run_job(case, docker, timeout=300):
        started = docker.generate()
        case.check("Generate started the job", started, docker.status.text())
        if not started:
            return False
        ctl = docker.controller
        done = wait_for(lambda: not ctl.is_running(), timeout)
        case.check("the job ended within {} s".format(timeout), done, docker.status.text())
        if not done:
            docker.cancel()
            wait_for(lambda: not ctl.is_running(), 20)
        case.info["status"] = docker.status.text()
        case.info["job_id"] = ctl.job_id
        case.info["previews"] = ctl.preview_count
        return done

    def check_layers_after(case, doc, docker, prompt, seed, expect_explain):
        ctl = docker.controller
        case.check("the job succeeded", ctl.ok is True, docker.status.text())
        case.check("previews were shown live (>= 1)", ctl.preview_count >= 1, ctl.preview_count)
        case.check("the preview layer was locked", ctl.preview_was_locked)
        left = nodes_named(doc, lambda n: n == core.PREVIEW_LAYER_NAME)
        case.check("the preview layer is gone", not left, [n.name() for n in left])
        name = core.result_layer_name(prompt, seed)
        results = nodes_named(doc, lambda n: n == name)
        case.check(
            "result layer {!r} exists".format(name), len(results) == 1, [n.name() for n in doc.rootNode().childNodes()]
        )
        if not results:
            return None
        result = results[0]
        case.check("the result layer is a visible paint layer", result.type() == "paintlayer" and result.visible())
        group_name = core.group_layer_name(prompt, seed)
        groups = nodes_named(doc, lambda n: n == group_name)
        case.check("group layer {!r} exists".format(group_name), len(groups) == 1)
        if groups:
            children = groups[0].childNodes()
            names = [c.name() for c in children]
            case.info["group_children"] = names
            case.check("the group's layers are hidden", all(not c.visible() for c in children), names)
            case.check("a change map layer is in the group", any(n == "change map" for n in names), names)
            if expect_explain:
                case.check("heatmap layers are in the group", any(n.startswith("heatmap") for n in names), names)
                case.check("subject-mask layers are in the group", any(n.startswith("where '") for n in names), names)
                case.check("mask layers are in the group", any(n.startswith("mask") for n in names), names)
        return layer_rgb(result)

    def check_protected(case, result_rgb, mask):
        bad, outside, changed = _compare(original_rgb, result_rgb, mask)
        protected = sum(1 for m in mask if m)
        case.info.update(protected=protected, protected_differing=bad, outside=outside, outside_changed=changed)
        case.check(
            "pixels under the protected region equal the original bit for bit ({} pixels)".format(protected),
            protected > 0 and bad == 0,
            "{} of {} differ".format(bad, protected),
        )
        case.check(
            "pixels outside the protected region changed",
            outside > 0 and changed > outside // 4,
            "{} of {} changed".format(changed, outside),
        )

    cases = []

    def case(fn):
        cases.append(fn)
        return fn

    # ------------------------------------------------------------------ cases
    @case
    def png_codec():
        """krita_io.write_png (Qt's encoder, which writes the job's reference and mask) keeps 8-bit
        RGB and grey bytes exactly; Qt reads the standard-library encoder's file to the same pixels."""
        c = Case("png_codec")
        tmp = tempfile.mkdtemp(prefix="frisket-krita-png-")
        try:
            for channels, data in ((3, original_rgb), (1, original_rgb[1::3])):
                path = krita_io.write_png(os.path.join(tmp, "qt%d.png" % channels), width, height, channels, data)
                decoded = core.read_png(path)
                c.check(
                    "Qt's {}-channel PNG decodes to the bytes it was given".format(channels),
                    decoded == (width, height, channels, data),
                    decoded[:3],
                )
            path = core.write_png(os.path.join(tmp, "stdlib.png"), width, height, 3, original_rgb)
            img = krita_io.load_image(path)
            rgb = core.bgra_to_rgb(krita_io.to_bgra(img, width, height), width, height)
            c.check("Qt reads the standard library's PNG to the same pixels", rgb == original_rgb)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @case
    def models_and_subjects():
        c = Case("models_and_subjects")
        doc = new_document("models")
        docker = new_docker(doc)
        docker.set_options(options())
        docker.refresh_models()
        c.check("`frisket models` filled the model list", wait_for(lambda: docker.models, 30), docker.status.text())
        names = [docker.model.itemText(i) for i in range(docker.model.count())]
        c.check("the model under test is listed", model in names, names)
        docker.model.setCurrentText(model)
        docker.prompt.setPlainText("a red circle on the left")
        docker.refresh_subjects()
        c.check(
            "`frisket tokenize` filled the subject words",
            wait_for(lambda: docker.subjects.count() >= 5, 30),
            docker.subjects.toolTip(),
        )
        words = [docker.subjects.item(i).text() for i in range(docker.subjects.count())]
        c.info["words"] = words
        c.check("subject words are the prompt's words", words[:3] == ["a", "red", "circle"], words)
        docker.subjects.item(2).setCheckState(Qt.Checked)
        c.check("a checked word becomes a subject", docker.options().subjects == ["circle"], docker.options())
        doc.close()

    @case
    def selection_polling():
        """Krita has no selection signal: the docker polls it and says what will be kept."""
        c = Case("selection_polling")
        doc = new_document("polling")
        docker = new_docker(doc)
        pump(0.7)
        c.check("no selection", docker.selection_info.text().startswith("No selection"), docker.selection_info.text())
        select_rect(doc, 0, 0, 24, height)
        c.check(
            "a new selection is noticed within a second",
            wait_for(lambda: "24x{} at 0,0 is kept exactly".format(height) in docker.selection_info.text(), 2),
            docker.selection_info.text(),
        )
        docker.selection_mode.setCurrentIndex(docker.selection_mode.findData("change"))
        c.check(
            "the region-to-change mode is described",
            wait_for(lambda: "changes; the rest is kept exactly" in docker.selection_info.text(), 2),
            docker.selection_info.text(),
        )
        doc.close()

    @case
    def errors():
        c = Case("errors")
        doc = new_document("errors")
        docker = new_docker(doc)
        # no server listening
        docker.set_options(options(server="http://127.0.0.1:9"))
        started = docker.generate()
        wait_for(lambda: not docker.controller.is_running(), 60)
        msg = docker.status.text()
        c.check(
            "no server: a message, not a traceback",
            (not started or docker.controller.ok is False)
            and "No Frisket server answered" in msg
            and "Traceback" not in msg,
            msg,
        )
        # server status messages (unknown model: NOT_FOUND from the server)
        docker.set_options(options(model="no-such-model"))
        docker.generate()
        wait_for(lambda: not docker.controller.is_running(), 60)
        msg = docker.status.text()
        c.check("a server error reaches the status line", docker.controller.ok is False and "no-such-model" in msg, msg)
        # bad settings: an empty prompt, a client path that does not exist
        docker.set_options(options(prompt=""))
        c.check(
            "an empty prompt is refused with a message",
            docker.generate() is False and "prompt" in docker.status.text(),
            docker.status.text(),
        )
        docker.set_options(options())
        docker.client_path.setText("/nonexistent/frisket")
        c.check(
            "a bad client path is refused with a message",
            docker.generate() is False and "/nonexistent/frisket" in docker.status.text(),
            docker.status.text(),
        )
        docker.client_path.setText("")
        # the whole image protected
        select_rect(doc, 0, 0, width, height)
        c.check(
            "protecting everything is refused with a message",
            docker.generate() is False and "whole image" in docker.status.text(),
            docker.status.text(),
        )
        names = [n.name() for n in doc.rootNode().childNodes()]
        c.check("no layers were left behind", not any(n.startswith("[Frisket") for n in names), names)
        doc.close()

    @case
    def over_limits():
        """A server whose max_side is below the canvas: the client refuses the job before
        sending it, and the status line names the limit."""
        limited = os.environ.get("FRISKET_TEST_LIMITED_SERVER")
        if not limited:
            return
        c = Case("over_limits")
        doc = new_document("over-limits")
        docker = new_docker(doc)
        docker.set_options(options(server=limited))
        started = docker.generate()
        wait_for(lambda: not docker.controller.is_running(), 60)
        msg = docker.status.text()
        c.info["job_id"] = docker.controller.job_id
        c.info["status"] = msg
        c.check("the job failed", (not started) or docker.controller.ok is False, msg)
        c.check("the message says the job is over the server's limits", "over the server's limits" in msg, msg)
        c.check(
            "the message names the limit and the canvas size",
            "max_side" in msg and "{}×{}".format(width, height) in msg,
            msg,
        )
        c.check("no traceback", "Traceback" not in msg, msg)
        names = [n.name() for n in doc.rootNode().childNodes()]
        c.check("no layers were left behind", not any(n.startswith("[Frisket") for n in names), names)
        doc.close()

    @case
    def img2img_previews():
        c = Case("img2img_previews")
        doc = new_document("plain")
        docker = new_docker(doc)
        opts = options(seed=11, steps=4, explain="off")
        docker.set_options(opts)
        seen_preview_layer = []
        docker.controller.previewShown.connect(
            lambda step: seen_preview_layer.append(
                [n.name() for n in doc.rootNode().childNodes()].count(core.PREVIEW_LAYER_NAME)
            )
        )
        if run_job(c, docker):
            c.check(
                "the preview layer existed while previews streamed",
                seen_preview_layer and all(k == 1 for k in seen_preview_layer),
                seen_preview_layer,
            )
            rgb = check_layers_after(c, doc, docker, opts.prompt, 11, expect_explain=False)
            if rgb is not None:
                changed = sum(
                    1 for i in range(width * height) if rgb[3 * i : 3 * i + 3] != original_rgb[3 * i : 3 * i + 3]
                )
                c.check("the result differs from the original", changed > (width * height) // 4, changed)
        doc.close()

    @case
    def cancel():
        c = Case("cancel")
        doc, docker = start_long_job(c, "cancel", 5, "a long job to cancel")
        if docker is None:
            return
        ctl = docker.controller
        c.info["job_id"] = ctl.job_id
        RESULT["cancel_job_id"] = ctl.job_id
        c.check(
            "while it runs, Generate is disabled and Cancel enabled",
            not docker.generate_button.isEnabled() and docker.cancel_button.isEnabled(),
        )
        c.info["steps_before_cancel"] = ctl.state.steps_done
        t0 = time.time()
        docker.cancel()  # the Cancel button
        ended = wait_for(lambda: not ctl.is_running(), 30)
        c.info["cancel_seconds"] = time.time() - t0
        c.info["steps_at_end"] = ctl.state.steps_done
        c.check("the job ended within 30 s of Cancel", ended, docker.status.text())
        c.check("the status says it was cancelled", docker.status.text() == "Cancelled.", docker.status.text())
        c.check("it stopped long before its 400 steps", ctl.state.steps_done < 300, ctl.state.steps_done)
        names = [n.name() for n in doc.rootNode().childNodes()]
        c.check("no result and no preview layer were left", not any(n.startswith("[Frisket") for n in names), names)
        c.check("Generate is enabled again", docker.generate_button.isEnabled())
        # The server is free again: a second job starts at once and finishes.
        docker.set_options(options(steps=2, seed=6, prompt="after the cancel"))
        t1 = time.time()
        if run_job(c, docker, timeout=120):
            c.info["second_job_seconds"] = time.time() - t1
            c.check("a second job ran right after the cancel", docker.controller.ok is True, docker.status.text())
            RESULT["second_job_id"] = docker.controller.job_id
        doc.close()

    @case
    def docker_closed_mid_job():
        """A docker destroyed with its job in flight (its window closed, Krita quitting): the
        QProcess's destructor kills the client. Nothing may reach Krita's traceback dialog, and
        the server job stops (test_krita.py reads its log)."""
        c = Case("docker_closed_mid_job")
        from PyQt5 import sip

        doc, docker = start_long_job(c, "closed", 8, "a job whose docker closes")
        if docker is None:
            return
        RESULT["closed_docker_job_id"] = docker.controller.job_id
        uncaught_before = len(RESULT["uncaught"])
        sip.delete(docker)
        pump(2.0)
        c.check(
            "destroying the docker raised nothing",
            len(RESULT["uncaught"]) == uncaught_before,
            RESULT["uncaught"][uncaught_before:],
        )
        doc.close()

    @case
    def protect_explain():
        c = Case("protect_explain")
        doc = new_document("protect")
        x1 = (width // 2) // 4 * 4
        select_rect(doc, 0, 0, x1, height)  # left half is protected
        docker = new_docker(doc)
        # Grad-SAM manipulates at t = 780, 520, 320: the schedule must reach them (strength 0.9).
        opts = options(seed=7, explain="fast", subjects=["circle"], selection_mode="protect", strength=0.9, steps=10)
        docker.set_options(opts)
        c.check("the checked subject is sent", docker.options().subjects == ["circle"], docker.options().subjects)
        if run_job(c, docker):
            rgb = check_layers_after(c, doc, docker, opts.prompt, 7, expect_explain=True)
            if rgb is not None:
                check_protected(c, rgb, _rect_mask(width, height, 0, 0, x1, height))
        doc.close()

    @case
    def change_region():
        c = Case("change_region")
        doc = new_document("change")
        x0, y0, x1, y1 = 16, 8, width - 16, height - 8
        select_rect(doc, x0, y0, x1 - x0, y1 - y0)  # the region to change; the rest is kept
        docker = new_docker(doc)
        opts = options(seed=9, explain="off", selection_mode="change")
        docker.set_options(opts)
        if run_job(c, docker):
            rgb = check_layers_after(c, doc, docker, opts.prompt, 9, expect_explain=False)
            if rgb is not None:
                inside = _rect_mask(width, height, x0, y0, x1, y1)
                check_protected(c, rgb, bytes(0 if v else 255 for v in inside))
        doc.close()

    @case
    def contract_explain_layers():
        """The plugin's half of protect + explain, against the documented JSON-lines format
        (tests/plugins/fake_frisket.py), independent of what the server implements today."""
        c = Case("contract_explain_layers")
        fake = os.environ.get("FRISKET_TEST_FAKE_CLIENT")
        if not c.check("the fake client is given", fake and os.path.isfile(fake), fake):
            return
        doc = new_document("contract")
        x1 = (width // 2) // 4 * 4
        select_rect(doc, 0, 0, x1, height)
        docker = new_docker(doc)
        docker.client_path.setText(fake)
        opts = options(seed=3, explain="fast", subjects=["red", "circle"], selection_mode="protect")
        docker.set_options(opts)
        if run_job(c, docker, timeout=60):
            rgb = check_layers_after(c, doc, docker, opts.prompt, 3, expect_explain=True)
            names = c.info.get("group_children", [])
            c.check(
                "one heatmap layer per subject word (PNG and .npy-only)",
                sum(1 for n in names if n.startswith("heatmap")) == 2,
                names,
            )
            c.check("the protected-region mask is a layer", any(n.startswith("protected region") for n in names), names)
            if rgb is not None:
                check_protected(c, rgb, _rect_mask(width, height, 0, 0, x1, height))
        docker.client_path.setText("")
        doc.close()

    # The runner re-runs what a stalled Krita left unrecorded (tests/plugins/test_krita.py).
    RESULT["planned"] = [fn.__name__ for fn in cases if not wanted or fn.__name__ in wanted]
    _write()
    for fn in cases:
        if wanted and fn.__name__ not in wanted:
            continue
        try:
            fn()
        except Exception:
            RESULT["cases"].setdefault(fn.__name__, {"checks": [], "info": {}})["error"] = traceback.format_exc()
        _write()
    sys.excepthook = previous_hook


def _known_image(width, height):
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, os.path.join(here, "..", "plugins"))
    import harness_image

    return harness_image.known_image(width, height)


def _rect_mask(width, height, x0, y0, x1, y1):
    m = bytearray(width * height)
    for y in range(y0, y1):
        m[y * width + x0 : y * width + x1] = b"\xff" * (x1 - x0)
    return bytes(m)


def _compare(original, result, mask):
    bad = outside = changed = 0
    for i, m in enumerate(mask):
        same = original[3 * i : 3 * i + 3] == result[3 * i : 3 * i + 3]
        if m:
            bad += not same
        else:
            outside += 1
            changed += not same
    return bad, outside, changed
