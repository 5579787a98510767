"""PNG (8-bit grey, grey+alpha, RGB, RGBA, non-interlaced) and .npy (float32/float64) files in
the standard library alone."""

import ast
import struct
import zlib

_PNG_SIG = b"\x89PNG\r\n\x1a\n"
_COLOR_TYPES = {1: 0, 3: 2, 4: 6, 2: 4}  # channels -> PNG colour type


def _chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(width, height, channels, data, level=6):
    """8-bit PNG bytes from row-major pixel bytes (channels 1, 2, 3 or 4)."""
    stride = width * channels
    data = bytes(data)
    if len(data) != stride * height:
        raise ValueError("expected %d bytes, got %d" % (stride * height, len(data)))
    raw = b"".join(b"\x00" + data[y * stride : (y + 1) * stride] for y in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, _COLOR_TYPES[channels], 0, 0, 0)
    return _PNG_SIG + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(raw, level)) + _chunk(b"IEND", b"")


def write_png(path, width, height, channels, data):
    with open(path, "wb") as f:
        f.write(encode_png(width, height, channels, data))
    return path


def decode_png(blob):
    """(width, height, channels, bytes) of an 8-bit, non-interlaced PNG (grey, grey+alpha,
    RGB, RGBA or palette, which is expanded to RGB/RGBA)."""
    if blob[:8] != _PNG_SIG:
        raise ValueError("not a PNG")
    pos, idat, palette, trns = 8, [], None, None
    width = height = depth = ctype = interlace = None
    while pos < len(blob):
        (length,) = struct.unpack(">I", blob[pos : pos + 4])
        kind = blob[pos + 4 : pos + 8]
        body = blob[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            width, height, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", body)
        elif kind == b"PLTE":
            palette = body
        elif kind == b"tRNS":
            trns = body
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
    if depth != 8 or interlace:
        raise ValueError("only 8-bit non-interlaced PNGs are supported (depth %s, interlace %s)" % (depth, interlace))
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[ctype]
    raw = zlib.decompress(b"".join(idat))
    stride = width * channels
    out = bytearray(stride * height)
    prev = bytearray(stride)
    pos = 0
    for y in range(height):
        ftype = raw[pos]
        line = bytearray(raw[pos + 1 : pos + 1 + stride])
        pos += 1 + stride
        if ftype == 1:
            for i in range(channels, stride):
                line[i] = (line[i] + line[i - channels]) & 0xFF
        elif ftype == 2:
            for i in range(stride):
                line[i] = (line[i] + prev[i]) & 0xFF
        elif ftype == 3:
            for i in range(stride):
                left = line[i - channels] if i >= channels else 0
                line[i] = (line[i] + ((left + prev[i]) >> 1)) & 0xFF
        elif ftype == 4:
            for i in range(stride):
                a = line[i - channels] if i >= channels else 0
                b = prev[i]
                c = prev[i - channels] if i >= channels else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if (pa <= pb and pa <= pc) else (b if pb <= pc else c)
                line[i] = (line[i] + pred) & 0xFF
        elif ftype != 0:
            raise ValueError("bad PNG filter type %d" % ftype)
        out[y * stride : (y + 1) * stride] = line
        prev = line
    if ctype == 3:
        has_alpha = trns is not None
        pix = bytearray()
        for idx in out:
            pix += palette[3 * idx : 3 * idx + 3]
            if has_alpha:
                pix.append(trns[idx] if idx < len(trns) else 255)
        return width, height, 4 if has_alpha else 3, bytes(pix)
    return width, height, channels, bytes(out)


def read_png(path):
    with open(path, "rb") as f:
        return decode_png(f.read())


def png_size(path):
    """(width, height) from the PNG header, without decoding."""
    with open(path, "rb") as f:
        head = f.read(24)
    if head[:8] != _PNG_SIG:
        raise ValueError("%s is not a PNG" % path)
    return struct.unpack(">II", head[16:24])


def read_npy(path):
    """(shape, list of floats) of a little-endian float32/float64, C-order .npy file."""
    with open(path, "rb") as f:
        blob = f.read()
    if blob[:6] != b"\x93NUMPY":
        raise ValueError("%s is not a .npy file" % path)
    major = blob[6]
    if major == 1:
        (hlen,) = struct.unpack("<H", blob[8:10])
        start = 10
    else:
        (hlen,) = struct.unpack("<I", blob[8:12])
        start = 12
    header = blob[start : start + hlen].decode("latin1")
    meta = ast.literal_eval(header)
    if meta.get("fortran_order"):
        raise ValueError("Fortran-order .npy is not supported")
    shape = tuple(int(x) for x in meta["shape"])
    descr = meta["descr"]
    fmt = {"<f4": "f", "<f8": "d"}.get(descr)
    if fmt is None:
        raise ValueError("unsupported .npy dtype %s" % descr)
    count = 1
    for s in shape:
        count *= s
    values = struct.unpack("<%d%s" % (count, fmt), blob[start + hlen : start + hlen + count * struct.calcsize(fmt)])
    return shape, list(values)


def npy_to_grey(path):
    """A mask or heatmap .npy ([h, w], [1, h, w], [c, h, w] or [1, c, h, w]; channels are
    averaged) as an 8-bit grey image normalised to 0..255: (width, height, bytes)."""
    shape, values = read_npy(path)
    dims = [d for d in shape]
    while len(dims) > 3 and dims[0] == 1:
        dims = dims[1:]
    if len(dims) == 2:
        c, h, w = 1, dims[0], dims[1]
    elif len(dims) == 3:
        c, h, w = dims
    else:
        raise ValueError("cannot show a tensor of shape %s as an image" % (shape,))
    plane = [0.0] * (h * w)
    for ch in range(c):
        base = ch * h * w
        for i in range(h * w):
            plane[i] += values[base + i]
    lo, hi = min(plane), max(plane)
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    return w, h, bytes(int(round((v - lo) * scale)) if scale else (255 if hi > 0 else 0) for v in plane)
