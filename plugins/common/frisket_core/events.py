"""The client's JSON-lines output: one-line command answers, and the event stream of a job
(LineBuffer: bytes -> JSON objects; JobState: events -> state)."""

import json

from .errors import FrisketError, ProtocolError, describe_error
from .naming import artifact_layer_name

PROTOCOL_VERSION = 1


def parse_single_line(text):
    """The JSON object of a one-line command (`models`, `tokenize`, `cancel`). An `error`
    line raises FrisketError with the server's message."""
    obj = None
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        check_version(obj)
        if obj.get("event") == "error":
            raise FrisketError(describe_error(obj))
    if obj is None:
        raise ProtocolError("The Frisket client printed no JSON (is it an old version?).")
    return obj


def parse_models(text):
    """`frisket models --json` -> list of model dicts (name, native_width, size_multiple,
    explain, protected_regions, ...)."""
    return list(parse_single_line(text).get("models") or [])


def parse_tokens(text):
    return list(parse_single_line(text).get("tokens") or [])


def subject_candidates(tokens):
    """The prompt's words that can be picked as subjects, in order, each once, with the
    token positions that belong to it: [(word, [index, ...])]."""
    order, where = [], {}
    for t in tokens:
        word = t.get("word") or ""
        if not word:
            continue
        if word not in where:
            where[word] = []
            order.append(word)
        where[word].append(int(t.get("index", 0)))
    return [(w, where[w]) for w in order]


def check_version(obj):
    v = obj.get("v")
    if v != PROTOCOL_VERSION:
        raise ProtocolError(
            "The Frisket client speaks JSON format version {} but this plugin understands version {}: "
            "use a matching client.".format(v, PROTOCOL_VERSION)
        )


class LineBuffer(object):
    """Bytes in (as they arrive from the process), JSON objects out, one per complete line.
    Lines that are not JSON objects are kept in `noise` (the client prints nothing else on
    stdout, but a wrapper script might)."""

    def __init__(self):
        self._pending = b""
        self.noise = []

    def feed(self, data):
        if isinstance(data, str):
            data = data.encode("utf-8")
        self._pending += bytes(data)
        out = []
        while b"\n" in self._pending:
            line, self._pending = self._pending.split(b"\n", 1)
            obj = self._parse(line)
            if obj is not None:
                out.append(obj)
        return out

    def flush(self):
        """The last line when the output did not end with a newline."""
        line, self._pending = self._pending, b""
        obj = self._parse(line)
        return [obj] if obj is not None else []

    def _parse(self, line):
        text = line.decode("utf-8", "replace").strip()
        if not text:
            return None
        try:
            obj = json.loads(text)
        except ValueError:
            self.noise.append(text)
            return None
        if not isinstance(obj, dict):
            self.noise.append(text)
            return None
        return obj


class JobState(object):
    """Applies the JSON events of one `frisket generate --json` run. Unknown events and
    keys are ignored (new ones may appear within format version 1)."""

    def __init__(self, job_id=None):
        self.job_id = job_id
        self.seed = None
        self.total_steps = None
        self.steps_done = 0
        self.queue_position = None
        self.queue_eta = None  # seconds until the job should start, when the server says
        self.loading_model = None
        self.width = None
        self.height = None
        self.previews = []  # events, in order
        self.masks = []
        self.heatmaps = []
        self.result = None
        self.error = None
        self.cancel_requested = False

    @property
    def finished(self):
        return self.result is not None or self.error is not None

    @property
    def cancelled(self):
        return self.error is not None and self.error.get("code") == "CANCELLED"

    def apply(self, event):
        """Records one event; returns its name (or None for a line without one)."""
        check_version(event)
        name = event.get("event")
        if event.get("job_id"):
            self.job_id = event["job_id"]
        if name == "queued":
            self.queue_position = event.get("position")
            self.queue_eta = event.get("estimated_start_seconds")
        elif name == "loading":
            self.loading_model = event.get("model")
        elif name == "started":
            self.loading_model = None
            self.total_steps = event.get("total_steps")
            self.seed = event.get("seed", self.seed)
            self.width, self.height = event.get("width"), event.get("height")
        elif name == "step":
            self.steps_done = int(event.get("index", -1)) + 1
            self.total_steps = event.get("total", self.total_steps)
        elif name == "preview":
            self.previews.append(event)
        elif name == "mask":
            self.masks.append(event)
        elif name == "heatmap":
            self.heatmaps.append(event)
        elif name == "result":
            self.result = event
            self.seed = event.get("seed", self.seed)
        elif name == "error":
            self.error = event
        return name

    def progress(self):
        if not self.total_steps:
            return 0.0
        return min(1.0, float(self.steps_done) / float(self.total_steps))

    def status_text(self):
        if self.error is not None:
            return "Cancelled." if self.cancelled else "Failed: " + describe_error(self.error)
        if self.result is not None:
            t = (self.result.get("timings") or {}).get("total_seconds")
            return "Done: seed {}{}.".format(self.seed, ", {:.1f} s".format(t) if isinstance(t, (int, float)) else "")
        if self.cancel_requested:
            return "Cancelling…"
        if self.total_steps:
            return "Step {}/{} (seed {})".format(self.steps_done, self.total_steps, self.seed)
        if self.loading_model:
            return "Loading model {}…".format(self.loading_model)
        if self.queue_position:
            eta = self.queue_eta
            if isinstance(eta, (int, float)):
                return "Queued ({} ahead, starts in about {:.0f} s)".format(self.queue_position, eta)
            return "Queued ({} ahead)".format(self.queue_position)
        return "Starting…"

    def artifacts(self):
        """What to show as hidden layers, in order: [(kind, name, path, event)] where kind
        is mask, protected_mask, heatmap, subject_mask or change_map and path the PNG (or
        .npy when the server sent no PNG)."""
        out = []
        for m in self.masks:
            kind = "protected_mask" if m.get("kind") == "protected" else "mask"
            path = m.get("path") or m.get("npy")
            if path:
                out.append((kind, artifact_layer_name(kind, m), path, m))
        for h in self.heatmaps:
            path = h.get("path") or h.get("npy")
            if path:
                out.append(("heatmap", artifact_layer_name("heatmap", h), path, h))
            if h.get("subject_mask"):
                out.append(("subject_mask", artifact_layer_name("subject_mask", h), h["subject_mask"], h))
        if self.result is not None and self.result.get("change_map"):
            out.append(("change_map", artifact_layer_name("change_map", {}), self.result["change_map"], self.result))
        return out
