"""Test helper for `make plugin-screenshot` (tests/krita/screenshot.py): once Krita's window
is up, opens the known test image, fills the Frisket docker, selects the left half, runs one job against the
server in $FRISKET_SHOT_SERVER, saves a screenshot to $FRISKET_SHOT_OUT
and quits. Not part of the plugin."""

import json
import os
import sys
import time
import traceback

from krita import Krita, Selection
from PyQt5.QtCore import QByteArray, QTimer
from PyQt5.QtWidgets import QApplication, QDockWidget

OUT = os.environ.get("FRISKET_SHOT_OUT", "/tmp/frisket-docker.png")
LOG = OUT + ".json"
state = {"step": "waiting for the window", "t0": time.time(), "log": []}


def log(msg):
    state["log"].append("%.1fs %s" % (time.time() - state["t0"], msg))
    with open(LOG, "w") as f:
        json.dump(state["log"], f, indent=1)


def find_docker(window):
    for dock in window.qwindow().findChildren(QDockWidget):
        if dock.objectName() == "frisket_docker":
            return dock
    return None


def finish():
    log("quitting")
    for doc in Krita.instance().documents():
        doc.setModified(False)
    QApplication.instance().quit()


def run():
    try:
        _run()
    except Exception:
        log(traceback.format_exc())
        finish()


def _run():
    k = Krita.instance()
    window = k.activeWindow()
    if window is None or not window.qwindow().isVisible():
        QTimer.singleShot(500, run)
        return
    sys.path.insert(0, os.environ["FRISKET_SHOT_HELPERS"])
    import harness_image
    from frisket._core import core

    w, h = 192, 144
    rgb = harness_image.known_image(w, h)
    doc = k.createDocument(w, h, "frisket-demo", "RGBA", "U8", "", 72.0)
    layer = doc.createNode("sketch", "paintlayer")
    doc.rootNode().addChildNode(layer, None)
    layer.setPixelData(QByteArray(core.rgb_to_bgra(rgb, w, h)), 0, 0, w, h)
    doc.refreshProjection()
    window.addView(doc)
    log("document open")
    dock = find_docker(window)
    if dock is None:
        log("the Frisket docker was not found")
        finish()
        return
    window.qwindow().setGeometry(0, 0, 1280, 960)
    dock.show()
    dock.raise_()
    dock.show_message_boxes = False
    dock.server.setText(os.environ["FRISKET_SHOT_SERVER"])
    dock.refresh_models()
    t_end = time.time() + 20
    while not dock.models and time.time() < t_end:
        QApplication.processEvents()
        time.sleep(0.05)
    dock.model.setCurrentText("sd1")
    dock.prompt.setPlainText("a red circle on the left")
    dock.negative_prompt.setText("blurry")
    dock.refresh_subjects()
    t_end = time.time() + 20
    while dock.subjects.count() < 3 and time.time() < t_end:
        QApplication.processEvents()
        time.sleep(0.05)
    from PyQt5.QtCore import Qt

    for i in range(dock.subjects.count()):
        if dock.subjects.item(i).text() == "circle":
            dock.subjects.item(i).setCheckState(Qt.Checked)
    dock.strength.setValue(0.9)
    dock.steps.setValue(20)
    dock.seed.setValue(42)
    dock.explain.setCurrentIndex(dock.explain.findData(os.environ.get("FRISKET_SHOT_EXPLAIN", "fast")))
    dock.selection_mode.setCurrentIndex(0)
    sel = Selection()
    sel.select(0, 0, 96, 144, 255)  # the left half is kept exactly
    doc.setSelection(sel)
    doc.waitForDone()
    started = dock.generate()
    log("generate: %s %s" % (started, dock.status.text()))
    t_end = time.time() + 120
    while dock.controller.is_running() and time.time() < t_end:
        QApplication.processEvents()
        time.sleep(0.05)
    log("job: %s" % dock.status.text())
    QTimer.singleShot(1000, settle_then_shoot)


def shoot():
    try:
        window = Krita.instance().activeWindow()
        qwin = window.qwindow()
        view = window.activeView()
        if view is not None and view.canvas() is not None:
            view.canvas().setZoomLevel(3.5)
        QApplication.processEvents()
        QApplication.processEvents()
        pix = qwin.grab()
        pix.save(OUT, "PNG")
        log("saved %s (%dx%d)" % (OUT, pix.width(), pix.height()))
    except Exception:
        log(traceback.format_exc())
    QTimer.singleShot(300, finish)


def settle_then_shoot():
    view = Krita.instance().activeWindow().activeView()
    if view is not None and view.canvas() is not None:
        view.canvas().setZoomLevel(3.5)
    QTimer.singleShot(1500, shoot)


QTimer.singleShot(3000, run)
