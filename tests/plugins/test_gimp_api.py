"""The GIMP plug-in's GIMP-facing file, without GIMP (GIMP 3 is not packaged for this Debian):

* it compiles;
* every `Gimp.*`, `GimpUi.*` and `Gegl.*` attribute it uses is listed in its docstring
  (GIMP_API_NAMES), and every method it calls on a GIMP object is listed (GIMP_METHODS);
* every listed name exists in GIMP 3.0's GObject-introspection API: GIMP3_API below,
  written from GIMP 3.0's libgimp / libgimpui / GEGL 0.4 introspection data (checked
  against libgimp's sources and GIMP 3.0's own Python plug-ins), so a typo in the
  plug-in or in its list fails here.
"""

import ast
import os
import py_compile
import re
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import harness  # noqa: E402

GLUE = os.path.join(harness.PLUGINS, "gimp", "frisket-gimp", "frisket-gimp.py")
MODULES = ("Gimp", "GimpUi", "Gegl")

# GIMP 3.0 API names (Python spelling: namespace.Class.method / namespace.function /
# namespace.Enum.VALUE). Not exhaustive: the names a plug-in like this one may use.
GIMP3_API = {
    # plug-in and procedures
    "Gimp.PlugIn",
    "Gimp.main",
    "Gimp.quit",
    "Gimp.Procedure",
    "Gimp.ImageProcedure",
    "Gimp.ImageProcedure.new",
    "Gimp.Procedure.new",
    "Gimp.ProcedureConfig",
    "Gimp.ProcedureConfig.get_property",
    "Gimp.ProcedureConfig.set_property",
    "Gimp.ProcedureConfig.get_choice_id",
    "Gimp.Procedure.set_image_types",
    "Gimp.Procedure.set_sensitivity_mask",
    "Gimp.Procedure.set_menu_label",
    "Gimp.Procedure.add_menu_path",
    "Gimp.Procedure.set_documentation",
    "Gimp.Procedure.set_attribution",
    "Gimp.Procedure.set_icon_name",
    "Gimp.Procedure.add_string_argument",
    "Gimp.Procedure.add_int_argument",
    "Gimp.Procedure.add_double_argument",
    "Gimp.Procedure.add_boolean_argument",
    "Gimp.Procedure.add_choice_argument",
    "Gimp.Procedure.add_file_argument",
    "Gimp.Procedure.add_color_argument",
    "Gimp.Procedure.new_return_values",
    "Gimp.Procedure.create_config",
    "Gimp.Procedure.run",
    "Gimp.PDBProcType.PLUGIN",
    "Gimp.PDBProcType.INTERNAL",
    "Gimp.PDBProcType.PERSISTENT",
    "Gimp.PDBProcType.TEMPORARY",
    "Gimp.ProcedureSensitivityMask.DRAWABLE",
    "Gimp.ProcedureSensitivityMask.DRAWABLES",
    "Gimp.ProcedureSensitivityMask.NO_DRAWABLES",
    "Gimp.ProcedureSensitivityMask.NO_IMAGE",
    "Gimp.ProcedureSensitivityMask.ALWAYS",
    "Gimp.RunMode.INTERACTIVE",
    "Gimp.RunMode.NONINTERACTIVE",
    "Gimp.RunMode.WITH_LAST_VALS",
    "Gimp.PDBStatusType.SUCCESS",
    "Gimp.PDBStatusType.CANCEL",
    "Gimp.PDBStatusType.CALLING_ERROR",
    "Gimp.PDBStatusType.EXECUTION_ERROR",
    "Gimp.PDBStatusType.PASS_THROUGH",
    "Gimp.Choice",
    "Gimp.Choice.new",
    "Gimp.Choice.add",
    # images, items, drawables, layers
    "Gimp.Image.get_selection",
    "Gimp.Image.insert_layer",
    "Gimp.Image.get_item_position",
    "Gimp.Image.undo_group_start",
    "Gimp.Image.undo_group_end",
    "Gimp.Image.get_width",
    "Gimp.Image.get_height",
    "Gimp.Image.get_layers",
    "Gimp.Image.get_selected_layers",
    "Gimp.Image.get_selected_drawables",
    "Gimp.Image.remove_layer",
    "Gimp.Image.get_base_type",
    "Gimp.Image.new",
    "Gimp.Image.delete",
    "Gimp.Item.get_parent",
    "Gimp.Item.set_name",
    "Gimp.Item.get_name",
    "Gimp.Item.set_visible",
    "Gimp.Item.get_visible",
    "Gimp.Item.set_lock_content",
    "Gimp.Drawable.get_width",
    "Gimp.Drawable.get_height",
    "Gimp.Drawable.get_offsets",
    "Gimp.Drawable.get_buffer",
    "Gimp.Drawable.get_shadow_buffer",
    "Gimp.Drawable.has_alpha",
    "Gimp.Drawable.get_bpp",
    "Gimp.Drawable.update",
    "Gimp.Drawable.merge_shadow",
    "Gimp.Drawable.fill",
    "Gimp.Layer.new",
    "Gimp.Layer.set_offsets",
    "Gimp.Layer.scale",
    "Gimp.Layer.set_opacity",
    "Gimp.Layer.add_mask",
    "Gimp.Layer.create_mask",
    "Gimp.GroupLayer",
    "Gimp.GroupLayer.new",
    "Gimp.Selection",
    "Gimp.Selection.is_empty",
    "Gimp.Selection.bounds",
    "Gimp.Selection.none",
    "Gimp.ImageType.RGB_IMAGE",
    "Gimp.ImageType.RGBA_IMAGE",
    "Gimp.LayerMode.NORMAL",
    "Gimp.ImageBaseType.RGB",
    "Gimp.FillType.TRANSPARENT",
    # files
    "Gimp.file_load",
    "Gimp.file_load_layer",
    "Gimp.file_load_layers",
    "Gimp.file_save",
    # progress, messages, display
    "Gimp.progress_init",
    "Gimp.progress_update",
    "Gimp.progress_set_text",
    "Gimp.progress_end",
    "Gimp.progress_pulse",
    "Gimp.displays_flush",
    "Gimp.message",
    "Gimp.context_push",
    "Gimp.context_pop",
    # GimpUi
    "GimpUi.init",
    "GimpUi.ProcedureDialog",
    "GimpUi.ProcedureDialog.new",
    "GimpUi.ProcedureDialog.fill",
    "GimpUi.ProcedureDialog.run",
    "GimpUi.ProcedureDialog.destroy",
    "GimpUi.ProcedureDialog.fill_frame",
    "GimpUi.ProcedureDialog.get_widget",
    # GEGL 0.4
    "Gegl.init",
    "Gegl.Rectangle",
    "Gegl.Rectangle.new",
    "Gegl.Buffer.get",
    "Gegl.Buffer.set",
    "Gegl.Buffer.flush",
    "Gegl.Buffer.get_extent",
    "Gegl.AbyssPolicy.NONE",
    "Gegl.AbyssPolicy.CLAMP",
    "Gegl.AbyssPolicy.LOOP",
    "Gegl.AbyssPolicy.BLACK",
    "Gegl.AbyssPolicy.WHITE",
}

# Methods called on plain Python values in the glue (not GIMP objects).
PYTHON_METHODS = {
    "append",
    "join",
    "get",
    "strip",
    "format",
    "items",
    "cleanup",
    "status_text",
    "progress",
    "require_version",
    "insert",
    "realpath",
    "dirname",
}


def listed_names(source, header):
    m = re.search(r"^{}:\n(.*?)^(?:[A-Z_]+:|END)$".format(header), source, re.S | re.M)
    assert m, "the docstring has no {} list".format(header)
    return [line.strip() for line in m.group(1).splitlines() if line.strip()]


def dotted(node):
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


class GimpGlue(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        with open(GLUE, encoding="utf-8") as f:
            cls.source = f.read()
        cls.tree = ast.parse(cls.source, GLUE)
        cls.api_names = listed_names(cls.source, "GIMP_API_NAMES")
        cls.methods = listed_names(cls.source, "GIMP_METHODS")

    def test_compiles(self):
        with tempfile.TemporaryDirectory() as tmp:
            py_compile.compile(GLUE, cfile=os.path.join(tmp, "glue.pyc"), doraise=True)
            for name in ("frisket_gimp_job.py", "frisket_gimp_png.py"):
                py_compile.compile(
                    os.path.join(os.path.dirname(GLUE), name), cfile=os.path.join(tmp, name + "c"), doraise=True
                )

    def used_module_attributes(self):
        """Longest Gimp.* / GimpUi.* / Gegl.* chains (Gimp.X.y, not Gimp.X as well)."""
        used = set()
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Attribute):
                name = dotted(node)
                if name and name.split(".")[0] in MODULES:
                    used.add(name)
        return {n for n in used if not any(o != n and o.startswith(n + ".") for o in used)}

    def test_every_module_attribute_is_listed(self):
        used = self.used_module_attributes()
        self.assertTrue(used, "found no Gimp/GimpUi/Gegl attributes at all")
        missing = sorted(used - set(self.api_names))
        self.assertEqual(missing, [], "used but not listed in GIMP_API_NAMES")
        unused = sorted(set(self.api_names) - used - {n.rsplit(".", 1)[0] for n in used})
        self.assertEqual(unused, [], "listed in GIMP_API_NAMES but not used")

    def test_every_method_on_gimp_objects_is_listed(self):
        method_names = {m.rsplit(".", 1)[1] for m in self.methods}
        local_modules = {"os", "sys", "gi", "job", "core", "GLib", "GObject", "Gio", "self", "super"} | set(MODULES)
        unknown = set()
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                receiver = node.func.value
                root = dotted(receiver)
                if root and root.split(".")[0] in local_modules:
                    continue
                name = node.func.attr
                if name not in method_names and name not in PYTHON_METHODS:
                    unknown.add(name)
        self.assertEqual(sorted(unknown), [], "methods called on GIMP objects but not in GIMP_METHODS")

    def test_listed_names_exist_in_gimp3(self):
        for name in self.api_names + self.methods:
            with self.subTest(name=name):
                self.assertIn(name, GIMP3_API, "not a GIMP 3.0 API name (typo?)")

    def test_registration(self):
        """Filters > Frisket > Generate..., an image procedure on one drawable, with the docker's options."""
        self.assertIn('"<Image>/Filters/Frisket"', self.source)
        self.assertIn('set_menu_label("_Generate…")', self.source)
        self.assertIn("Gimp.main(FrisketPlugIn.__gtype__, sys.argv)", self.source)
        sys.path.insert(0, os.path.dirname(GLUE))
        import frisket_gimp_job as job

        names = [a.name for a in job.ARGUMENTS]
        for wanted in (
            "server",
            "model",
            "prompt",
            "negative-prompt",
            "subjects",
            "strength",
            "steps",
            "seed",
            "explain",
            "selection-mode",
            "client",
        ):
            self.assertIn(wanted, names)
        for arg in job.ARGUMENTS:
            self.assertRegex(arg.name, r"^[a-z][a-z0-9-]*$", "GIMP argument names are lower-case with dashes")


if __name__ == "__main__":
    unittest.main()
