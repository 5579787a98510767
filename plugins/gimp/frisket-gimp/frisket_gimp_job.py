"""The GIMP plug-in's logic that needs no GIMP: the dialog's arguments, options from the
dialog's values, and one job from pixels to layer files (tests/plugins/test_gimp_core.py
runs it against a real server). frisket-gimp.py is only the GIMP glue around it.

The shared core (request building, the JSON-lines event stream, mask conversion) is the
frisket_core package: next to this file once installed, plugins/common/ in a checkout."""

import os
import shutil
import sys
import tempfile

PROCEDURE = "plug-in-frisket-generate"
PLUGIN_DIR = os.path.dirname(os.path.realpath(__file__))

if os.path.isfile(os.path.join(PLUGIN_DIR, "frisket_core", "__init__.py")):
    _CORE_PARENT = PLUGIN_DIR
else:  # a source checkout: plugins/gimp/frisket-gimp/ -> plugins/common/
    _CORE_PARENT = os.path.join(os.path.dirname(os.path.dirname(PLUGIN_DIR)), "common")
if _CORE_PARENT not in sys.path:
    sys.path.insert(0, _CORE_PARENT)
import frisket_core as core  # noqa: E402


class Arg(object):
    """One procedure argument (and dialog field)."""

    def __init__(self, name, kind, nick, blurb, default, minimum=None, maximum=None, choices=None):
        self.name, self.kind, self.nick, self.blurb, self.default = name, kind, nick, blurb, default
        self.minimum, self.maximum, self.choices = minimum, maximum, choices or []


ARGUMENTS = [
    Arg("server", "string", "_Server", "Frisket server address (http://host:port)", core.default_server()),
    Arg("model", "string", "_Model", "A model name from `frisket models`", "sd1"),
    Arg("prompt", "string", "_Prompt", "What the image should show", ""),
    Arg("negative-prompt", "string", "_Negative prompt", "What to steer away from", ""),
    Arg(
        "subjects",
        "string",
        "S_ubject words",
        "Comma-separated words of the prompt for Grad-SAM (see `frisket tokenize`)",
        "",
    ),
    Arg(
        "strength",
        "double",
        "S_trength",
        "Share of the schedule that runs, in (0, 1]; Grad-SAM needs 0.85 or more at 20 steps",
        0.9,
        0.01,
        1.0,
    ),
    Arg("steps", "int", "St_eps", "Denoising steps", 20, 1, 500),
    Arg("seed", "int", "See_d", "Seed (-1: the server draws one)", -1, -1, 2147483647),
    Arg(
        "explain",
        "choice",
        "E_xplain",
        "Grad-SAM: off, fast or exact; adds heatmap and mask layers",
        "fast",
        choices=[("off", "Off"), ("fast", "Fast"), ("exact", "Exact")],
    ),
    Arg(
        "selection-mode",
        "choice",
        "Se_lection",
        "What the selection means",
        "protect",
        choices=[("protect", "Selection is protected (kept exactly)"), ("change", "Selection is the region to change")],
    ),
    Arg(
        "client",
        "string",
        "_Client path",
        "The frisket client (empty: $FRISKET_CLIENT, next to the plug-in, then the PATH)",
        "",
    ),
]


def subjects_from_text(text):
    return core.unique(w.strip() for w in (text or "").replace(";", ",").split(",") if w.strip())


def options_from_values(values):
    """(GenerateOptions, client setting) from the dialog's values {argument name: value}."""
    seed = int(values.get("seed", -1))
    opts = core.GenerateOptions(
        server=(values.get("server") or "").strip() or core.DEFAULT_SERVER,
        model=(values.get("model") or "").strip(),
        prompt=(values.get("prompt") or "").strip(),
        negative_prompt=(values.get("negative-prompt") or "").strip(),
        subjects=subjects_from_text(values.get("subjects")),
        strength=float(values.get("strength", 0.9)),
        steps=int(values.get("steps", 20)),
        seed=None if seed < 0 else seed,
        explain=values.get("explain") or "fast",
        selection_mode=values.get("selection-mode") or "protect",
        preview_every=None,
    )
    return opts, (values.get("client") or "").strip()


class LayerSpec(object):
    """A layer to add: an 8-bit PNG, its name, whether it starts visible."""

    def __init__(self, kind, name, path, visible):
        self.kind, self.name, self.path, self.visible = kind, name, path, visible

    def __repr__(self):
        return "LayerSpec(%r, %r, %r, %r)" % (self.kind, self.name, self.path, self.visible)


class Outcome(object):
    def __init__(self, state, workdir):
        self.state = state
        self.workdir = workdir
        self.result = None  # LayerSpec
        self.group_name = None
        self.layers = []  # LayerSpecs for the group, hidden
        self.message = ""

    @property
    def ok(self):
        return self.result is not None

    def cleanup(self):
        shutil.rmtree(self.workdir, ignore_errors=True)


def generate_from_pixels(
    client,
    opts,
    width,
    height,
    pixels,
    channels,
    selection=None,
    on_event=None,
    workdir=None,
    timeout=None,
    *,
    write_png,
):
    """Runs one job on a drawable's pixels (RGB or RGBA bytes, `channels` 3 or 4) and its
    selection (8-bit, one byte per pixel at the drawable's size, or None); returns an
    Outcome whose `result` and `layers` name PNG files in its workdir. `write_png` encodes
    the files the plug-in writes (frisket_gimp_png.write_png in GIMP). Problems with the
    options raise core.FrisketError; a failed job comes back with ok False and a message."""
    problems = core.validate(opts, image_size=(width, height))
    if problems:
        raise core.FrisketError("\n".join(problems))
    if channels == 4:
        rgb = core.rgba_to_rgb(pixels, width, height)
    elif channels == 3:
        rgb = bytes(pixels)
    else:
        raise core.FrisketError("Only RGB images are supported (convert with Image > Mode > RGB).")
    mask = core.protect_mask_from_selection(selection, opts.selection_mode) if selection is not None else None
    if mask is not None and mask.count(0) == 0:
        raise core.FrisketError(
            "The whole layer would be protected, so nothing can change: select less, or "
            "choose 'Selection is the region to change'."
        )
    workdir = workdir or tempfile.mkdtemp(prefix="frisket-gimp-")
    run, protect = core.prepare_job(workdir, width, height, rgb, selection, opts.selection_mode, write_png=write_png)
    state = core.run_job(
        client, opts, run, protect=protect, job_id=core.new_job_id("gimp"), on_event=on_event, timeout=timeout
    )
    outcome = Outcome(state, workdir)
    if state.result is None:
        outcome.message = core.describe_error(state.error or {"code": "CLIENT", "message": "no result"}, opts.server)
        return outcome
    path = state.result.get("dump_path") or state.result.get("path")
    outcome.result = LayerSpec("result", core.result_layer_name(opts.prompt, state.seed), path, True)
    outcome.group_name = core.group_layer_name(opts.prompt, state.seed)
    for kind, name, apath, _event in state.artifacts():
        if apath.endswith(".npy"):  # no PNG from the server: show the raw map, normalised
            w, h, grey = core.npy_to_grey(apath)
            apath = write_png(apath[:-4] + ".png", w, h, 1, grey)
        outcome.layers.append(LayerSpec(kind, name, apath, False))
    outcome.message = state.status_text()
    return outcome
