"""The installable archives (`make plugin-krita`, `make plugin-gimp`) and the Krita
package's load-time behaviour, without an editor."""

import configparser
import importlib.util
import os
import py_compile
import subprocess
import sys
import tempfile
import types
import unittest
import xml.etree.ElementTree as ET
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import harness  # noqa: E402

spec = importlib.util.spec_from_file_location("frisket_package", os.path.join(harness.PLUGINS, "package.py"))
package = importlib.util.module_from_spec(spec)
spec.loader.exec_module(package)


CORE = os.path.join(harness.PLUGINS, "common", "frisket_core")


def source_core_modules():
    return sorted(n for n in os.listdir(CORE) if n.endswith(".py"))


def core_modules(names, prefix):
    """The core package's files in an archive, relative to its folder."""
    return sorted(n[len(prefix) :] for n in names if n.startswith(prefix) and n != prefix)


class KritaZip(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.zip = os.path.join(self.tmp.name, "frisket-krita.zip")
        package.build_krita(self.zip)

    def tearDown(self):
        self.tmp.cleanup()

    def test_layout(self):
        names = zipfile.ZipFile(self.zip).namelist()
        for wanted in (
            "frisket.desktop",
            "frisket.action",
            "frisket/",
            "frisket/__init__.py",
            "frisket/docker.py",
            "frisket/controller.py",
            "frisket/Manual.html",
            "frisket/frisket_core/",
        ):
            self.assertIn(wanted, names)
        self.assertEqual(core_modules(names, "frisket/frisket_core/"), source_core_modules())
        self.assertFalse([n for n in names if n.endswith(".pyc") or "__pycache__" in n])

    def test_installed_plugin_uses_its_packaged_core(self):
        """Unzipped, `frisket._core` imports frisket/frisket_core/, not plugins/common/ (the
        package's __init__.py, which needs Krita, is left out)."""
        out = os.path.join(self.tmp.name, "pykrita")
        zipfile.ZipFile(self.zip).extractall(out)
        code = (
            "import os, sys, types; package = types.ModuleType('frisket'); "
            "package.__path__ = [os.path.join(sys.argv[1], 'frisket')]; sys.modules['frisket'] = package; "
            "import frisket._core as c; print(c.core.__file__); print(c.core.__name__)"
        )
        p = subprocess.run([sys.executable, "-c", code, out], stdout=subprocess.PIPE, cwd=self.tmp.name, check=True)
        core_file, name = p.stdout.decode().split()
        self.assertEqual(core_file, os.path.join(out, "frisket", "frisket_core", "__init__.py"))
        self.assertEqual(name, "frisket.frisket_core")

    def test_desktop_and_action(self):
        z = zipfile.ZipFile(self.zip)
        desktop = configparser.ConfigParser()
        desktop.read_string(z.read("frisket.desktop").decode())
        entry = desktop["Desktop Entry"]
        self.assertEqual(entry["X-KDE-Library"], "frisket")
        self.assertEqual(entry["ServiceTypes"], "Krita/PythonPlugin")
        self.assertEqual(entry["Name"], "Frisket")
        actions = ET.fromstring(z.read("frisket.action"))
        names = [a.get("name") for a in actions.iter("Action")]
        self.assertEqual(names, ["frisket_generate", "frisket_cancel"])
        source = z.read("frisket/extension.py").decode()
        for name in names:
            self.assertIn('"{}"'.format(name), source, "the extension creates every action of frisket.action")

    def test_reproducible(self):
        other = os.path.join(self.tmp.name, "again.zip")
        package.build_krita(other)
        with open(self.zip, "rb") as a, open(other, "rb") as b:
            self.assertEqual(a.read(), b.read())

    def test_sources_compile(self):
        with tempfile.TemporaryDirectory() as out:
            for name in sorted(os.listdir(os.path.join(harness.PLUGINS, "krita", "frisket"))):
                if name.endswith(".py"):
                    py_compile.compile(
                        os.path.join(harness.PLUGINS, "krita", "frisket", name),
                        cfile=os.path.join(out, name + "c"),
                        doraise=True,
                    )


class KritaVersions(unittest.TestCase):
    """__init__.py registers the docker and the extension on Krita 5, and nothing (with a
    message) on Krita 6."""

    def load(self, version):
        calls = []

        class App(object):
            def version(self):
                return version

            def addDockWidgetFactory(self, factory):
                calls.append("docker")

            def addExtension(self, ext):
                calls.append("extension")

        app = App()
        krita = types.ModuleType("krita")
        krita.Krita = types.SimpleNamespace(instance=lambda: app)
        saved = {k: sys.modules.get(k) for k in ("krita",)}
        sys.modules["krita"] = krita
        try:
            spec = importlib.util.spec_from_file_location(
                "frisket_under_test",
                os.path.join(harness.PLUGINS, "krita", "frisket", "__init__.py"),
                submodule_search_locations=[],
            )
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        finally:
            for k, v in saved.items():
                if v is None:
                    sys.modules.pop(k, None)
                else:
                    sys.modules[k] = v
        return module, calls

    def test_krita6_is_refused(self):
        import contextlib
        import io

        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            module, calls = self.load("6.0.0")
        self.assertEqual(calls, [])
        self.assertIn("supports Krita 5.x", err.getvalue())
        self.assertEqual(module.krita_major_version(), 6)


class GimpZip(unittest.TestCase):
    def test_layout_and_packaged_core(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "frisket-gimp.zip")
            package.build_gimp(path)
            z = zipfile.ZipFile(path)
            names = z.namelist()
            for wanted in (
                "frisket-gimp/",
                "frisket-gimp/frisket-gimp.py",
                "frisket-gimp/frisket_gimp_job.py",
                "frisket-gimp/frisket_gimp_png.py",
                "frisket-gimp/frisket_core/",
            ):
                self.assertIn(wanted, names)
            self.assertEqual(core_modules(names, "frisket-gimp/frisket_core/"), source_core_modules())
            mode = z.getinfo("frisket-gimp/frisket-gimp.py").external_attr >> 16
            self.assertTrue(mode & 0o111, "GIMP runs the plug-in file: it must be executable")
            out = os.path.join(tmp, "plug-ins")
            z.extractall(out)
            code = "import sys; sys.path.insert(0, sys.argv[1]); import frisket_gimp_job as j; print(j.core.__file__)"
            p = subprocess.run(
                [sys.executable, "-c", code, os.path.join(out, "frisket-gimp")],
                stdout=subprocess.PIPE,
                cwd=tmp,
                check=True,
            )
            self.assertTrue(p.stdout.decode().strip().startswith(out), p.stdout)


if __name__ == "__main__":
    unittest.main()
