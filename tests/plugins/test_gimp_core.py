"""The GIMP plug-in's core (frisket_gimp_job.py + the frisket_core package) without GIMP,
against a real frisket-server on loopback: the drawable's pixels and a selection in, the
result and the heatmap / mask / change-map layers out. The files are written with the
standard-library PNG encoder (GIMP's is GEGL's: tests/plugins/test_gimp_png.py)."""

import os
import sys
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import harness  # noqa: E402
from harness import core  # noqa: E402

sys.path.insert(0, os.path.join(harness.PLUGINS, "gimp", "frisket-gimp"))
import frisket_gimp_job as job  # noqa: E402

W, H = harness.WIDTH, harness.HEIGHT
FAKE_CLIENT = os.path.join(HERE, "fake_frisket.py")


def values(**kw):
    """The dialog's values, as GIMP's ProcedureConfig would give them."""
    v = {a.name: a.default for a in job.ARGUMENTS}
    v.update(
        {
            "model": harness.MODEL,
            "prompt": "a red circle on the left",
            "negative-prompt": "blurry",
            "steps": 4,
            "strength": 0.7,
            "seed": 21,
            "explain": "off",
            "selection-mode": "protect",
        }
    )
    v.update(kw)
    return v


class GimpCore(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.server = harness.server()
        cls.rgb = harness.known_image(W, H)
        # RGBA as GEGL's "R'G'B'A u8" hands it over (opaque)
        rgba = bytearray(W * H * 4)
        rgba[0::4], rgba[1::4], rgba[2::4] = cls.rgb[0::3], cls.rgb[1::3], cls.rgb[2::3]
        rgba[3::4] = b"\xff" * (W * H)
        cls.rgba = bytes(rgba)
        cls.half = (W // 2) // 4 * 4

    def run_job(self, client=None, selection=None, **kw):
        opts, client_setting = job.options_from_values(values(server=self.server.url, **kw))
        self.assertEqual(client_setting, "")
        events = []
        outcome = job.generate_from_pixels(
            client or harness.client_bin(),
            opts,
            W,
            H,
            self.rgba,
            4,
            selection,
            on_event=lambda state, event: events.append(event.get("event")),
            timeout=300,
            write_png=core.write_png,
        )
        self.addCleanup(outcome.cleanup)
        return opts, outcome, events

    def check_result(self, opts, outcome, protected=None):
        self.assertTrue(outcome.ok, outcome.message)
        self.assertEqual(outcome.result.name, core.result_layer_name(opts.prompt, opts.seed))
        self.assertTrue(outcome.result.visible)
        w, h, channels, pixels = core.read_png(outcome.result.path)
        self.assertEqual((w, h), (W, H))
        rgb = pixels if channels == 3 else core.rgba_to_rgb(pixels, w, h)
        if protected is not None:
            bad, outside, changed = harness.compare_protected(self.rgb, rgb, protected)
            self.assertEqual(bad, 0, "{} protected pixels changed".format(bad))
            self.assertGreater(changed, outside // 4, "too few pixels changed outside the protected region")
        else:
            bad, outside, changed = harness.compare_protected(self.rgb, rgb, bytes(W * H))
            self.assertGreater(changed, outside // 4)
        self.assertEqual(outcome.group_name, core.group_layer_name(opts.prompt, opts.seed))
        for spec in outcome.layers:
            self.assertFalse(spec.visible, spec)
            self.assertTrue(spec.path.endswith(".png") and os.path.isfile(spec.path), spec)
        return [spec.kind for spec in outcome.layers]

    # -- passes with today's server ------------------------------------------------------
    def test_img2img_without_selection(self):
        opts, outcome, events = self.run_job()
        kinds = self.check_result(opts, outcome)
        self.assertEqual(kinds, ["change_map"])
        self.assertEqual(events[0], "queued")
        self.assertEqual(events[-1], "result")
        self.assertIn("step", events)

    def test_errors_are_messages(self):
        opts, client_setting = job.options_from_values(values(server="http://127.0.0.1:9"))
        outcome = job.generate_from_pixels(harness.client_bin(), opts, W, H, self.rgba, 4, write_png=core.write_png)
        self.addCleanup(outcome.cleanup)
        self.assertFalse(outcome.ok)
        self.assertIn("No Frisket server answered at http://127.0.0.1:9", outcome.message)
        opts, _ = job.options_from_values(values(server=self.server.url, model="no-such-model"))
        outcome = job.generate_from_pixels(harness.client_bin(), opts, W, H, self.rgba, 4, write_png=core.write_png)
        self.addCleanup(outcome.cleanup)
        self.assertFalse(outcome.ok)
        self.assertIn("no-such-model", outcome.message)
        with self.assertRaises(core.FrisketError):
            job.generate_from_pixels(
                harness.client_bin(),
                job.options_from_values(values(prompt=""))[0],
                W,
                H,
                self.rgba,
                4,
                write_png=core.write_png,
            )
        with self.assertRaises(core.FrisketError):  # everything protected
            job.generate_from_pixels(
                harness.client_bin(),
                job.options_from_values(values())[0],
                W,
                H,
                self.rgba,
                4,
                b"\xff" * (W * H),
                write_png=core.write_png,
            )

    def test_a_job_over_the_server_limits_is_a_message_and_never_sent(self):
        """A server whose max_side is below the drawable: the client refuses the job before
        sending it; the plug-in's message names the limit; the server's log has no job."""
        if not self.server.log_path:
            self.skipTest("external server: cannot start a limited one")
        limited = harness.Server(["--max-side", str(W // 2)])
        self.addCleanup(limited.stop)
        opts, _ = job.options_from_values(values(server=limited.url))
        outcome = job.generate_from_pixels(harness.client_bin(), opts, W, H, self.rgba, 4, write_png=core.write_png)
        self.addCleanup(outcome.cleanup)
        self.assertFalse(outcome.ok)
        self.assertIn("over the server's limits", outcome.message)
        self.assertIn("{}\u00d7{} pixels".format(W, H), outcome.message)
        self.assertIn("(max_side)", outcome.message)
        log = limited.log()
        self.assertNotIn("job queued", log)
        self.assertNotIn("request refused", log)

    def test_contract_selection_in_result_and_heatmaps_out(self):
        """The plug-in's half against the documented JSON-lines format (fake client)."""
        sel = harness.rect_selection(W, H, 0, 0, self.half, H)
        opts, outcome, events = self.run_job(client=FAKE_CLIENT, selection=sel, explain="fast", subjects="red, circle")
        kinds = self.check_result(opts, outcome, protected=sel)
        self.assertEqual(kinds, ["mask", "protected_mask", "heatmap", "subject_mask", "heatmap", "change_map"])
        self.assertIn("heatmap", events)

    # -- need the server's protected regions and Grad-SAM -------------------------------
    def test_selection_in_result_and_heatmaps_out(self):
        """--protect and --explain fast against the real server."""
        sel = harness.rect_selection(W, H, 0, 0, self.half, H)
        # Grad-SAM manipulates at t = 780, 520, 320: the schedule must reach them (strength 0.9).
        opts, outcome, events = self.run_job(selection=sel, explain="fast", subjects="circle", strength=0.9, steps=10)
        kinds = self.check_result(opts, outcome, protected=sel)
        self.assertIn("heatmap", kinds)
        self.assertIn("subject_mask", kinds)
        self.assertIn("mask", kinds)
        self.assertIn("change_map", kinds)

    def test_selection_is_the_region_to_change(self):
        """--protect (inverted selection) against the real server."""
        sel = harness.rect_selection(W, H, 16, 8, W - 16, H - 8)
        opts, outcome, _ = self.run_job(selection=sel, **{"selection-mode": "change"})
        self.check_result(opts, outcome, protected=bytes(0 if v else 255 for v in sel))


if __name__ == "__main__":
    unittest.main()
