"""plugins/common/frisket_core/, the plugins' editor-independent core: unit tests (its
standard-library PNG codec included), plus its arguments checked against the real
`frisket` client."""

import json
import os
import stat
import subprocess
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import harness  # noqa: E402
from harness import core  # noqa: E402

# The example session of client/README.md ("JSON lines (--json), format version 1").
README_SESSION = """\
{"v":1,"event":"queued","job_id":"job-1-b802e056","position":0}
{"v":1,"event":"started","job_id":"job-1-b802e056","total_steps":3,"timesteps":[667.0,334.0,1.0],"seed":3,"width":64,"height":48}
{"v":1,"event":"latent","job_id":"job-1-b802e056","step":0,"timestep":667.0,"shape":[1,4,12,16],"dtype":"float32","path":"dump/latent_0.npy"}
{"v":1,"event":"step","job_id":"job-1-b802e056","index":0,"total":3,"timestep":667.0,"elapsed_seconds":0.05}
{"v":1,"event":"step","job_id":"job-1-b802e056","index":1,"total":3,"timestep":334.0,"elapsed_seconds":0.09}
{"v":1,"event":"preview","job_id":"job-1-b802e056","step":1,"timestep":334.0,"mime_type":"image/png","width":16,"height":12,"path":"dump/preview_1.png"}
{"v":1,"event":"heatmap","job_id":"job-1-b802e056","step":1,"timestep":334.0,"token_index":3,"token":"circle</w>","shape":[4,12,16],"subject_mask":"dump/heatmap_1_tok3_mask.png","path":"dump/heatmap_1_tok3.png","npy":"dump/heatmap_1_tok3.npy"}
{"v":1,"event":"mask","job_id":"job-1-b802e056","step":1,"timestep":334.0,"kind":"manipulation","shape":[1,1,12,16],"reference_fraction":0.25,"path":"dump/mask_1.png","npy":"dump/mask_1.npy"}
{"v":1,"event":"mask","job_id":"job-1-b802e056","step":1,"timestep":334.0,"kind":"protected","shape":[1,1,12,16],"reference_fraction":0.5,"npy":"dump/protected_mask_1.npy"}
{"v":1,"event":"step","job_id":"job-1-b802e056","index":2,"total":3,"timestep":1.0,"elapsed_seconds":0.13,"some_new_key":1}
{"v":1,"event":"something_new","job_id":"job-1-b802e056"}
{"v":1,"event":"result","job_id":"job-1-b802e056","seed":3,"mime_type":"image/png","width":64,"height":48,"path":"out.png","settings":{},"timings":{"total_seconds":0.2},"psnr_protected":"inf","dump_path":"dump/result.png","change_map":"dump/change_map.png","manifest":"dump/manifest.json"}
"""


class ClientDiscovery(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp()

    def exe(self, *parts):
        path = os.path.join(self.tmp, *parts)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write("#!/bin/sh\n")
        os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)
        return path

    def test_order_setting_env_plugin_path(self):
        setting = self.exe("setting", "frisket")
        env = self.exe("env", "frisket")
        plugin = self.exe("plugin", "frisket")
        on_path = self.exe("path", "frisket")
        path = os.path.dirname(on_path)
        environ = {"FRISKET_CLIENT": env, "PATH": path}
        self.assertEqual(core.find_client(setting, environ, os.path.dirname(plugin)), (setting, "setting"))
        self.assertEqual(core.find_client("", environ, os.path.dirname(plugin)), (env, "FRISKET_CLIENT"))
        self.assertEqual(core.find_client("", {"PATH": path}, os.path.dirname(plugin)), (plugin, "plugin folder"))
        self.assertEqual(core.find_client("", {"PATH": path}, os.path.join(self.tmp, "nothing")), (on_path, "PATH"))
        # a folder as the setting: the client inside it
        self.assertEqual(core.find_client(os.path.dirname(setting), {}, None), (setting, "setting"))
        # plugin_dir/bin/frisket
        bin_client = self.exe("p2", "bin", "frisket")
        self.assertEqual(
            core.find_client("", {"PATH": ""}, os.path.join(self.tmp, "p2")), (bin_client, "plugin folder")
        )

    def test_missing(self):
        with self.assertRaises(core.ClientNotFound) as e:
            core.find_client("/no/such/frisket", {"PATH": ""}, None)
        self.assertIn("/no/such/frisket", str(e.exception))
        with self.assertRaises(core.ClientNotFound) as e:
            core.find_client("", {"FRISKET_CLIENT": "/nope/frisket", "PATH": ""}, None)
        self.assertIn("$FRISKET_CLIENT", str(e.exception))
        with self.assertRaises(core.ClientNotFound) as e:
            core.find_client("", {"PATH": self.tmp}, None)
        self.assertIn("not found", str(e.exception))


class Arguments(unittest.TestCase):
    def opts(self, **kw):
        base = dict(
            server="http://127.0.0.1:1",
            model="sd1",
            prompt="a red circle",
            negative_prompt="blurry",
            subjects=["circle", "red", "circle", ""],
            strength=0.6,
            steps=8,
            seed=42,
            explain="fast",
            selection_mode="protect",
        )
        base.update(kw)
        return core.GenerateOptions(**base)

    def test_generate_args(self):
        args = core.build_generate_args(
            self.opts(), "out.png", reference="ref.png", protect="mask.png", dump_dir="dump", job_id="krita-1"
        )
        self.assertEqual(args[:2], ["generate", "--json"])
        pairs = dict(zip(args, args[1:]))
        self.assertEqual(pairs["--server"], "http://127.0.0.1:1")
        self.assertEqual(pairs["--model"], "sd1")
        self.assertEqual(pairs["--prompt"], "a red circle")
        self.assertEqual(pairs["--negative-prompt"], "blurry")
        self.assertEqual(pairs["--seed"], "42")
        self.assertEqual(pairs["--steps"], "8")
        self.assertEqual(pairs["--reference"], "ref.png")
        self.assertEqual(pairs["--strength"], "0.6")
        self.assertEqual(pairs["--protect"], "mask.png")
        self.assertEqual(pairs["--preview-every"], "1")
        self.assertEqual(pairs["--explain"], "fast")
        self.assertIn("--masks", args)
        self.assertIn("--heatmaps", args)
        self.assertEqual([args[i + 1] for i, a in enumerate(args) if a == "--subject"], ["circle", "red"])
        self.assertEqual(pairs["--dump-dir"], "dump")
        self.assertEqual(pairs["--job-id"], "krita-1")
        self.assertEqual(args[-2:], ["--out", "out.png"])

    def test_optional_parts(self):
        args = core.build_generate_args(
            self.opts(seed=None, explain="off", negative_prompt=""), "o.png", reference="r.png"
        )
        for flag in (
            "--seed",
            "--explain",
            "--masks",
            "--heatmaps",
            "--subject",
            "--protect",
            "--negative-prompt",
            "--dump-dir",
            "--job-id",
        ):
            self.assertNotIn(flag, args)
        self.assertNotIn("--seed", core.build_generate_args(self.opts(seed=-1), "o.png"))
        # no reference: no strength, no protect (the client requires --reference for them)
        args = core.build_generate_args(self.opts(), "o.png", protect="m.png")
        self.assertNotIn("--strength", args)
        self.assertNotIn("--protect", args)

    def test_validate(self):
        self.assertEqual(core.validate(self.opts()), [])
        problems = core.validate(self.opts(prompt=" ", model="", strength=1.5, steps=0, explain="maybe"))
        self.assertEqual(len(problems), 5, problems)
        models = [{"name": "sd1", "size_multiple": 4}]
        self.assertEqual(core.validate(self.opts(), models, (64, 48)), [])
        self.assertIn("multiples of 4", core.validate(self.opts(), models, (66, 48))[0])
        self.assertIn("no model named", core.validate(self.opts(model="x"), models)[0])

    def test_other_commands(self):
        self.assertEqual(core.build_models_args("S"), ["models", "--json", "--server", "S"])
        self.assertEqual(
            core.build_tokenize_args("S", "sd1", "a b"),
            ["tokenize", "a b", "--model", "sd1", "--json", "--server", "S"],
        )
        self.assertEqual(core.build_cancel_args("S", "j"), ["cancel", "j", "--json", "--server", "S"])

    def test_options_roundtrip(self):
        o = self.opts()
        self.assertEqual(core.GenerateOptions.from_dict(o.to_dict()).to_dict(), o.to_dict())


class EventStream(unittest.TestCase):
    def test_queue_position_eta_and_model_loading(self):
        state = core.JobState()
        state.apply({"v": 1, "event": "queued", "job_id": "j", "position": 2})
        self.assertEqual(state.status_text(), "Queued (2 ahead)")
        state.apply({"v": 1, "event": "queued", "job_id": "j", "position": 1, "estimated_start_seconds": 12.4})
        self.assertEqual(state.status_text(), "Queued (1 ahead, starts in about 12 s)")
        state.apply({"v": 1, "event": "queued", "job_id": "j", "position": 0, "estimated_start_seconds": 0.0})
        self.assertEqual(state.status_text(), "Starting…")
        state.apply({"v": 1, "event": "loading", "job_id": "j", "model": "sdxl"})
        self.assertEqual(state.status_text(), "Loading model sdxl…")
        state.apply({"v": 1, "event": "started", "job_id": "j", "total_steps": 4, "seed": 5})
        self.assertEqual(state.status_text(), "Step 0/4 (seed 5)")

    def test_readme_session(self):
        buf = core.LineBuffer()
        state = core.JobState()
        data = README_SESSION.encode()
        names = []
        for i in range(0, len(data), 7):  # arbitrary chunks, as a pipe delivers them
            for event in buf.feed(data[i : i + 7]):
                names.append(state.apply(event))
        names += [state.apply(e) for e in buf.flush()]
        self.assertEqual(names[0], "queued")
        self.assertEqual(names[-1], "result")
        self.assertEqual(state.job_id, "job-1-b802e056")
        self.assertEqual(state.seed, 3)
        self.assertEqual(state.total_steps, 3)
        self.assertEqual(state.steps_done, 3)
        self.assertEqual(len(state.previews), 1)
        self.assertTrue(state.finished)
        self.assertEqual(state.progress(), 1.0)
        self.assertEqual(state.status_text(), "Done: seed 3, 0.2 s.")
        kinds = [(k, p) for k, _n, p, _e in state.artifacts()]
        self.assertEqual(
            kinds,
            [
                ("mask", "dump/mask_1.png"),
                ("protected_mask", "dump/protected_mask_1.npy"),
                ("heatmap", "dump/heatmap_1_tok3.png"),
                ("subject_mask", "dump/heatmap_1_tok3_mask.png"),
                ("change_map", "dump/change_map.png"),
            ],
        )
        names = [n for _k, n, _p, _e in state.artifacts()]
        self.assertEqual(names[0], "mask step 1 t=334 (25% from the reference)")
        self.assertEqual(names[2], "heatmap 'circle' (token 3) step 1 t=334")
        self.assertEqual(names[3], "where 'circle' is (token 3) step 1 t=334")

    def test_noise_partial_and_errors(self):
        buf = core.LineBuffer()
        self.assertEqual(buf.feed(b'not json\n{"v":1,"ev'), [])
        self.assertEqual(buf.noise, ["not json"])
        events = buf.feed(b'ent":"error","code":"UNAVAILABLE","message":"x","exit_code":3}')
        self.assertEqual(events, [])
        events = buf.flush()
        state = core.JobState()
        state.apply(events[0])
        self.assertTrue(state.finished)
        self.assertFalse(state.cancelled)
        self.assertIn("No Frisket server answered", state.status_text())
        state = core.JobState()
        state.apply({"v": 1, "event": "error", "code": "CANCELLED", "message": "interrupted"})
        self.assertTrue(state.cancelled)
        with self.assertRaises(core.ProtocolError):
            core.JobState().apply({"v": 2, "event": "queued"})

    def test_messages(self):
        self.assertIn("busy", core.describe_error({"code": "RESOURCE_EXHAUSTED", "message": "queue full"}))
        self.assertEqual(
            core.describe_error({"code": "INVALID_ARGUMENT", "message": "bad size"}), "bad size (INVALID_ARGUMENT)"
        )
        limit = core.describe_error(
            {"code": "INVALID_ARGUMENT", "message": "steps 41 is more than this server's limit of 40 (max_steps)"}
        )
        self.assertTrue(limit.startswith("This job is over the server's limits: steps 41"), limit)
        self.assertIn("max_steps", limit)
        self.assertIn(
            "raise the strength",
            core.describe_error(
                {"code": "INVALID_ARGUMENT", "message": "manipulation timestep 780 is outside this job's schedule"}
            ),
        )
        self.assertIn("No Frisket server answered at S", core.describe_exit(3, "error: UNAVAILABLE: nothing at S", "S"))
        self.assertIn("exit code 7", core.describe_exit(7, ""))
        self.assertIn("stopped unexpectedly", core.describe_exit(None, "boom"))

    def test_single_line_commands(self):
        models = core.parse_models('{"v":1,"models":[{"name":"sd1","size_multiple":4}]}\n')
        self.assertEqual(models[0]["name"], "sd1")
        tokens = core.parse_tokens(
            json.dumps(
                {
                    "v": 1,
                    "tokens": [
                        {"index": 0, "word": ""},
                        {"index": 1, "word": "a"},
                        {"index": 2, "word": "red"},
                        {"index": 3, "word": "a"},
                        {"index": 4, "word": ""},
                    ],
                }
            )
        )
        self.assertEqual(core.subject_candidates(tokens), [("a", [1, 3]), ("red", [2])])
        with self.assertRaises(core.FrisketError) as e:
            core.parse_models('{"v":1,"event":"error","code":"UNAVAILABLE","message":"m","exit_code":3}')
        self.assertIn("No Frisket server", str(e.exception))
        with self.assertRaises(core.ProtocolError):
            core.parse_models("")


class Masks(unittest.TestCase):
    def test_protect_and_change(self):
        sel = bytes([0, 255, 128, 0])
        self.assertEqual(core.protect_mask_from_selection(sel, "protect"), sel)
        self.assertEqual(core.protect_mask_from_selection(sel, "change"), bytes([255, 0, 127, 255]))
        self.assertIsNone(core.protect_mask_from_selection(bytes(4), "protect"))
        self.assertIsNone(core.protect_mask_from_selection(b"\xff" * 4, "change"))
        self.assertIsNone(core.protect_mask_from_selection(None, "protect"))
        with self.assertRaises(ValueError):
            core.protect_mask_from_selection(sel, "sideways")
        self.assertEqual(core.mask_coverage(bytes([0, 1, 0, 9])), 0.5)

    def test_pixel_layouts(self):
        bgra = bytes([1, 2, 3, 255, 10, 20, 30, 0])
        self.assertEqual(core.bgra_to_rgb(bgra, 2, 1), bytes([3, 2, 1, 255, 255, 255]))
        self.assertEqual(core.rgb_to_bgra(bytes([3, 2, 1]), 1, 1), bytes([1, 2, 3, 255]))
        self.assertEqual(core.rgba_to_rgb(bytes([3, 2, 1, 255]), 1, 1), bytes([3, 2, 1]))
        half = core.bgra_to_rgb(bytes([0, 0, 0, 128]), 1, 1)
        self.assertEqual(half, bytes([127, 127, 127]))


class Files(unittest.TestCase):
    def test_png_roundtrip(self):
        with tempfile.TemporaryDirectory() as tmp:
            for channels in (1, 3, 4):
                data = bytes((i * 37 + channels) & 255 for i in range(5 * 3 * channels))
                path = core.write_png(os.path.join(tmp, "x%d.png" % channels), 5, 3, channels, data)
                self.assertEqual(core.read_png(path), (5, 3, channels, data))
                self.assertEqual(core.png_size(path), (5, 3))

    def test_png_filters_from_a_real_encoder(self):
        """A PNG written by the server's encoder (filtered rows) decodes to the same pixels as our own."""
        try:
            from PIL import Image  # the torch venv has Pillow
        except ImportError:
            self.skipTest("Pillow not available")
        with tempfile.TemporaryDirectory() as tmp:
            rgb = harness.known_image(40, 24)
            img = Image.frombytes("RGB", (40, 24), rgb)
            path = os.path.join(tmp, "pil.png")
            img.save(path, optimize=True)
            self.assertEqual(core.read_png(path), (40, 24, 3, rgb))

    def test_npy(self):
        sys.path.insert(0, HERE)
        from fake_frisket import write_npy

        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "m.npy")
            write_npy(path, [1, 2, 2, 3], [0.0, 1.0, 2.0, 3.0, 4.0, 5.0] * 2)
            shape, values = core.read_npy(path)
            self.assertEqual(shape, (1, 2, 2, 3))
            w, h, grey = core.npy_to_grey(path)
            self.assertEqual((w, h), (3, 2))
            self.assertEqual(grey, bytes([0, 51, 102, 153, 204, 255]))


class Names(unittest.TestCase):
    def test_layer_names(self):
        self.assertEqual(core.result_layer_name("a  red\ncircle", 42), "[Frisket] a red circle (42)")
        self.assertTrue(core.result_layer_name("x" * 200, 1).endswith("… (1)"))
        self.assertEqual(core.PREVIEW_LAYER_NAME, "[Frisket preview]")
        self.assertEqual(core.group_layer_name("p", 3), "[Frisket] explain: p (3)")
        self.assertEqual(core.artifact_layer_name("change_map", {}), "change map")


class RealClient(unittest.TestCase):
    """The arguments the plugins build are ones the real client accepts, and it answers in
    format version 1."""

    def setUp(self):
        if not os.access(harness.client_bin(), os.X_OK):
            self.fail("{} missing: run `make build`".format(harness.client_bin()))

    def run_client(self, args):
        return subprocess.run([harness.client_bin()] + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)

    def test_usage_accepted(self):
        """No server: the client gets as far as connecting (exit 3), so every flag parsed."""
        opts = core.GenerateOptions(
            server="http://127.0.0.1:9", model="sd1", prompt="p", subjects=["p"], seed=1, steps=2, explain="exact"
        )
        with tempfile.TemporaryDirectory() as tmp:
            ref = core.write_png(os.path.join(tmp, "r.png"), 8, 8, 3, bytes(192))
            mask = core.write_png(os.path.join(tmp, "m.png"), 8, 8, 1, bytes(64))
            args = core.build_generate_args(
                opts,
                os.path.join(tmp, "o.png"),
                reference=ref,
                protect=mask,
                dump_dir=os.path.join(tmp, "d"),
                job_id="x",
            )
            p = self.run_client(args)
        self.assertEqual(p.returncode, 3, p.stderr)
        state = core.JobState()
        for event in core.LineBuffer().feed(p.stdout):
            state.apply(event)
        self.assertEqual(state.error["code"], "UNAVAILABLE")

    def test_one_line_commands_against_a_server(self):
        server = harness.server()
        p = self.run_client(core.build_models_args(server.url))
        models = core.parse_models(p.stdout.decode())
        self.assertIn(harness.MODEL, [m["name"] for m in models])
        p = self.run_client(core.build_tokenize_args(server.url, harness.MODEL, "a red circle"))
        words = [w for w, _ in core.subject_candidates(core.parse_tokens(p.stdout.decode()))]
        self.assertEqual(words, ["a", "red", "circle"])
        p = self.run_client(core.build_cancel_args(server.url, "no-such-job"))
        self.assertEqual(p.returncode, 6)
        self.assertFalse(core.parse_single_line(p.stdout.decode())["found"])


if __name__ == "__main__":
    unittest.main()
