"""Frisket editor-plugin core: everything the Krita and GIMP plugins share that needs
neither Krita nor GIMP.

Python 3.6+ standard library only (Krita's bundled Python has no pip packages; GIMP 3's
Python may be minimal too). The plugins talk to a Frisket server only through the bundled
`frisket` command-line client in its JSON-lines mode (client/README.md, "JSON lines
(--json), format version 1"); this module builds the client's arguments, parses its
output, converts selections to protected-region masks and names the layers.

The canonical file is plugins/common/frisket_core.py. `make plugin-krita` copies it into
the Krita package as frisket/frisket_core.py and `make plugin-gimp` next to the GIMP
plug-in; in a source checkout each plugin finds it here (see its _load_core()).

Contents:
  * client discovery: find_client()
  * GenerateOptions + build_generate_args(), models/tokenize/cancel arguments
  * the event stream: LineBuffer (bytes -> JSON objects), JobState (events -> state)
  * selection -> mask: protect_mask_from_selection()
  * PNG and .npy read/write (8-bit grey/RGB/RGBA PNG, float32 .npy), no Qt/GEGL needed
  * layer names: result_layer_name(), group_layer_name(), artifact_layer_name()
  * human messages for errors: describe_error(), describe_exit()
  * run_job(): a blocking job runner (subprocess) for hosts without an event loop (GIMP)
"""

import json
import os
import shutil
import struct
import subprocess
import sys
import uuid
import zlib

PROTOCOL_VERSION = 1
DEFAULT_SERVER = "http://127.0.0.1:50051"
PREVIEW_LAYER_NAME = "[Frisket preview]"
RESULT_PREFIX = "[Frisket]"
EXPLAIN_MODES = ("off", "fast", "exact")
# What the editor's selection means: the region to keep bit for bit, or the region to change
# (everything else is kept).
SELECTION_MODES = ("protect", "change")
CLIENT_ENV = "FRISKET_CLIENT"
SERVER_ENV = "FRISKET_SERVER"


class FrisketError(Exception):
    """A problem to show the user as a message (never a traceback)."""


class ClientNotFound(FrisketError):
    pass


class ProtocolError(FrisketError):
    pass


# --------------------------------------------------------------------------------------
# Client discovery


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
                    "plugin setting" if source == "setting" else "$" + CLIENT_ENV, candidate))
        tried.append(candidate)
    raise ClientNotFound(
        "The Frisket client `frisket` was not found: set its path in the plugin's settings, "
        "set ${}, put it next to the plugin or on the PATH (build it with `cargo build -p frisket`)."
        .format(CLIENT_ENV))


def default_server(environ=None):
    environ = os.environ if environ is None else environ
    return (environ.get(SERVER_ENV) or "").strip() or DEFAULT_SERVER


# --------------------------------------------------------------------------------------
# Requests


class GenerateOptions(object):
    """What the user chose in the docker / dialog."""

    FIELDS = ("server", "model", "prompt", "negative_prompt", "subjects", "strength", "steps",
              "seed", "explain", "selection_mode", "guidance", "scheduler", "preview_every")

    def __init__(self, server=DEFAULT_SERVER, model="", prompt="", negative_prompt="", subjects=(),
                 strength=0.9, steps=20, seed=None, explain="fast", selection_mode="protect",
                 guidance=None, scheduler=None, preview_every=1):
        self.server = server
        self.model = model
        self.prompt = prompt
        self.negative_prompt = negative_prompt
        self.subjects = list(subjects)
        self.strength = strength
        self.steps = steps
        self.seed = seed  # None or negative: the server draws one
        self.explain = explain
        self.selection_mode = selection_mode
        self.guidance = guidance
        self.scheduler = scheduler
        self.preview_every = preview_every

    def to_dict(self):
        return {k: getattr(self, k) for k in self.FIELDS}

    @classmethod
    def from_dict(cls, d):
        return cls(**{k: d[k] for k in cls.FIELDS if k in d})

    def __repr__(self):
        return "GenerateOptions(%r)" % self.to_dict()


def validate(opts, models=None, image_size=None):
    """Problems with the options, as messages (empty: fine). `models`: the parsed
    `frisket models` list when known; `image_size`: (width, height) of the reference."""
    problems = []
    if not (opts.server or "").strip():
        problems.append("Set the server address (e.g. {}).".format(DEFAULT_SERVER))
    if not (opts.model or "").strip():
        problems.append("Pick a model (press Refresh to list the server's models).")
    if not (opts.prompt or "").strip():
        problems.append("Write a prompt.")
    try:
        s = float(opts.strength)
        if not (0.0 < s <= 1.0):
            problems.append("Strength must be in (0, 1], got {}.".format(opts.strength))
    except (TypeError, ValueError):
        problems.append("Strength must be a number in (0, 1].")
    try:
        if int(opts.steps) < 1:
            problems.append("Steps must be at least 1.")
    except (TypeError, ValueError):
        problems.append("Steps must be a whole number.")
    if opts.explain not in EXPLAIN_MODES:
        problems.append("Explain mode must be one of {}.".format(", ".join(EXPLAIN_MODES)))
    if opts.selection_mode not in SELECTION_MODES:
        problems.append("Selection mode must be one of {}.".format(", ".join(SELECTION_MODES)))
    if models and opts.model:
        info = next((m for m in models if m.get("name") == opts.model), None)
        if info is None:
            problems.append("The server has no model named {!r} (it has: {}).".format(
                opts.model, ", ".join(m.get("name", "?") for m in models)))
        elif image_size:
            mult = int(info.get("size_multiple") or 1)
            w, h = image_size
            if w % mult or h % mult:
                problems.append(
                    "The image is {}x{} but model {} needs a width and height that are multiples of {}: "
                    "crop or resize the canvas (e.g. to {}x{}).".format(
                        w, h, opts.model, mult, max(mult, w - w % mult), max(mult, h - h % mult)))
    return problems


def new_job_id(prefix="frisket-plugin"):
    """A client-chosen job id, so Cancel works even before the first event arrives."""
    return "{}-{}".format(prefix, uuid.uuid4().hex[:12])


def _num(x):
    """A number as the CLI expects it (no exponent for small floats)."""
    if isinstance(x, float):
        text = repr(x)
        return text[:-2] if text.endswith(".0") else text
    return str(x)


def build_generate_args(opts, out, reference=None, protect=None, dump_dir=None, job_id=None):
    """`frisket` arguments (without the executable) for one job in JSON-lines mode."""
    args = ["generate", "--json", "--server", opts.server, "--model", opts.model, "--prompt", opts.prompt]
    if opts.negative_prompt:
        args += ["--negative-prompt", opts.negative_prompt]
    if opts.seed is not None and int(opts.seed) >= 0:
        args += ["--seed", str(int(opts.seed))]
    if opts.steps is not None:
        args += ["--steps", str(int(opts.steps))]
    if opts.guidance is not None:
        args += ["--guidance", _num(float(opts.guidance))]
    if opts.scheduler:
        args += ["--scheduler", opts.scheduler]
    if reference:
        args += ["--reference", reference]
        if opts.strength is not None:
            args += ["--strength", _num(float(opts.strength))]
        if protect:
            args += ["--protect", protect]
    if opts.preview_every is not None and int(opts.preview_every) >= 0:
        args += ["--preview-every", str(int(opts.preview_every))]
    if opts.explain and opts.explain != "off":
        args += ["--explain", opts.explain, "--masks", "--heatmaps"]
        for word in unique(opts.subjects):
            args += ["--subject", word]
    if dump_dir:
        args += ["--dump-dir", dump_dir]
    if job_id:
        args += ["--job-id", job_id]
    args += ["--out", out]
    return args


def build_models_args(server):
    return ["models", "--json", "--server", server]


def build_tokenize_args(server, model, prompt):
    return ["tokenize", prompt, "--model", model, "--json", "--server", server]


def build_cancel_args(server, job_id):
    return ["cancel", job_id, "--json", "--server", server]


def unique(items):
    seen, out = set(), []
    for x in items:
        if x and x not in seen:
            seen.add(x)
            out.append(x)
    return out


# --------------------------------------------------------------------------------------
# Output of the one-line commands


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
            "use a matching client.".format(v, PROTOCOL_VERSION))


# --------------------------------------------------------------------------------------
# The event stream


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
        elif name == "started":
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
        if self.queue_position:
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


# --------------------------------------------------------------------------------------
# Errors as messages


_CODE_HINTS = {
    "UNAVAILABLE": "No Frisket server answered at {server}. Start one (`frisket-server serve --models DIR`) "
                   "or fix the server address.",
    "USAGE": "The plugin built arguments the client did not accept (client too old or too new?): {message}",
    "INVALID_INPUT": "The client could not read an input file: {message}",
    "IO": "The client could not write its output: {message}",
    "PROTOCOL": "The server's answer was malformed: {message}",
    "CANCELLED": "The job was cancelled.",
    "RESOURCE_EXHAUSTED": "The server is busy (its queue is full); try again in a moment. ({message})",
    "NOT_FOUND": "The server does not know that: {message}",
    "UNIMPLEMENTED": "This server does not support that yet: {message}",
}


def describe_error(event, server=None):
    """A one-paragraph message for an `error` line."""
    code = str(event.get("code") or "ERROR")
    message = str(event.get("message") or "").strip()
    hint = _CODE_HINTS.get(code)
    if hint:
        text = hint.format(server=server or "the configured address", message=message)
    elif message:
        text = "{} ({})".format(message, code)
    else:
        text = code
    if "outside this job's schedule" in message:
        text += (" Grad-SAM manipulates at t = 780, 520 and 320, so the job must start above t = 780: raise the "
                 "strength or the steps (0.85 or more at 20 steps), or set Explain to off.")
    return text


def describe_exit(exit_code, stderr_text="", server=None):
    """A message for a client that ended without an `error` line (crashed, killed, too
    old to know --json)."""
    last = ""
    for line in (stderr_text or "").splitlines():
        if line.strip():
            last = line.strip()
    if last.startswith("error: "):
        body = last[len("error: "):]
        code, _, message = body.partition(": ")
        if code.isupper():
            return describe_error({"code": code, "message": message}, server)
        return body
    if exit_code == 3:
        return describe_error({"code": "UNAVAILABLE"}, server)
    if exit_code is None or exit_code < 0:
        return "The Frisket client stopped unexpectedly{}.".format(": " + last if last else "")
    return "The Frisket client failed (exit code {}){}".format(exit_code, ": " + last if last else ".")


# --------------------------------------------------------------------------------------
# Selection -> protected-region mask

_INVERT = bytes(255 - i for i in range(256))


def protect_mask_from_selection(selection, mode):
    """An editor selection (8-bit, one byte per pixel, 0 = not selected, 255 = selected,
    in between = partly) to the protected-region mask the server takes (non-zero =
    protected, kept bit for bit).

    mode "protect": the selection is the protected region (bytes as they are).
    mode "change":  the selection is the region to change; everything else is protected
                    (255 - selection, so partly selected pixels are protected too).
    Returns None when nothing would be protected (no --protect at all)."""
    if mode not in SELECTION_MODES:
        raise ValueError("selection mode must be one of %s" % (SELECTION_MODES,))
    if selection is None:
        return None
    data = bytes(selection)
    if mode == "change":
        data = data.translate(_INVERT)
    if data.count(0) == len(data):
        return None
    return data


def mask_coverage(mask):
    """Share of protected (non-zero) pixels."""
    if not mask:
        return 0.0
    return 1.0 - mask.count(0) / float(len(mask))


def bgra_to_rgb(data, width, height, background=255):
    """Krita/Qt ARGB32 memory order (B, G, R, A per pixel, straight alpha) to RGB bytes,
    composited over a plain background where not opaque."""
    n = width * height
    data = bytes(data)
    if len(data) < 4 * n:
        raise ValueError("expected %d bytes of BGRA, got %d" % (4 * n, len(data)))
    data = data[:4 * n]
    out = bytearray(3 * n)
    out[0::3], out[1::3], out[2::3] = data[2::4], data[1::4], data[0::4]
    alpha = data[3::4]
    if alpha.count(255) != n:
        for i, a in enumerate(alpha):
            if a != 255:
                for c in range(3):
                    v = out[3 * i + c]
                    out[3 * i + c] = (v * a + background * (255 - a) + 127) // 255
    return bytes(out)


def rgba_to_rgb(data, width, height, background=255):
    """R, G, B, A bytes to RGB, composited over a plain background where not opaque."""
    data = bytes(data)
    n = width * height
    bgra = bytearray(4 * n)
    bgra[0::4], bgra[1::4], bgra[2::4], bgra[3::4] = data[2::4], data[1::4], data[0::4], data[3::4]
    return bgra_to_rgb(bytes(bgra), width, height, background)


def rgb_to_bgra(data, width, height):
    """RGB bytes to B, G, R, A (opaque): the pixel layout of an 8-bit RGBA Krita layer."""
    n = width * height
    data = bytes(data)
    out = bytearray(b"\xff" * (4 * n))
    out[0::4], out[1::4], out[2::4] = data[2::3], data[1::3], data[0::3]
    return bytes(out)


# --------------------------------------------------------------------------------------
# PNG (8-bit grey, RGB, RGBA, non-interlaced) and .npy (float32)

_PNG_SIG = b"\x89PNG\r\n\x1a\n"
_COLOR_TYPES = {1: 0, 3: 2, 4: 6, 2: 4}  # channels -> PNG colour type


def _chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(width, height, channels, data, level=6):
    """8-bit PNG bytes from row-major pixel bytes (channels 1, 2, 3 or 4)."""
    stride = width * channels
    data = bytes(data)
    if len(data) != stride * height:
        raise ValueError("expected %d bytes, got %d" % (stride * height, len(data)))
    raw = b"".join(b"\x00" + data[y * stride:(y + 1) * stride] for y in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, _COLOR_TYPES[channels], 0, 0, 0)
    return _PNG_SIG + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(raw, level)) + _chunk(b"IEND", b"")


def write_png(path, width, height, channels, data):
    with open(path, "wb") as f:
        f.write(encode_png(width, height, channels, data))
    return path


def decode_png(blob):
    """(width, height, channels, bytes) of an 8-bit, non-interlaced PNG (grey, grey+alpha,
    RGB, RGBA or palette, which is expanded to RGB/RGBA)."""
    if blob[:8] != _PNG_SIG:
        raise ValueError("not a PNG")
    pos, idat, palette, trns = 8, [], None, None
    width = height = depth = ctype = interlace = None
    while pos < len(blob):
        (length,) = struct.unpack(">I", blob[pos:pos + 4])
        kind = blob[pos + 4:pos + 8]
        body = blob[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            width, height, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", body)
        elif kind == b"PLTE":
            palette = body
        elif kind == b"tRNS":
            trns = body
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
    if depth != 8 or interlace:
        raise ValueError("only 8-bit non-interlaced PNGs are supported (depth %s, interlace %s)" % (depth, interlace))
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[ctype]
    raw = zlib.decompress(b"".join(idat))
    stride = width * channels
    out = bytearray(stride * height)
    prev = bytearray(stride)
    pos = 0
    for y in range(height):
        ftype = raw[pos]
        line = bytearray(raw[pos + 1:pos + 1 + stride])
        pos += 1 + stride
        if ftype == 1:
            for i in range(channels, stride):
                line[i] = (line[i] + line[i - channels]) & 0xFF
        elif ftype == 2:
            for i in range(stride):
                line[i] = (line[i] + prev[i]) & 0xFF
        elif ftype == 3:
            for i in range(stride):
                left = line[i - channels] if i >= channels else 0
                line[i] = (line[i] + ((left + prev[i]) >> 1)) & 0xFF
        elif ftype == 4:
            for i in range(stride):
                a = line[i - channels] if i >= channels else 0
                b = prev[i]
                c = prev[i - channels] if i >= channels else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if (pa <= pb and pa <= pc) else (b if pb <= pc else c)
                line[i] = (line[i] + pred) & 0xFF
        elif ftype != 0:
            raise ValueError("bad PNG filter type %d" % ftype)
        out[y * stride:(y + 1) * stride] = line
        prev = line
    if ctype == 3:
        has_alpha = trns is not None
        pix = bytearray()
        for idx in out:
            pix += palette[3 * idx:3 * idx + 3]
            if has_alpha:
                pix.append(trns[idx] if idx < len(trns) else 255)
        return width, height, 4 if has_alpha else 3, bytes(pix)
    return width, height, channels, bytes(out)


def read_png(path):
    with open(path, "rb") as f:
        return decode_png(f.read())


def png_size(path):
    """(width, height) from the PNG header, without decoding."""
    with open(path, "rb") as f:
        head = f.read(24)
    if head[:8] != _PNG_SIG:
        raise ValueError("%s is not a PNG" % path)
    return struct.unpack(">II", head[16:24])


def read_npy(path):
    """(shape, list of floats) of a little-endian float32/float64, C-order .npy file."""
    with open(path, "rb") as f:
        blob = f.read()
    if blob[:6] != b"\x93NUMPY":
        raise ValueError("%s is not a .npy file" % path)
    major = blob[6]
    if major == 1:
        (hlen,) = struct.unpack("<H", blob[8:10])
        start = 10
    else:
        (hlen,) = struct.unpack("<I", blob[8:12])
        start = 12
    header = blob[start:start + hlen].decode("latin1")
    import ast
    meta = ast.literal_eval(header)
    if meta.get("fortran_order"):
        raise ValueError("Fortran-order .npy is not supported")
    shape = tuple(int(x) for x in meta["shape"])
    descr = meta["descr"]
    fmt = {"<f4": "f", "<f8": "d"}.get(descr)
    if fmt is None:
        raise ValueError("unsupported .npy dtype %s" % descr)
    count = 1
    for s in shape:
        count *= s
    values = struct.unpack("<%d%s" % (count, fmt), blob[start + hlen:start + hlen + count * struct.calcsize(fmt)])
    return shape, list(values)


def npy_to_grey(path):
    """A mask or heatmap .npy ([h, w], [1, h, w], [c, h, w] or [1, c, h, w]; channels are
    averaged) as an 8-bit grey image normalised to 0..255: (width, height, bytes)."""
    shape, values = read_npy(path)
    dims = [d for d in shape]
    while len(dims) > 3 and dims[0] == 1:
        dims = dims[1:]
    if len(dims) == 2:
        c, h, w = 1, dims[0], dims[1]
    elif len(dims) == 3:
        c, h, w = dims
    else:
        raise ValueError("cannot show a tensor of shape %s as an image" % (shape,))
    plane = [0.0] * (h * w)
    for ch in range(c):
        base = ch * h * w
        for i in range(h * w):
            plane[i] += values[base + i]
    lo, hi = min(plane), max(plane)
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    return w, h, bytes(int(round((v - lo) * scale)) if scale else (255 if hi > 0 else 0) for v in plane)


# --------------------------------------------------------------------------------------
# Layer names


def short_prompt(prompt, limit=60):
    text = " ".join((prompt or "").split())
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "…"


def result_layer_name(prompt, seed):
    """`[Frisket] <prompt> (<seed>)`."""
    return "{} {} ({})".format(RESULT_PREFIX, short_prompt(prompt), seed)


def group_layer_name(prompt, seed):
    return "{} explain: {} ({})".format(RESULT_PREFIX, short_prompt(prompt, 40), seed)


def _t(e):
    t = e.get("timestep")
    if isinstance(t, (int, float)):
        return " t={:g}".format(t)
    return ""


def artifact_layer_name(kind, event):
    if kind == "mask":
        frac = event.get("reference_fraction")
        share = " ({:.0%} from the reference)".format(frac) if isinstance(frac, (int, float)) else ""
        return "mask step {}{}{}".format(event.get("step"), _t(event), share)
    if kind == "protected_mask":
        return "protected region step {}{}".format(event.get("step"), _t(event))
    if kind in ("heatmap", "subject_mask"):
        token = (event.get("token") or "").replace("</w>", "")
        what = "heatmap '{}'" if kind == "heatmap" else "where '{}' is"
        return (what + " (token {}) step {}{}").format(token, event.get("token_index"), event.get("step"), _t(event))
    if kind == "change_map":
        return "change map"
    return kind


# --------------------------------------------------------------------------------------
# A blocking runner (GIMP, tests). Krita runs the same arguments through a QProcess.


class JobRun(object):
    """Files of one job: a fresh temporary folder with reference.png, protect.png,
    out.png and dump/."""

    def __init__(self, workdir):
        self.workdir = workdir
        self.reference = os.path.join(workdir, "reference.png")
        self.protect = os.path.join(workdir, "protect.png")
        self.out = os.path.join(workdir, "result.png")
        self.dump_dir = os.path.join(workdir, "dump")

    def cleanup(self):
        shutil.rmtree(self.workdir, ignore_errors=True)


def prepare_job(workdir, width, height, rgb, selection, mode):
    """Writes reference.png (RGB bytes) and, when something is protected, protect.png
    (from the 8-bit selection, see protect_mask_from_selection). Returns (JobRun,
    protect_path or None)."""
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
    args = build_generate_args(opts, run.out, reference=run.reference, protect=protect, dump_dir=run.dump_dir,
                               job_id=job_id)
    state = JobState(job_id)
    try:
        proc = popen([client] + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except OSError as e:
        state.error = {"code": "CLIENT", "message": "could not start the Frisket client {}: {}".format(client, e)}
        return state
    buf = LineBuffer()
    import threading
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
