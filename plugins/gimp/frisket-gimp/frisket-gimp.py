#!/usr/bin/env python3
"""Frisket for GIMP 3: Filters > Frisket > Generate...

Sends the active layer (the reference) and the selection (the protected region, or the
region to change) to a Frisket server through the bundled `frisket` client in JSON-lines
mode, then adds the result and, in a group, the Grad-SAM heatmaps, masks and the change map
as hidden layers. Everything that is not GIMP glue is in frisket_gimp_job.py and the
frisket_core package (tested without GIMP); the files the plug-in writes go through GEGL
(frisket_gimp_png.py), the ones it reads through GIMP's file loading.

GIMP 3 Python API names this file relies on. tests/plugins/test_gimp_api.py checks that
every Gimp.*, GimpUi.* and Gegl.* attribute used below is listed here, that every method
called on a GIMP object is listed, and that each listed name exists in GIMP 3.0's
GObject-introspection API.
GIMP_API_NAMES:
    Gimp.PlugIn
    Gimp.main
    Gimp.ImageProcedure.new
    Gimp.PDBProcType.PLUGIN
    Gimp.ProcedureSensitivityMask.DRAWABLE
    Gimp.RunMode.INTERACTIVE
    Gimp.RunMode.NONINTERACTIVE
    Gimp.PDBStatusType.SUCCESS
    Gimp.PDBStatusType.CANCEL
    Gimp.PDBStatusType.CALLING_ERROR
    Gimp.PDBStatusType.EXECUTION_ERROR
    Gimp.Choice.new
    Gimp.Selection.is_empty
    Gimp.GroupLayer.new
    Gimp.file_load_layer
    Gimp.progress_init
    Gimp.progress_update
    Gimp.progress_set_text
    Gimp.displays_flush
    Gimp.message
    GimpUi.init
    GimpUi.ProcedureDialog.new
    Gegl.init
    Gegl.Rectangle.new
    Gegl.AbyssPolicy.NONE
GIMP_METHODS:
    Gimp.Procedure.set_image_types
    Gimp.Procedure.set_sensitivity_mask
    Gimp.Procedure.set_menu_label
    Gimp.Procedure.add_menu_path
    Gimp.Procedure.set_documentation
    Gimp.Procedure.set_attribution
    Gimp.Procedure.add_string_argument
    Gimp.Procedure.add_int_argument
    Gimp.Procedure.add_double_argument
    Gimp.Procedure.add_choice_argument
    Gimp.Procedure.new_return_values
    Gimp.Choice.add
    Gimp.ProcedureConfig.get_property
    GimpUi.ProcedureDialog.fill
    GimpUi.ProcedureDialog.run
    GimpUi.ProcedureDialog.destroy
    Gimp.Drawable.get_width
    Gimp.Drawable.get_height
    Gimp.Drawable.get_offsets
    Gimp.Drawable.get_buffer
    Gimp.Drawable.has_alpha
    Gimp.Image.get_selection
    Gimp.Image.insert_layer
    Gimp.Image.get_item_position
    Gimp.Image.undo_group_start
    Gimp.Image.undo_group_end
    Gimp.Item.get_parent
    Gimp.Item.set_name
    Gimp.Item.set_visible
    Gimp.Layer.set_offsets
    Gimp.Layer.scale
    Gegl.Buffer.get
END
"""

import os
import sys

import gi

gi.require_version("Gimp", "3.0")
from gi.repository import Gimp  # noqa: E402

gi.require_version("GimpUi", "3.0")
from gi.repository import GimpUi  # noqa: E402

gi.require_version("Gegl", "0.4")
from gi.repository import Gegl, Gio, GLib, GObject  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.realpath(__file__)))
import frisket_gimp_job as job  # noqa: E402
import frisket_gimp_png  # noqa: E402

core = job.core


def _error(procedure, status, message):
    return procedure.new_return_values(status, GLib.Error(message))


def _add_arguments(procedure):
    flags = GObject.ParamFlags.READWRITE
    for arg in job.ARGUMENTS:
        if arg.kind == "string":
            procedure.add_string_argument(arg.name, arg.nick, arg.blurb, arg.default, flags)
        elif arg.kind == "int":
            procedure.add_int_argument(arg.name, arg.nick, arg.blurb, arg.minimum, arg.maximum, arg.default, flags)
        elif arg.kind == "double":
            procedure.add_double_argument(arg.name, arg.nick, arg.blurb, arg.minimum, arg.maximum, arg.default, flags)
        elif arg.kind == "choice":
            choice = Gimp.Choice.new()
            for i, (nick, label) in enumerate(arg.choices):
                choice.add(nick, i, label, "")
            procedure.add_choice_argument(arg.name, arg.nick, arg.blurb, choice, arg.default, flags)


def _load_layer(image, spec, parent, position, x, y, width, height):
    layer = Gimp.file_load_layer(Gimp.RunMode.NONINTERACTIVE, image, Gio.File.new_for_path(spec.path))
    layer.set_name(spec.name)
    image.insert_layer(layer, parent, position)
    if layer.get_width() != width or layer.get_height() != height:
        layer.scale(width, height, False)
    layer.set_offsets(x, y)
    layer.set_visible(spec.visible)
    return layer


class FrisketPlugIn(Gimp.PlugIn):
    def do_query_procedures(self):
        return [job.PROCEDURE]

    def do_set_i18n(self, name):
        return False

    def do_create_procedure(self, name):
        procedure = Gimp.ImageProcedure.new(self, name, Gimp.PDBProcType.PLUGIN, self.run, None)
        procedure.set_image_types("RGB*")
        procedure.set_sensitivity_mask(Gimp.ProcedureSensitivityMask.DRAWABLE)
        procedure.set_menu_label("_Generate…")
        procedure.add_menu_path("<Image>/Filters/Frisket")
        procedure.set_documentation(
            "Change the layer to follow a prompt with Frisket, keeping the selection",
            "Sends the layer and the selection to a Frisket server (through the frisket client) and adds "
            "the result, plus Grad-SAM heatmaps, masks and the change map in a group of hidden layers.",
            name,
        )
        procedure.set_attribution("Frisket", "Frisket", "2026")
        _add_arguments(procedure)
        return procedure

    def run(self, procedure, run_mode, image, drawables, config, data):
        if len(drawables) != 1:
            return _error(procedure, Gimp.PDBStatusType.CALLING_ERROR, "Frisket works on exactly one layer.")
        drawable = drawables[0]
        if run_mode == Gimp.RunMode.INTERACTIVE:
            GimpUi.init(job.PROCEDURE)
            dialog = GimpUi.ProcedureDialog.new(procedure, config, "Frisket")
            dialog.fill(None)
            accepted = dialog.run()
            dialog.destroy()
            if not accepted:
                return procedure.new_return_values(Gimp.PDBStatusType.CANCEL, GLib.Error())
        values = {arg.name: config.get_property(arg.name) for arg in job.ARGUMENTS}
        opts, client_setting = job.options_from_values(values)
        try:
            client, _source = core.find_client(client_setting, os.environ, job.PLUGIN_DIR)
        except core.FrisketError as e:
            return _error(procedure, Gimp.PDBStatusType.EXECUTION_ERROR, str(e))

        Gegl.init(None)
        width, height = drawable.get_width(), drawable.get_height()
        _ok, x, y = drawable.get_offsets()
        channels = 4 if drawable.has_alpha() else 3
        fmt = "R'G'B'A u8" if channels == 4 else "R'G'B' u8"
        pixels = bytes(
            drawable.get_buffer().get(Gegl.Rectangle.new(0, 0, width, height), 1.0, fmt, Gegl.AbyssPolicy.NONE)
        )
        selection = None
        if not Gimp.Selection.is_empty(image):
            mask = image.get_selection()
            selection = bytes(
                mask.get_buffer().get(Gegl.Rectangle.new(x, y, width, height), 1.0, "Y u8", Gegl.AbyssPolicy.NONE)
            )

        Gimp.progress_init("Frisket: starting")

        def on_event(state, _event):
            Gimp.progress_update(state.progress())
            Gimp.progress_set_text("Frisket: " + state.status_text())

        try:
            outcome = job.generate_from_pixels(
                client, opts, width, height, pixels, channels, selection, on_event, write_png=frisket_gimp_png.write_png
            )
        except (core.FrisketError, OSError) as e:
            return _error(procedure, Gimp.PDBStatusType.EXECUTION_ERROR, str(e))
        if not outcome.ok:
            outcome.cleanup()
            Gimp.message("Frisket: " + outcome.message)
            return _error(procedure, Gimp.PDBStatusType.EXECUTION_ERROR, outcome.message)

        image.undo_group_start()
        try:
            parent = drawable.get_parent()
            position = image.get_item_position(drawable)
            _load_layer(image, outcome.result, parent, position, x, y, width, height)
            if outcome.layers:
                group = Gimp.GroupLayer.new(image, outcome.group_name)
                image.insert_layer(group, parent, position)
                for spec in outcome.layers:
                    _load_layer(image, spec, group, 0, x, y, width, height)
        finally:
            image.undo_group_end()
            outcome.cleanup()
        Gimp.displays_flush()
        return procedure.new_return_values(Gimp.PDBStatusType.SUCCESS, GLib.Error())


Gimp.main(FrisketPlugIn.__gtype__, sys.argv)
