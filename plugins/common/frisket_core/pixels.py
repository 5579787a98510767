"""Pixel layouts: the editors' B, G, R, A and R, G, B, A bytes to and from RGB."""


def bgra_to_rgb(data, width, height, background=255):
    """Krita/Qt ARGB32 memory order (B, G, R, A per pixel, straight alpha) to RGB bytes,
    composited over a plain background where not opaque."""
    n = width * height
    data = bytes(data)
    if len(data) < 4 * n:
        raise ValueError("expected %d bytes of BGRA, got %d" % (4 * n, len(data)))
    data = data[: 4 * n]
    out = bytearray(3 * n)
    out[0::3], out[1::3], out[2::3] = data[2::4], data[1::4], data[0::4]
    alpha = data[3::4]
    if alpha.count(255) != n:
        for i, a in enumerate(alpha):
            if a != 255:
                for c in range(3):
                    v = out[3 * i + c]
                    out[3 * i + c] = (v * a + background * (255 - a) + 127) // 255
    return bytes(out)


def rgba_to_rgb(data, width, height, background=255):
    """R, G, B, A bytes to RGB, composited over a plain background where not opaque."""
    data = bytes(data)
    n = width * height
    bgra = bytearray(4 * n)
    bgra[0::4], bgra[1::4], bgra[2::4], bgra[3::4] = data[2::4], data[1::4], data[0::4], data[3::4]
    return bgra_to_rgb(bytes(bgra), width, height, background)


def rgb_to_bgra(data, width, height):
    """RGB bytes to B, G, R, A (opaque): the pixel layout of an 8-bit RGBA Krita layer."""
    n = width * height
    data = bytes(data)
    out = bytearray(b"\xff" * (4 * n))
    out[0::4], out[1::4], out[2::4] = data[2::3], data[1::3], data[0::3]
    return bytes(out)
