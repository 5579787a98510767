"""The Frisket docker (Settings ▸ Dockers ▸ Frisket)."""

import os

from krita import DockWidget, Krita
from PyQt5.QtCore import Qt, QTimer
from PyQt5.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QMessageBox,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QSizePolicy,
    QSpinBox,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from . import krita_io, settings
from ._core import core
from .controller import ClientCall, GenerateController

DOCKER_ID = "frisket_docker"
TITLE = "Frisket"
SELECTION_POLL_MS = 500
TOKENIZE_DELAY_MS = 700

SELECTION_LABELS = [
    ("protect", "Selection is protected (kept exactly)"),
    ("change", "Selection is the region to change"),
]


class FrisketDocker(DockWidget):
    def __init__(self):
        super().__init__()
        self.setWindowTitle(TITLE)
        self.setObjectName(DOCKER_ID)
        self.controller = GenerateController(self)
        self.controller.statusChanged.connect(self._set_status)
        self.controller.progressChanged.connect(self._set_progress)
        self.controller.finished.connect(self._on_finished)
        self.models = []
        self.show_message_boxes = True  # tests switch this off (the status line still shows it)
        self._document = None  # set by tests; otherwise the active document
        self._build_ui()
        self._load_settings()
        self._tokenize_timer = QTimer(self)
        self._tokenize_timer.setSingleShot(True)
        self._tokenize_timer.timeout.connect(self.refresh_subjects)
        self.prompt.textChanged.connect(lambda: self._tokenize_timer.start(TOKENIZE_DELAY_MS))
        # Krita has no selection-changed signal: poll it.
        self._selection_timer = QTimer(self)
        self._selection_timer.timeout.connect(self._poll_selection)
        self._selection_timer.start(SELECTION_POLL_MS)
        self._update_buttons()

    # ------------------------------------------------------------------ UI
    def _build_ui(self):
        root = QWidget(self)
        layout = QVBoxLayout(root)
        form = QFormLayout()
        form.setFieldGrowthPolicy(QFormLayout.AllNonFixedFieldsGrow)

        self.server = QLineEdit()
        self.server.setPlaceholderText(core.DEFAULT_SERVER)
        form.addRow("Server", self.server)

        model_row = QHBoxLayout()
        self.model = QComboBox()
        self.model.setEditable(True)
        self.model.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Fixed)
        self.refresh_models_button = QToolButton()
        self.refresh_models_button.setText("↻")
        self.refresh_models_button.setToolTip("List the server's models (frisket models)")
        self.refresh_models_button.clicked.connect(self.refresh_models)
        model_row.addWidget(self.model)
        model_row.addWidget(self.refresh_models_button)
        form.addRow("Model", model_row)

        self.prompt = QPlainTextEdit()
        self.prompt.setPlaceholderText("What the image should show")
        self.prompt.setFixedHeight(60)
        form.addRow("Prompt", self.prompt)
        self.negative_prompt = QLineEdit()
        self.negative_prompt.setPlaceholderText("What to steer away from")
        form.addRow("Negative", self.negative_prompt)

        subjects_row = QVBoxLayout()
        self.subjects = QListWidget()
        self.subjects.setFlow(QListWidget.LeftToRight)
        self.subjects.setWrapping(True)
        self.subjects.setFixedHeight(52)
        self.subjects.setToolTip("Subject words for Grad-SAM: check the words whose regions should change")
        subjects_row.addWidget(self.subjects)
        form.addRow("Subjects", subjects_row)

        self.strength = QDoubleSpinBox()
        self.strength.setRange(0.01, 1.0)
        self.strength.setSingleStep(0.05)
        self.strength.setDecimals(2)
        form.addRow("Strength", self.strength)
        self.steps = QSpinBox()
        self.steps.setRange(1, 500)
        form.addRow("Steps", self.steps)
        self.seed = QSpinBox()
        self.seed.setRange(-1, 2147483647)
        self.seed.setSpecialValueText("random")
        form.addRow("Seed", self.seed)
        self.explain = QComboBox()
        for mode in core.EXPLAIN_MODES:
            self.explain.addItem(mode, mode)
        self.explain.setToolTip("Grad-SAM: off, fast, or exact (slower); fast and exact add heatmap and mask layers")
        form.addRow("Explain", self.explain)
        self.selection_mode = QComboBox()
        for value, label in SELECTION_LABELS:
            self.selection_mode.addItem(label, value)
        form.addRow("Selection", self.selection_mode)
        layout.addLayout(form)

        self.selection_info = QLabel("No selection: the whole image may change")
        self.selection_info.setWordWrap(True)
        layout.addWidget(self.selection_info)

        buttons = QHBoxLayout()
        self.generate_button = QPushButton("Generate")
        self.generate_button.clicked.connect(self.generate)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.clicked.connect(self.cancel)
        buttons.addWidget(self.generate_button)
        buttons.addWidget(self.cancel_button)
        layout.addLayout(buttons)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.progress.setTextVisible(False)
        self.progress.setFixedHeight(8)
        layout.addWidget(self.progress)
        self.status = QLabel("Ready.")
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextSelectableByMouse)
        layout.addWidget(self.status)

        self.settings_box = QGroupBox("Settings")
        self.settings_box.setCheckable(True)
        self.settings_box.setChecked(False)
        self.settings_box.toggled.connect(self._toggle_settings)
        box_layout = QVBoxLayout(self.settings_box)
        box_layout.setContentsMargins(4, 4, 4, 4)
        self.settings_body = QWidget()
        box_layout.addWidget(self.settings_body)
        settings_layout = QFormLayout(self.settings_body)
        settings_layout.setContentsMargins(0, 0, 0, 0)
        client_row = QHBoxLayout()
        self.client_path = QLineEdit()
        self.client_path.setPlaceholderText("auto: $FRISKET_CLIENT, next to the plugin, PATH")
        self.browse_button = QToolButton()
        self.browse_button.setText("…")
        self.browse_button.clicked.connect(self._browse_client)
        client_row.addWidget(self.client_path)
        client_row.addWidget(self.browse_button)
        settings_layout.addRow("Client", client_row)
        self.client_found = QLabel("")
        self.client_found.setWordWrap(True)
        settings_layout.addRow("", self.client_found)
        layout.addWidget(self.settings_box)
        self._toggle_settings(False)
        layout.addStretch(1)
        self.setWidget(root)

    def _toggle_settings(self, on):
        self.settings_body.setVisible(on)
        if on:
            self._show_client()

    def _load_settings(self):
        self.server.setText(settings.read("server"))
        model = settings.read("model")
        if model:
            self.model.addItem(model)
            self.model.setCurrentText(model)
        self.prompt.setPlainText(settings.read("prompt"))
        self.negative_prompt.setText(settings.read("negative_prompt"))
        self.strength.setValue(_float(settings.read("strength"), 0.9))
        self.steps.setValue(_int(settings.read("steps"), 20))
        self.seed.setValue(_int(settings.read("seed"), -1))
        self._select_data(self.explain, settings.read("explain") or "fast")
        self._select_data(self.selection_mode, settings.read("selection_mode") or "protect")
        self.client_path.setText(settings.read("client_path"))

    def _save_settings(self, opts):
        for key in (
            "server",
            "model",
            "prompt",
            "negative_prompt",
            "strength",
            "steps",
            "seed",
            "explain",
            "selection_mode",
        ):
            value = getattr(opts, key)
            settings.write(key, -1 if key == "seed" and value is None else value)
        settings.write("client_path", self.client_path.text().strip())

    @staticmethod
    def _select_data(combo, value):
        i = combo.findData(value)
        if i >= 0:
            combo.setCurrentIndex(i)

    # ------------------------------------------------------------------ state
    def document(self):
        if self._document is not None:
            return self._document
        return Krita.instance().activeDocument()

    def set_document(self, doc):
        """Pins the docker to a document (tests; Krita itself uses the active one)."""
        self._document = doc

    def options(self):
        seed = self.seed.value()
        return core.GenerateOptions(
            server=self.server.text().strip() or core.DEFAULT_SERVER,
            model=self.model.currentText().strip(),
            prompt=self.prompt.toPlainText().strip(),
            negative_prompt=self.negative_prompt.text().strip(),
            subjects=self.checked_subjects(),
            strength=round(self.strength.value(), 4),
            steps=self.steps.value(),
            seed=None if seed < 0 else seed,
            explain=self.explain.currentData(),
            selection_mode=self.selection_mode.currentData(),
        )

    def set_options(self, opts):
        """Fills the widgets (tests, and restoring settings)."""
        self.server.setText(opts.server)
        if self.model.findText(opts.model) < 0:
            self.model.addItem(opts.model)
        self.model.setCurrentText(opts.model)
        self.prompt.setPlainText(opts.prompt)
        self.negative_prompt.setText(opts.negative_prompt)
        self.strength.setValue(float(opts.strength))
        self.steps.setValue(int(opts.steps))
        self.seed.setValue(-1 if opts.seed is None else int(opts.seed))
        self._select_data(self.explain, opts.explain)
        self._select_data(self.selection_mode, opts.selection_mode)
        self.set_subject_words([(w, []) for w in opts.subjects], checked=opts.subjects)

    def checked_subjects(self):
        out = []
        for i in range(self.subjects.count()):
            item = self.subjects.item(i)
            if item.checkState() == Qt.Checked:
                out.append(item.data(Qt.UserRole))
        return out

    def set_subject_words(self, candidates, checked=()):
        before = set(self.checked_subjects()) | set(checked)
        self.subjects.clear()
        for word, indices in candidates:
            item = QListWidgetItem(word)
            item.setData(Qt.UserRole, word)
            item.setFlags(item.flags() | Qt.ItemIsUserCheckable)
            item.setCheckState(Qt.Checked if word in before else Qt.Unchecked)
            if indices:
                item.setToolTip("token positions {}".format(", ".join(str(i) for i in indices)))
            self.subjects.addItem(item)

    def _client(self):
        """The client path, or None after telling the user why there is none."""
        settings.write("client_path", self.client_path.text().strip())
        try:
            path, _source = settings.find_client()
            return path
        except core.FrisketError as e:
            self._report(str(e))
            return None

    def _show_client(self):
        settings.write("client_path", self.client_path.text().strip())
        try:
            path, source = settings.find_client()
            self.client_found.setText("Using {} (from {})".format(path, source))
        except core.FrisketError as e:
            self.client_found.setText(str(e))

    def _browse_client(self):
        path, _ = QFileDialog.getOpenFileName(self, "The frisket client", os.path.expanduser("~"))
        if path:
            self.client_path.setText(path)
            self._show_client()

    # ------------------------------------------------------------------ actions
    def generate(self):
        """The Generate button."""
        if self.controller.is_running():
            self._report("A job is already running.")
            return False
        client = self._client()
        if client is None:
            return False
        opts = self.options()
        self._save_settings(opts)
        try:
            self.controller.start(self.document(), opts, client, self.models or None)
        except core.FrisketError as e:
            self._report(str(e))
            return False
        except Exception as e:  # never a traceback
            self._report("Could not start: {}".format(e))
            return False
        self._update_buttons()
        return True

    def cancel(self):
        """The Cancel button."""
        self.controller.cancel()
        self._update_buttons()

    def refresh_models(self):
        client = self._client()
        if client is None:
            return
        server = self.server.text().strip() or core.DEFAULT_SERVER
        self._set_status("Listing models…")
        call = ClientCall(client, core.build_models_args(server), core.parse_models, server, parent=self)
        call.done.connect(self._on_models)

    def _on_models(self, models, error):
        if error:
            self._report(error, box=False)
            return
        self.models = models or []
        current = self.model.currentText()
        self.model.clear()
        for m in self.models:
            tip = "{} {}x{}; explain: {}; protected regions: {}".format(
                m.get("architecture", ""),
                m.get("native_width"),
                m.get("native_height"),
                "yes" if m.get("explain") else "no",
                "yes" if m.get("protected_regions") else "no",
            )
            self.model.addItem(m.get("name", "?"))
            self.model.setItemData(self.model.count() - 1, tip, Qt.ToolTipRole)
        if current and self.model.findText(current) >= 0:
            self.model.setCurrentText(current)
        self._set_status("{} model(s) on the server.".format(len(self.models)))

    def refresh_subjects(self):
        prompt = self.prompt.toPlainText().strip()
        model = self.model.currentText().strip()
        if not prompt or not model:
            self.set_subject_words([])
            return
        try:
            client, _ = settings.find_client()
        except core.FrisketError:
            return  # reported on Generate
        server = self.server.text().strip() or core.DEFAULT_SERVER
        call = ClientCall(
            client, core.build_tokenize_args(server, model, prompt), core.parse_tokens, server, parent=self
        )
        call.done.connect(self._on_tokens)

    def _on_tokens(self, tokens, error):
        if error:
            self.subjects.setToolTip(error)
            return
        self.set_subject_words(core.subject_candidates(tokens or []))

    # ------------------------------------------------------------------ feedback
    def _poll_selection(self):
        try:
            doc = self.document()
            box = krita_io.selection_summary(doc) if doc is not None else None
        except Exception:
            box = None
        mode = self.selection_mode.currentData()
        if box is None:
            text = "No selection: the whole image may change."
        elif mode == "protect":
            text = "Selection {}x{} at {},{} is kept exactly.".format(box[2], box[3], box[0], box[1])
        else:
            text = "Selection {}x{} at {},{} changes; the rest is kept exactly.".format(box[2], box[3], box[0], box[1])
        if self.selection_info.text() != text:
            self.selection_info.setText(text)

    def _set_status(self, text):
        self.status.setText(text)

    def _set_progress(self, fraction):
        self.progress.setValue(int(1000 * fraction))

    def _report(self, message, box=True):
        self._set_status(message)
        if box and self.show_message_boxes:
            QMessageBox.warning(self, TITLE, message)

    def _on_finished(self, ok, message):
        self._update_buttons()
        if not ok and message != "Cancelled.":
            self._report(message)

    def _update_buttons(self):
        running = self.controller.is_running()
        self.generate_button.setEnabled(not running)
        self.cancel_button.setEnabled(running)

    def canvasChanged(self, canvas):
        self._poll_selection()


def _float(text, default):
    try:
        return float(text)
    except (TypeError, ValueError):
        return default


def _int(text, default):
    try:
        return int(float(text))
    except (TypeError, ValueError):
        return default
