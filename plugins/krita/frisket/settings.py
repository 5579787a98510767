"""The plugin's settings, kept in kritarc ([frisket] group)."""

import os

from krita import Krita

from ._core import core

GROUP = "frisket"

DEFAULTS = {
    "server": None,  # filled from $FRISKET_SERVER or the client's default
    "client_path": "",
    "model": "",
    "prompt": "",
    "negative_prompt": "",
    "strength": "0.9",
    "steps": "20",
    "seed": "-1",
    "explain": "fast",
    "selection_mode": "protect",
}


def read(key):
    default = DEFAULTS.get(key)
    if key == "server" and not default:
        default = core.default_server()
    value = Krita.instance().readSetting(GROUP, key, default if default is not None else "")
    return value if value is not None else ""


def write(key, value):
    Krita.instance().writeSetting(GROUP, key, "" if value is None else str(value))


def find_client():
    """(path, source) of the `frisket` client: setting, $FRISKET_CLIENT, next to the plugin, PATH."""
    from ._core import PLUGIN_DIR

    return core.find_client(setting=read("client_path"), environ=os.environ, plugin_dir=PLUGIN_DIR)
