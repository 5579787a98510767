"""Frisket for Krita 5.x (PyQt5): a docker that sends the visible image and the selection
to a Frisket server through the bundled `frisket` client, shows each step's preview live
and brings the result, heatmaps and masks back as layers.

Krita 6 (Qt 6 / PyQt6) is refused with a message: the plugin is written against PyQt5."""

import sys

from krita import Krita

SUPPORTED_MAJOR = 5


def krita_major_version():
    try:
        return int(str(Krita.instance().version()).split(".")[0])
    except (ValueError, AttributeError):
        return SUPPORTED_MAJOR


def _refuse(version):
    message = (
        "The Frisket plugin supports Krita 5.x (PyQt5); this is Krita {}. "
        "It was not loaded. Use Krita 5, or check for a newer Frisket plugin."
    ).format(version)
    print("frisket: " + message, file=sys.stderr)
    try:  # Krita 6 ships PyQt6; show the message once the window is up
        try:
            from PyQt6.QtCore import QTimer
            from PyQt6.QtWidgets import QMessageBox
        except ImportError:
            from PyQt5.QtCore import QTimer
            from PyQt5.QtWidgets import QMessageBox
        QTimer.singleShot(3000, lambda: QMessageBox.warning(None, "Frisket", message))
    except Exception:  # a message on stderr is all we can do
        pass


if krita_major_version() != SUPPORTED_MAJOR:
    _refuse(Krita.instance().version())
else:
    from krita import DockWidgetFactory, DockWidgetFactoryBase

    from .docker import DOCKER_ID, FrisketDocker
    from .extension import FrisketExtension

    _app = Krita.instance()
    _app.addDockWidgetFactory(DockWidgetFactory(DOCKER_ID, DockWidgetFactoryBase.DockRight, FrisketDocker))
    _app.addExtension(FrisketExtension(_app))
