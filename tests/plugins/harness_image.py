"""The known test image (plain Python: also imported inside Krita by tests/krita/)."""


def known_image(width, height):
    """A known RGB image: gradients with a dark disc and stripes, so every pixel differs
    from its neighbours somewhere."""
    data = bytearray(width * height * 3)
    cx, cy, r2 = width * 0.6, height * 0.5, (min(width, height) * 0.3) ** 2
    for y in range(height):
        for x in range(width):
            i = 3 * (y * width + x)
            red = (x * 255) // max(1, width - 1)
            green = (y * 255) // max(1, height - 1)
            blue = ((x ^ y) * 7) & 0xFF
            if (x - cx) ** 2 + (y - cy) ** 2 < r2:
                red, green, blue = red // 4, green // 4, 200
            if (x // 4) % 4 == 0:
                green = 255 - green
            data[i : i + 3] = bytes((red, green, blue))
    return bytes(data)
