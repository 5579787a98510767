"""Finds the shared, editor-independent core (the frisket_core package).

Installed from the zip (`make plugin-krita`), it is this package's subpackage
frisket/frisket_core/. In a source checkout it is plugins/common/frisket_core/, two folders
up (symlinked installs are resolved)."""

import os
import sys

PLUGIN_DIR = os.path.dirname(os.path.realpath(__file__))

if os.path.isfile(os.path.join(PLUGIN_DIR, "frisket_core", "__init__.py")):
    from . import frisket_core as core  # noqa: F401  (the packaged copy)
else:
    _common = os.path.join(os.path.dirname(os.path.dirname(PLUGIN_DIR)), "common")
    if not os.path.isfile(os.path.join(_common, "frisket_core", "__init__.py")):
        raise ImportError("frisket_core is missing: install the plugin from the zip built by `make plugin-krita`")
    if _common not in sys.path:
        sys.path.insert(0, _common)
    import frisket_core as core  # noqa: F401
