"""Finds the shared, editor-independent core (frisket_core.py).

Installed from the zip (`make plugin-krita`), it sits in this package. In a source checkout
it is plugins/common/frisket_core.py, two folders up (symlinked installs are resolved)."""
import os
import sys

try:
    from . import frisket_core as core  # noqa: F401  (the packaged copy)
except ImportError:
    _here = os.path.dirname(os.path.realpath(__file__))
    _common = os.path.join(os.path.dirname(os.path.dirname(_here)), "common")
    if not os.path.isfile(os.path.join(_common, "frisket_core.py")):
        raise ImportError("frisket_core.py is missing: install the plugin from the zip built by `make plugin-krita`")
    if _common not in sys.path:
        sys.path.insert(0, _common)
    import frisket_core as core  # noqa: F401

PLUGIN_DIR = os.path.dirname(os.path.realpath(__file__))
