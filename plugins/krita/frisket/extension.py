"""Tools ▸ Scripts ▸ Frisket: Generate / Cancel (actions from frisket.action): they run the
Frisket docker's buttons, so they can get keyboard shortcuts."""

from krita import Extension, Krita
from PyQt5.QtWidgets import QMessageBox

from .docker import DOCKER_ID, FrisketDocker


def find_docker():
    window = Krita.instance().activeWindow()
    if window is None:
        return None
    for dock in window.dockers():
        if isinstance(dock, FrisketDocker) or dock.objectName() == DOCKER_ID:
            return dock
    return None


class FrisketExtension(Extension):
    def __init__(self, parent):
        super().__init__(parent)

    def setup(self):
        pass

    def createActions(self, window):
        generate = window.createAction("frisket_generate", "Frisket: Generate", "tools/scripts")
        generate.triggered.connect(self.generate)
        cancel = window.createAction("frisket_cancel", "Frisket: Cancel", "tools/scripts")
        cancel.triggered.connect(self.cancel)

    def _docker(self):
        dock = find_docker()
        if dock is None:
            QMessageBox.information(None, "Frisket", "Open the Frisket docker first (Settings ▸ Dockers ▸ Frisket).")
            return None
        dock.show()
        dock.raise_()
        return dock

    def generate(self):
        dock = self._docker()
        if dock is not None:
            dock.generate()

    def cancel(self):
        dock = find_docker()
        if dock is not None:
            dock.cancel()
