#!/usr/bin/env python3
"""`make plugin-screenshot`: a screenshot of the Frisket docker in a real Krita under Xvfb.

Installs the plugin zip with Krita's own importer into a throw-away Krita profile
(XDG_CONFIG_HOME / XDG_DATA_HOME in a temporary folder), enables it and the helper plugin
tests/krita/screenshot_plugin (which opens the test image, fills the docker, runs one job
against a real frisket-server with the fixture models and grabs the window), runs
`xvfb-run krita`, and copies the picture to OUT.png.

usage: screenshot.py PLUGIN.zip OUT.png   (env FRISKET_SHOT_EXPLAIN=off|fast|exact)
"""

import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "plugins"))
import harness  # noqa: E402
from test_krita import krita_importer  # noqa: E402


def main(argv):
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    zip_path, out = os.path.abspath(argv[1]), os.path.abspath(argv[2])
    tmp = tempfile.mkdtemp(prefix="frisket-shot-")
    try:
        config, data = os.path.join(tmp, "config"), os.path.join(tmp, "data")
        resources = os.path.join(data, "krita")
        os.makedirs(config)
        os.makedirs(resources)
        krita_importer().PluginImporter(zip_path, resources, lambda p: True).import_all()
        helper = os.path.join(HERE, "screenshot_plugin")
        shutil.copy(os.path.join(helper, "frisket_screenshot.desktop"), os.path.join(resources, "pykrita"))
        shutil.copytree(
            os.path.join(helper, "frisket_screenshot"), os.path.join(resources, "pykrita", "frisket_screenshot")
        )
        with open(os.path.join(config, "kritarc"), "w") as f:
            f.write(
                "[python]\nenable_frisket=true\nenable_frisket_screenshot=true\n\n[General]\nshowSplashScreen=false\n"
            )
        server = harness.server()
        shot = os.path.join(tmp, "shot.png")
        env = harness.without_virtualenvs(os.environ)
        env.update(
            {
                "XDG_CONFIG_HOME": config,
                "XDG_DATA_HOME": data,
                "FRISKET_CLIENT": harness.client_bin(),
                "FRISKET_SHOT_OUT": shot,
                "FRISKET_SHOT_SERVER": server.url,
                "FRISKET_SHOT_HELPERS": os.path.join(os.path.dirname(HERE), "plugins"),
            }
        )
        env.pop("QT_QPA_PLATFORM", None)
        try:
            subprocess.run(
                ["xvfb-run", "-a", "-s", "-screen 0 1280x960x24", "krita", "--nosplash"],
                env=env,
                timeout=300,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            print("krita did not quit in time", file=sys.stderr)
        if os.path.exists(shot + ".json"):
            print(open(shot + ".json").read(), file=sys.stderr)
        if not os.path.exists(shot):
            print("no screenshot was taken", file=sys.stderr)
            return 1
        os.makedirs(os.path.dirname(out), exist_ok=True)
        shutil.copy(shot, out)
        print(out)
        return 0
    finally:
        harness.server().stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
