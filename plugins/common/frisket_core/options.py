"""What the user chose (GenerateOptions), its checks, and the `frisket` command lines built
from it."""

import os
import uuid

from .masks import SELECTION_MODES

DEFAULT_SERVER = "http://127.0.0.1:50051"
SERVER_ENV = "FRISKET_SERVER"
EXPLAIN_MODES = ("off", "fast", "exact")


def default_server(environ=None):
    environ = os.environ if environ is None else environ
    return (environ.get(SERVER_ENV) or "").strip() or DEFAULT_SERVER


class GenerateOptions(object):
    """What the user chose in the docker / dialog."""

    FIELDS = (
        "server",
        "model",
        "prompt",
        "negative_prompt",
        "subjects",
        "strength",
        "steps",
        "seed",
        "explain",
        "selection_mode",
        "guidance",
        "scheduler",
        "preview_every",
    )

    def __init__(
        self,
        server=DEFAULT_SERVER,
        model="",
        prompt="",
        negative_prompt="",
        subjects=(),
        strength=0.9,
        steps=20,
        seed=None,
        explain="fast",
        selection_mode="protect",
        guidance=None,
        scheduler=None,
        preview_every=1,
    ):
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
            problems.append(
                "The server has no model named {!r} (it has: {}).".format(
                    opts.model, ", ".join(m.get("name", "?") for m in models)
                )
            )
        elif image_size:
            mult = int(info.get("size_multiple") or 1)
            w, h = image_size
            if w % mult or h % mult:
                problems.append(
                    "The image is {}x{} but model {} needs a width and height that are multiples of {}: "
                    "crop or resize the canvas (e.g. to {}x{}).".format(
                        w, h, opts.model, mult, max(mult, w - w % mult), max(mult, h - h % mult)
                    )
                )
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
