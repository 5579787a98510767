"""Krita document I/O: the visible image and the selection out, layers in, and PNG files
through Qt's codec (QImage)."""

from PyQt5.QtCore import QByteArray, Qt
from PyQt5.QtGui import QImage

from ._core import core

SRGB = "sRGB-elle-V2-srgbtrc.icc"
# The pixel bytes a job's PNGs hold (8-bit grey masks, RGB references) as QImage formats
# with the same byte layout.
PNG_FORMATS = {1: QImage.Format_Grayscale8, 3: QImage.Format_RGB888}


def is_rgba8(doc):
    return doc.colorModel() == "RGBA" and doc.colorDepth() == "U8"


def read_reference(doc):
    """The visible image (the projection of all visible layers) as (width, height, RGB
    bytes), transparent areas composited over white."""
    doc.refreshProjection()
    doc.waitForDone()
    w, h = doc.width(), doc.height()
    if is_rgba8(doc):
        # The projection's own pixels, no colour conversion: bit-exact with the layers.
        data = bytes(doc.pixelData(0, 0, w, h))
    else:
        img = doc.projection(0, 0, w, h).convertToFormat(QImage.Format_ARGB32)
        data = qimage_bytes(img)
    return w, h, core.bgra_to_rgb(data, w, h)


def read_selection(doc):
    """The selection as 8-bit bytes at the document's size (0 = not selected), or None."""
    sel = doc.selection()
    if sel is None:
        return None
    w, h = doc.width(), doc.height()
    data = bytes(sel.pixelData(0, 0, w, h))
    if len(data) != w * h:
        return None
    return data


def selection_summary(doc):
    """A short description of the selection (polled: Krita has no signal for it)."""
    sel = doc.selection() if doc is not None else None
    if sel is None or sel.width() <= 0 or sel.height() <= 0:
        return None
    return (sel.x(), sel.y(), sel.width(), sel.height())


def qimage_bytes(img):
    """The raw bytes of a QImage whose lines are not padded (32-bit formats)."""
    ptr = img.constBits()
    ptr.setsize(img.byteCount())
    return bytes(ptr)


def write_png(path, width, height, channels, data):
    """Row-major 8-bit grey (channels 1) or RGB (3) bytes to a PNG file with Qt's encoder;
    returns the path (core.prepare_job's write_png)."""
    data = bytes(data)
    if len(data) != width * height * channels:
        raise ValueError("expected %d bytes, got %d" % (width * height * channels, len(data)))
    # QImage reads `data` in place (lines of width * channels bytes); save() encodes it at once.
    img = QImage(data, width, height, width * channels, PNG_FORMATS[channels])
    if not img.save(path, "PNG"):
        raise core.FrisketError("Could not write {}.".format(path))
    return path


def load_image(path):
    """A PNG (or a mask/heatmap .npy, normalised to grey) as a QImage, or None."""
    if path.lower().endswith(".npy"):
        w, h, grey = core.npy_to_grey(path)
        img = QImage(grey, w, h, w, QImage.Format_Grayscale8)
        return img.copy()
    img = QImage(path)
    return None if img.isNull() else img


def to_bgra(img, width, height, smooth=True):
    """A QImage scaled to width x height, as B, G, R, A bytes (Krita's RGBA/U8 layout)."""
    if img.width() != width or img.height() != height:
        mode = Qt.SmoothTransformation if smooth else Qt.FastTransformation
        img = img.scaled(width, height, Qt.IgnoreAspectRatio, mode)
    img = img.convertToFormat(QImage.Format_ARGB32)
    return qimage_bytes(img)


def set_pixels(doc, node, img, smooth=True):
    """Replaces a paint layer's pixels with an image (scaled to the document)."""
    w, h = doc.width(), doc.height()
    data = to_bgra(img, w, h, smooth)
    locked = node.locked()
    if locked:
        node.setLocked(False)
    if not is_rgba8(doc):
        node.setColorSpace("RGBA", "U8", SRGB)
    node.setPixelData(QByteArray(data), 0, 0, w, h)
    if not is_rgba8(doc):
        node.setColorSpace(doc.colorModel(), doc.colorDepth(), doc.colorProfile())
    if locked:
        node.setLocked(True)


def top_of(parent):
    children = parent.childNodes()
    return children[-1] if children else None


def add_paint_layer(doc, name, parent=None, above=None, visible=True):
    """A new paint layer; on top of `parent` (the root by default) unless `above` is given."""
    parent = parent or doc.rootNode()
    node = doc.createNode(name, "paintlayer")
    parent.addChildNode(node, above if above is not None else top_of(parent))
    node.setVisible(visible)
    return node


def add_group_layer(doc, name, parent=None, above=None):
    parent = parent or doc.rootNode()
    group = doc.createGroupLayer(name)
    parent.addChildNode(group, above if above is not None else top_of(parent))
    return group


def find_nodes(doc, predicate, parent=None):
    out = []
    for node in (parent or doc.rootNode()).childNodes():
        if predicate(node):
            out.append(node)
        if node.childNodes():
            out.extend(find_nodes(doc, predicate, node))
    return out


def refresh(doc):
    doc.refreshProjection()
