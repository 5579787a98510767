"""The GIMP plug-in's PNG encoder (frisket_gimp_png.py, GEGL's gegl:png-save) without GIMP:
its files decode, with the standard-library decoder, to the bytes it was given (8-bit grey,
RGB, RGBA), and a job whose files it writes keeps the protected pixels bit for bit (fake
client). It runs in a Python with GEGL's GObject introspection (Debian: python3-gi and
gir1.2-gegl-0.4, the system Python); without one the tests are skipped."""

import json
import os
import subprocess
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import harness  # noqa: E402
from harness import core  # noqa: E402

GIMP_DIR = os.path.join(harness.PLUGINS, "gimp", "frisket-gimp")
FAKE_CLIENT = os.path.join(HERE, "fake_frisket.py")
PROBE = "import gi; gi.require_version('Gegl', '0.4'); from gi.repository import Gegl; Gegl.init(None)"

# Runs in the GEGL Python: argv[1] the plug-in folder, argv[2] "files" or "job"; a JSON
# request on stdin, a JSON answer on stdout.
CHILD = """
import json, sys
sys.path.insert(0, sys.argv[1])
import gi
gi.require_version("Gegl", "0.4")
from gi.repository import Gegl
Gegl.init(None)
import frisket_gimp_job as job
import frisket_gimp_png
request = json.load(sys.stdin)
if sys.argv[2] == "files":
    for f in request:
        frisket_gimp_png.write_png(f["path"], f["width"], f["height"], f["channels"], bytes.fromhex(f["data"]))
    print(json.dumps("written"))
else:
    opts, _ = job.options_from_values(request["values"])
    outcome = job.generate_from_pixels(request["client"], opts, request["width"], request["height"],
                                       bytes.fromhex(request["pixels"]), 4, bytes.fromhex(request["selection"]),
                                       workdir=request["workdir"], timeout=60,
                                       write_png=frisket_gimp_png.write_png)
    print(json.dumps({"ok": outcome.ok, "message": outcome.message, "result": outcome.result.path,
                      "layers": [[s.kind, s.path] for s in outcome.layers]}))
"""


def gegl_python():
    """A Python that can import GEGL through GObject introspection, or None."""
    for exe in (sys.executable, "/usr/bin/python3"):
        if os.access(exe, os.X_OK):
            p = subprocess.run([exe, "-c", PROBE], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if p.returncode == 0:
                return exe
    return None


class GeglPng(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.python = gegl_python()
        if cls.python is None:
            raise unittest.SkipTest(
                "no Python with GEGL's GObject introspection (apt-get install python3-gi gir1.2-gegl-0.4)"
            )

    def child(self, mode, request):
        p = subprocess.run(
            [self.python, "-c", CHILD, GIMP_DIR, mode],
            input=json.dumps(request).encode(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            timeout=120,
        )
        self.assertEqual(p.returncode, 0, p.stderr.decode("utf-8", "replace"))
        return json.loads(p.stdout.decode().strip().splitlines()[-1])

    def test_pixels_come_back_exactly(self):
        rgb = harness.known_image(37, 23)
        grey = rgb[1::3]
        rgba = bytearray(37 * 23 * 4)
        rgba[0::4], rgba[1::4], rgba[2::4], rgba[3::4] = rgb[0::3], rgb[1::3], rgb[2::3], rgb[2::3]
        images = [(1, grey), (3, rgb), (4, bytes(rgba)), (1, bytes([0, 255]) * (37 * 23 // 2) + b"\x80")]
        with tempfile.TemporaryDirectory() as tmp:
            files = [
                {
                    "path": os.path.join(tmp, "%d.png" % i),
                    "width": 37,
                    "height": 23,
                    "channels": channels,
                    "data": data.hex(),
                }
                for i, (channels, data) in enumerate(images)
            ]
            self.child("files", files)
            for f, (channels, data) in zip(files, images):
                with self.subTest(channels=channels):
                    self.assertEqual(core.read_png(f["path"]), (37, 23, channels, data))

    def test_job_keeps_the_protected_pixels(self):
        """reference.png and protect.png from GEGL, read by the (fake) client with the standard
        library; the heatmap it sends only as .npy becomes a layer file GEGL writes."""
        w, h = harness.WIDTH, harness.HEIGHT
        rgb = harness.known_image(w, h)
        rgba = bytearray(w * h * 4)
        rgba[0::4], rgba[1::4], rgba[2::4], rgba[3::4] = rgb[0::3], rgb[1::3], rgb[2::3], b"\xff" * (w * h)
        selection = harness.rect_selection(w, h, 0, 0, w // 2, h)
        values = {
            "server": "http://127.0.0.1:9",
            "model": harness.MODEL,
            "prompt": "a red circle",
            "subjects": "red, circle",
            "steps": 4,
            "strength": 0.9,
            "seed": 3,
            "explain": "fast",
            "selection-mode": "protect",
            "client": "",
        }
        with tempfile.TemporaryDirectory() as tmp:
            answer = self.child(
                "job",
                {
                    "client": FAKE_CLIENT,
                    "values": values,
                    "width": w,
                    "height": h,
                    "pixels": bytes(rgba).hex(),
                    "selection": selection.hex(),
                    "workdir": os.path.join(tmp, "job"),
                },
            )
            self.assertTrue(answer["ok"], answer["message"])
            rw, rh, channels, pixels = core.read_png(answer["result"])
            self.assertEqual((rw, rh, channels), (w, h, 3))
            bad, outside, changed = harness.compare_protected(rgb, pixels, selection)
            self.assertEqual(bad, 0, "{} protected pixels changed".format(bad))
            self.assertEqual(changed, outside)
            heatmaps = [path for kind, path in answer["layers"] if kind == "heatmap"]
            self.assertEqual(len(heatmaps), 2, answer["layers"])  # the second came as .npy only
            gw, gh, grey = core.npy_to_grey(heatmaps[1][: -len(".png")] + ".npy")
            self.assertEqual(core.read_png(heatmaps[1]), (gw, gh, 1, grey))


if __name__ == "__main__":
    unittest.main()
