#!/usr/bin/env python3
"""Builds the installable plugin archives (run by `make plugin-krita` / `make plugin-gimp`):

  krita OUT.zip   frisket.desktop, frisket.action, frisket/ (+ frisket/frisket_core/)
                  at the top level: what Krita's Tools > Scripts > Import Python Plugin
                  from File expects.
  gimp  OUT.zip   frisket-gimp/ (frisket-gimp.py, frisket_gimp_job.py, frisket_gimp_png.py,
                  frisket_core/): unzip into GIMP 3's plug-ins folder.

The shared core package (plugins/common/frisket_core/) is copied into each archive as a
folder, so an installed plugin needs nothing from this repository. Entries get a fixed timestamp, so the
same sources give the same archive.
"""

import os
import sys
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
CORE = os.path.join(HERE, "common", "frisket_core")
STAMP = (2024, 1, 1, 0, 0, 0)


def _files(folder):
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for name in sorted(filenames):
            if name.endswith((".pyc", ".pyo")) or name.startswith("."):
                continue
            yield os.path.join(dirpath, name)


def _add_dir(zf, arcname):
    """An explicit folder entry: Krita's importer looks for `frisket/` in the listing."""
    info = zipfile.ZipInfo(arcname.rstrip("/") + "/", STAMP)
    info.external_attr = (0o40755 << 16) | 0x10
    zf.writestr(info, b"")


def _add(zf, src, arcname, executable=False):
    info = zipfile.ZipInfo(arcname, STAMP)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = (0o755 if executable else 0o644) << 16
    with open(src, "rb") as f:
        zf.writestr(info, f.read())


def _add_core(zf, folder):
    """The core package as `folder`/frisket_core/."""
    prefix = folder + "/" + os.path.basename(CORE)
    _add_dir(zf, prefix)
    for path in _files(CORE):
        _add(zf, path, prefix + "/" + os.path.relpath(path, CORE).replace(os.sep, "/"))


def build_krita(out):
    src = os.path.join(HERE, "krita")
    with zipfile.ZipFile(out, "w") as zf:
        _add(zf, os.path.join(src, "frisket.desktop"), "frisket.desktop")
        _add(zf, os.path.join(src, "frisket.action"), "frisket.action")
        _add_dir(zf, "frisket")
        for path in _files(os.path.join(src, "frisket")):
            _add(zf, path, os.path.relpath(path, src).replace(os.sep, "/"))
        _add_core(zf, "frisket")


def build_gimp(out):
    src = os.path.join(HERE, "gimp", "frisket-gimp")
    with zipfile.ZipFile(out, "w") as zf:
        _add_dir(zf, "frisket-gimp")
        for path in _files(src):
            rel = os.path.relpath(path, os.path.dirname(src)).replace(os.sep, "/")
            _add(zf, path, rel, executable=path.endswith("frisket-gimp.py"))
        _add_core(zf, "frisket-gimp")


def main(argv):
    if len(argv) != 3 or argv[1] not in ("krita", "gimp"):
        print("usage: package.py krita|gimp OUT.zip", file=sys.stderr)
        return 2
    out = os.path.abspath(argv[2])
    os.makedirs(os.path.dirname(out), exist_ok=True)
    (build_krita if argv[1] == "krita" else build_gimp)(out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
