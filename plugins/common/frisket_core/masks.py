"""Editor selection -> protected-region mask."""

# What the editor's selection means: the region to keep bit for bit, or the region to change
# (everything else is kept).
SELECTION_MODES = ("protect", "change")

_INVERT = bytes(255 - i for i in range(256))


def protect_mask_from_selection(selection, mode):
    """An editor selection (8-bit, one byte per pixel, 0 = not selected, 255 = selected,
    in between = partly) to the protected-region mask the server takes (non-zero =
    protected, kept bit for bit).

    mode "protect": the selection is the protected region (bytes as they are).
    mode "change":  the selection is the region to change; everything else is protected
                    (255 - selection, so partly selected pixels are protected too).
    Returns None when nothing would be protected (no --protect at all)."""
    if mode not in SELECTION_MODES:
        raise ValueError("selection mode must be one of %s" % (SELECTION_MODES,))
    if selection is None:
        return None
    data = bytes(selection)
    if mode == "change":
        data = data.translate(_INVERT)
    if data.count(0) == len(data):
        return None
    return data


def mask_coverage(mask):
    """Share of protected (non-zero) pixels."""
    if not mask:
        return 0.0
    return 1.0 - mask.count(0) / float(len(mask))
