"""Helpers shared by the DICOMweb integration tests: multipart parsing (two independent ways),
the stored file of an instance, DCMTK decompression, and a small PNG decoder / JPEG header
reader (python3-pil is not installed on the project's machines)."""
import json
import os
import re
import struct
import subprocess
import tempfile
import zlib

import pydicom


def url(ds, suffix=""):
    return (f"/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
            f"/instances/{ds.SOPInstanceUID}{suffix}")


def parse_multipart(body):
    """(part type, part bytes) list, the way cornerstone's extractMultipart reads a response."""
    lines = body.split(b"\r\n")
    boundary = next(l for l in lines if l.startswith(b"--"))
    parts = []
    pos = body.index(boundary) + len(boundary) + 2
    while True:
        hdr_end = body.index(b"\r\n\r\n", pos)
        headers = body[pos:hdr_end].split(b"\r\n")
        ctype = next(h[len(b"Content-Type:"):].strip().decode() for h in headers
                     if h.startswith(b"Content-Type:"))
        nxt = body.index(boundary, hdr_end + 4)
        parts.append((ctype, body[hdr_end + 4:nxt - 2]))
        if body[nxt + len(boundary):nxt + len(boundary) + 2] == b"--":
            return parts
        pos = nxt + len(boundary) + 2


def multipart_strict(content_type, body):
    """Parts of a multipart body split on the boundary the Content-Type header announces (RFC
    2046: every delimiter is CRLF--boundary, the first one may stand at the very start, the last
    one is followed by --). Returns [(headers dict with lower-case names, bytes)]; fails when the
    body does not have that shape."""
    m = re.search(r'boundary="?([^";]+)"?', content_type)
    assert m, content_type
    b = m.group(1).encode()
    assert body.startswith(b"--" + b + b"\r\n"), body[:120]
    close = b"\r\n--" + b + b"--"
    end = body.rfind(close)
    assert end > 0, body[-120:]
    assert body[end + len(close):] in (b"", b"\r\n"), body[end:]
    chunks = (b"\r\n" + body[:end]).split(b"\r\n--" + b + b"\r\n")
    assert chunks[0] == b""
    parts = []
    for c in chunks[1:]:
        head, sep, data = c.partition(b"\r\n\r\n")
        assert sep, c[:200]
        hdrs = {}
        for line in head.split(b"\r\n"):
            k, _, v = line.decode().partition(":")
            hdrs[k.strip().lower()] = v.strip()
        parts.append((hdrs, data))
    return parts


def error_code(body):
    return json.loads(body)["error"]["code"]


def stored_path(system, sop_uid):
    rel = system.sql("SELECT path FROM instances WHERE sop_uid = %s", (sop_uid,))[0][0]
    return os.path.join(system.env["KP_STORAGE_ROOT"], rel)


def stored_bytes(system, sop_uid):
    with open(stored_path(system, sop_uid), "rb") as f:
        return f.read()


def dcmtk_convert(tool, path, *args):
    """Runs a DCMTK tool (dcmdjpeg, dcmdjpls, dcmdrle, dcmconv, dcmcjpls ...) `tool in out` and
    returns the output read with pydicom."""
    fd, out = tempfile.mkstemp(suffix=".dcm")
    os.close(fd)
    try:
        r = subprocess.run([tool, *args, path, out], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, (tool, path, r.stderr)
        return pydicom.dcmread(out)
    finally:
        os.unlink(out)


def dcm_from_bytes(data):
    import io
    return pydicom.dcmread(io.BytesIO(data))


def native_frames(ds):
    n = int(getattr(ds, "NumberOfFrames", 1) or 1)
    size = ds.Rows * ds.Columns * ds.SamplesPerPixel * ds.BitsAllocated // 8
    return [ds.PixelData[i * size:(i + 1) * size] for i in range(n)]


# -- images ---------------------------------------------------------------------------------
PNG_SIG = b"\x89PNG\r\n\x1a\n"


def png_decode(data):
    """(width, height, channels, rows of bytes) of an 8-bit non-interlaced PNG (greyscale, RGB,
    grey+alpha or RGBA), checking each chunk's CRC: enough to compare rendered pixels."""
    assert data[:8] == PNG_SIG, data[:16]
    pos, idat, ihdr = 8, b"", None
    while pos < len(data):
        n, typ = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + n]
        crc = struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])[0]
        assert zlib.crc32(typ + chunk) & 0xffffffff == crc, typ
        if typ == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", chunk)
        elif typ == b"IDAT":
            idat += chunk
        elif typ == b"IEND":
            break
        pos += 12 + n
    w, h, depth, ctype, _, _, interlace = ihdr
    assert depth == 8 and interlace == 0, ihdr
    ch = {0: 1, 2: 3, 4: 2, 6: 4}[ctype]
    raw = zlib.decompress(idat)
    stride = w * ch
    rows, prev = [], bytearray(stride)
    for y in range(h):
        f = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for x in range(stride):
            a = line[x - ch] if x >= ch else 0
            b = prev[x]
            c = prev[x - ch] if x >= ch else 0
            if f == 1:
                line[x] = (line[x] + a) & 0xff
            elif f == 2:
                line[x] = (line[x] + b) & 0xff
            elif f == 3:
                line[x] = (line[x] + (a + b) // 2) & 0xff
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pr = a if pa <= pb and pa <= pc else b if pb <= pc else c
                line[x] = (line[x] + pr) & 0xff
            else:
                assert f == 0, f
        rows.append(bytes(line))
        prev = line
    return w, h, ch, rows


def jpeg_size(data):
    """(width, height, components) from a JPEG's SOF marker, walking the marker segments."""
    assert data[:2] == b"\xff\xd8", data[:4]
    assert data.rstrip(b"\x00")[-2:] == b"\xff\xd9"
    pos = 2
    while pos < len(data):
        assert data[pos] == 0xFF, (pos, data[pos:pos + 4])
        marker = data[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        n = struct.unpack(">H", data[pos + 2:pos + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            h, w, comps = struct.unpack(">HHB", data[pos + 5:pos + 10])
            return w, h, comps
        pos += 2 + n
    raise AssertionError("no SOF marker")


def jpeg_pixels(data):
    """A JPEG decoded by an independent decoder: DCMTK's img2dcm wraps it (JPEG baseline
    transfer syntax, no re-encoding) and dcmdjpeg decodes it; returns the pydicom data set."""
    with tempfile.TemporaryDirectory() as d:
        src, dcm = os.path.join(d, "x.jpg"), os.path.join(d, "x.dcm")
        with open(src, "wb") as f:
            f.write(data)
        r = subprocess.run(["img2dcm", src, dcm], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return dcmtk_convert("dcmdjpeg", dcm)
