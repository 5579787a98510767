"""PNG files through GEGL, GIMP's own image library: pixel bytes to a file with
gegl:png-save (the job's reference, protected-region mask and the heatmaps the server sent
only as .npy). GIMP itself loads the result layers (Gimp.file_load_layer).

Needs GEGL's GObject introspection (GIMP 3 ships it) and Gegl.init() having run.
tests/plugins/test_gimp_png.py checks the pixels against the standard-library decoder."""

import os

import gi

gi.require_version("Gegl", "0.4")
from gi.repository import Gegl  # noqa: E402

# Babl formats with the byte layout of 8-bit grey, RGB and RGBA rows (gamma-encoded values,
# stored as they are).
BABL_FORMATS = {1: "Y' u8", 3: "R'G'B' u8", 4: "R'G'B'A u8"}


def write_png(path, width, height, channels, data):
    """Row-major 8-bit grey (channels 1), RGB (3) or RGBA (4) bytes to an 8-bit PNG file;
    returns the path (frisket_core.prepare_job's write_png)."""
    data = bytes(data)
    if len(data) != width * height * channels:
        raise ValueError("expected %d bytes, got %d" % (width * height * channels, len(data)))
    fmt = BABL_FORMATS[channels]
    # png-save reports a failure only as a warning on stderr: a missing file afterwards is it.
    if os.path.exists(path):
        os.remove(path)
    buffer = Gegl.Buffer.new(fmt, 0, 0, width, height)
    buffer.set(Gegl.Rectangle.new(0, 0, width, height), fmt, data)
    graph = Gegl.Node.new()
    source = graph.create_child("gegl:buffer-source")
    source.set_property("buffer", buffer)
    save = graph.create_child("gegl:png-save")
    save.set_property("path", path)
    save.set_property("bitdepth", 8)
    source.link(save)
    save.process()
    if not os.path.isfile(path):
        raise OSError("GEGL could not write {}".format(path))
    return path
