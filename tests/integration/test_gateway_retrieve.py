"""WADO-RS retrieval beyond single stored frames: whole studies / series / instances (as stored
and transcoded), decoded frames, bulk data, rendered images and thumbnails, WADO-URI, HEAD,
OPTIONS and CORS.

Every answer is compared with an independent source: the stored file (path from the index),
pydicom's reading of the source file, or what DCMTK's command-line tools (dcmdjpls, dcmdrle,
dcmdjpeg, dcmcjpls, img2dcm) make of it."""
import base64
import json
import os
import random
import socket
import ssl
import tempfile

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

import datasets
import kp
from dicomweb import (PNG_SIG, dcm_from_bytes, dcmtk_convert, error_code, jpeg_pixels,
                      jpeg_size, multipart_strict, native_frames, parse_multipart, png_decode,
                      stored_bytes, stored_path, url)

T = os.path.join(kp.PYDICOM_DATA, "test_files")
GENERATED = os.path.join(kp.BUILD, "testdata", "retrieve")
FILES = {
    "ct": os.path.join(T, "CT_small.dcm"),                     # native 16-bit 128x128
    "jls": os.path.join(T, "MR_small_jpeg_ls_lossless.dcm"),   # JPEG-LS lossless of MR_small
    "rle2": os.path.join(T, "SC_rgb_rle_2frame.dcm"),          # RLE RGB, 2 frames
    "jpeg": os.path.join(T, "SC_rgb_jpeg_dcmtk.dcm"),          # JPEG baseline YBR_FULL
    "j2k": os.path.join(T, "JPEG2000.dcm"),                    # JPEG 2000 (no decoder here)
    "tall": os.path.join(T, "JPEG-lossy.dcm"),                 # JPEG extended 12-bit, 256x1024
    "ecg": os.path.join(T, "waveform_ecg.dcm"),                # WaveformData in a sequence
    "bulk": os.path.join(GENERATED, "bulk.dcm"),               # generated: large OB/OW values
}
CORS_ORIGIN = "https://viewer.example"
DICOM_ACCEPT = 'multipart/related; type="application/dicom"'
OCTET_ACCEPT = 'multipart/related; type="application/octet-stream"'
EXPLICIT_LE = "1.2.840.10008.1.2.1"

# A synthetic study whose series and instance numbers are not in sending order.
SYN = datasets.Studies("1.2.826.0.1.3680043.10.1411.91", {
    "S1": dict(name="Order^Retrieve", pid="RET1", birth="19700101", sex="F", date="20240102",
               time="101010", acc="RET-ACC", desc="retrieve order", ref="Ref^Doc",
               series=[("CT", 3, "third", [4, 1, 2]), ("CT", 1, "first", [3, 2, 1]),
                       ("MR", 2, "second", [2, 1])]),
})


def make_bulk(path):
    """Secondary capture with bulk values everywhere: native PixelData, OverlayData (OW 2 KiB), a
    private OB of 3000 bytes, a small private OB that stays inline, and an icon image (PixelData
    nested in IconImageSequence)."""
    rnd = random.Random(1411)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.10.1411.92.1.1.1"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.10.1411.92.1"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.10.1411.92.1.1"
    ds.PatientName, ds.PatientID, ds.Modality = "Bulk^Data", "BULK1", "OT"
    ds.Rows = ds.Columns = 32
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.add_new(0x00090010, "LO", "KLINIKA TEST")
    ds.add_new(0x00091001, "OB", rnd.randbytes(3000))
    ds.add_new(0x00091002, "OB", rnd.randbytes(100))
    icon = Dataset()
    icon.Rows = icon.Columns = 32
    icon.SamplesPerPixel, icon.PhotometricInterpretation = 1, "MONOCHROME2"
    icon.BitsAllocated, icon.BitsStored, icon.HighBit, icon.PixelRepresentation = 8, 8, 7, 0
    icon.add_new(0x7FE00010, "OB", rnd.randbytes(1024))
    ds.IconImageSequence = Sequence([icon])
    ds.add_new(0x60000010, "US", 64)
    ds.add_new(0x60000011, "US", 256)
    ds.add_new(0x60000040, "CS", "G")
    ds.add_new(0x60000050, "SS", [1, 1])
    ds.add_new(0x60000100, "US", 1)
    ds.add_new(0x60000102, "US", 0)
    ds.add_new(0x60003000, "OW", rnd.randbytes(2048))
    ds.PixelData = np.arange(32 * 32, dtype=np.uint16).tobytes()
    ds.is_little_endian, ds.is_implicit_VR = True, False
    ds.save_as(path, write_like_original=False)


@pytest.fixture(scope="module")
def gw(cluster):
    os.makedirs(GENERATED, exist_ok=True)
    make_bulk(FILES["bulk"])
    s = kp.System(cluster, gateway=True, extra_env={"KP_HTTP_CORS_ORIGINS": CORS_ORIGIN})
    try:
        s.send_each(list(FILES.values()))
        with tempfile.TemporaryDirectory() as d:
            gen = SYN.write(d)
            rc, res, out = s.storescu(gen)
            assert all(res.get(f) == "ok" for f in gen), out[-2000:]
        s.wait_jobs_settled()
        s.wait_indexed(len(FILES) + len(gen))
        yield s
    finally:
        s.stop()


def ds_of(key):
    return pydicom.dcmread(FILES[key])


def get(gw, path, headers=None):
    return gw.https("GET", path, headers or {})


def part_ts(hdrs):
    ct = hdrs["content-type"]
    return ct.split("transfer-syntax=")[1].split(";")[0].strip('"') if "transfer-syntax=" in ct \
        else None


# -- 1. study / series / instance retrieval --------------------------------------------------
def syn_order(series_index=None):
    """SOP UIDs of the synthetic study in series-number, instance-number order."""
    series = SYN.studies["S1"]["series"]
    idx = sorted(range(len(series)), key=lambda i: series[i][1])
    if series_index is not None:
        idx = [series_index]
    return [SYN.sop_uid("S1", i, n) for i in idx for n in sorted(series[i][-1])]


@pytest.mark.parametrize("accept", [DICOM_ACCEPT, None, DICOM_ACCEPT + "; transfer-syntax=*",
                                    "*/*"])
def test_study_retrieve_is_every_stored_file_in_order(gw, accept):
    study = SYN.study_uid("S1")
    st, h, body = get(gw, f"/dicom-web/studies/{study}", {"Accept": accept} if accept else {})
    assert st == 200, body[:300]
    assert h["Content-Type"].startswith('multipart/related; type="application/dicom"; boundary=')
    assert int(h["Content-Length"]) == len(body)
    parts = multipart_strict(h["Content-Type"], body)
    want = syn_order()
    assert len(parts) == len(want) == 8
    got_uids = [dcm_from_bytes(p[1]).SOPInstanceUID for p in parts]
    assert got_uids == want
    for (hdrs, data), sop in zip(parts, want):
        assert hdrs["content-type"].startswith("application/dicom")
        assert data == stored_bytes(gw, sop)
    # the cornerstone-style parser reads the same
    assert [p[1] for p in parse_multipart(body)] == [p[1] for p in parts]


def test_series_and_instance_retrieve(gw):
    study = SYN.study_uid("S1")
    for i in range(3):
        series = SYN.series_uid("S1", i)
        st, h, body = get(gw, f"/dicom-web/studies/{study}/series/{series}",
                          {"Accept": DICOM_ACCEPT})
        assert st == 200
        assert int(h["Content-Length"]) == len(body)
        parts = multipart_strict(h["Content-Type"], body)
        want = syn_order(i)
        assert [dcm_from_bytes(p[1]).SOPInstanceUID for p in parts] == want
        assert [p[1] for p in parts] == [stored_bytes(gw, s) for s in want]
    sop = SYN.sop_uid("S1", 2, 2)
    st, h, body = get(gw, f"/dicom-web/studies/{study}/series/{SYN.series_uid('S1', 2)}"
                          f"/instances/{sop}", {"Accept": DICOM_ACCEPT})
    assert st == 200
    parts = multipart_strict(h["Content-Type"], body)
    assert len(parts) == 1 and parts[0][1] == stored_bytes(gw, sop)
    # a compressed instance retrieved with transfer-syntax=* is its stored file too
    ds = ds_of("jls")
    st, h, body = get(gw, url(ds), {"Accept": DICOM_ACCEPT + "; transfer-syntax=*"})
    assert st == 200
    parts = multipart_strict(h["Content-Type"], body)
    assert parts[0][1] == stored_bytes(gw, ds.SOPInstanceUID)
    # unknown series / study: 404 JSON
    for path in (f"/dicom-web/studies/{study}/series/1.2.3", "/dicom-web/studies/1.2.3"):
        st, h, body = get(gw, path, {"Accept": DICOM_ACCEPT})
        assert st == 404 and error_code(body) == "not_found"


# -- 2. transcoding --------------------------------------------------------------------------
def transcoded(gw, key, ts):
    ds = ds_of(key)
    st, h, body = get(gw, url(ds), {"Accept": f"{DICOM_ACCEPT}; transfer-syntax={ts}"})
    assert st == 200, (key, body[:300])
    assert int(h["Content-Length"]) == len(body)
    parts = multipart_strict(h["Content-Type"], body)
    assert len(parts) == 1
    assert part_ts(parts[0][0]) == ts
    out = dcm_from_bytes(parts[0][1])
    assert parts[0][1][128:132] == b"DICM"
    assert str(out.file_meta.TransferSyntaxUID) == ts
    assert out.SOPInstanceUID == ds.SOPInstanceUID
    return out


@pytest.mark.parametrize("key,tool", [("jls", "dcmdjpls"), ("rle2", "dcmdrle"),
                                      ("jpeg", "dcmdjpeg")])
def test_transcode_to_explicit_le_equals_dcmtk(gw, key, tool):
    out = transcoded(gw, key, EXPLICIT_LE)
    ref = dcmtk_convert(tool, stored_path(gw, ds_of(key).SOPInstanceUID))
    assert out.PixelData == ref.PixelData
    assert out.PhotometricInterpretation == ref.PhotometricInterpretation
    assert out.PatientName == ref.PatientName and out.Rows == ref.Rows
    if key == "jls":  # lossless: the very pixels of the uncompressed original
        assert out.PixelData == pydicom.dcmread(os.path.join(T, "MR_small.dcm")).PixelData


def test_transcode_native_to_jpeg_ls_is_lossless(gw):
    out = transcoded(gw, "ct", "1.2.840.10008.1.2.4.80")
    assert out.file_meta.TransferSyntaxUID.is_compressed
    with tempfile.NamedTemporaryFile(suffix=".dcm") as f:
        out.save_as(f.name, write_like_original=True)
        back = dcmtk_convert("dcmdjpls", f.name)
    assert back.PixelData == ds_of("ct").PixelData


def test_transcode_refusals(gw):
    for key, ts in (("j2k", EXPLICIT_LE), ("ct", "1.2.840.10008.1.2.4.90")):
        st, h, body = get(gw, url(ds_of(key)), {"Accept": f"{DICOM_ACCEPT}; transfer-syntax={ts}"})
        assert st == 406, (key, ts, body[:300])
        assert h["Content-Type"] == "application/json"
        assert error_code(body) == "not_acceptable"
    # a study holding the JPEG 2000 instance, asked as Explicit VR LE, is refused whole
    ds = ds_of("j2k")
    st, h, body = get(gw, f"/dicom-web/studies/{ds.StudyInstanceUID}",
                      {"Accept": f"{DICOM_ACCEPT}; transfer-syntax={EXPLICIT_LE}"})
    assert st == 406 and error_code(body) == "not_acceptable"


# -- 3. decoded frames -----------------------------------------------------------------------
@pytest.mark.parametrize("key,tool,frame", [("jls", "dcmdjpls", 1), ("rle2", "dcmdrle", 2),
                                            ("rle2", "dcmdrle", 1), ("jpeg", "dcmdjpeg", 1)])
def test_frames_decoded_equal_dcmtk(gw, key, tool, frame):
    ds = ds_of(key)
    st, h, body = get(gw, url(ds, f"/frames/{frame}"), {"Accept": OCTET_ACCEPT})
    assert st == 200, body[:300]
    parts = multipart_strict(h["Content-Type"], body)
    assert len(parts) == 1
    assert parts[0][0]["content-type"] == f"application/octet-stream; transfer-syntax={EXPLICIT_LE}"
    ref = native_frames(dcmtk_convert(tool, stored_path(gw, ds.SOPInstanceUID)))
    assert parts[0][1] == ref[frame - 1]
    if key == "rle2":
        assert ref[0] != ref[1]


def test_frames_decoded_refusals(gw):
    st, h, body = get(gw, url(ds_of("j2k"), "/frames/1"), {"Accept": OCTET_ACCEPT})
    assert st == 406 and error_code(body) == "not_acceptable"
    st, h, body = get(gw, url(ds_of("rle2"), "/frames/3"), {"Accept": OCTET_ACCEPT})
    assert st == 404 and error_code(body) == "not_found"


# -- 4. bulk data ----------------------------------------------------------------------------
def bulk_uris(gw, ds):
    st, h, body = get(gw, url(ds, "/metadata"), {"Accept": "application/dicom+json"})
    assert st == 200
    found = {}

    def walk(obj, path):
        for tag, el in obj.items():
            p = f"{path}/{tag}" if path else tag
            if "BulkDataURI" in el:
                found[p] = el["BulkDataURI"]
            for i, item in enumerate(el.get("Value", [])):
                if isinstance(item, dict) and el.get("vr") == "SQ":
                    walk(item, f"{p}/{i}")
    md = json.loads(body)
    assert len(md) == 1
    walk(md[0], "")
    return found, md[0]


def pydicom_value(ds, tagpath):
    parts = tagpath.split("/")
    obj = ds
    for k in range(0, len(parts) - 1, 2):
        obj = obj[int(parts[k], 16)].value[int(parts[k + 1])]
    return obj[int(parts[-1], 16)].value


@pytest.mark.parametrize("key,expect", [
    ("bulk", {"7FE00010", "00091001", "60003000", "00880200/0/7FE00010"}),
    ("ecg", {"54000100/0/54001010", "54000100/1/54001010"}),
    ("ct", {"7FE00010"}),
])
def test_every_bulkdata_uri_answers_the_value(gw, key, expect):
    ds = ds_of(key)
    uris, md = bulk_uris(gw, ds)
    assert expect <= set(uris), sorted(uris)
    for tagpath, uri in uris.items():
        assert uri == url(ds, f"/bulkdata/{tagpath}"), uri
        st, h, body = get(gw, uri)
        assert st == 200, (tagpath, body[:200])
        assert h["Content-Type"] == "application/octet-stream"
        want = pydicom_value(ds, tagpath)
        assert body == want, (tagpath, len(body), len(want))
    if key == "bulk":  # a small binary value stays inline, base64 of the same bytes
        assert base64.b64decode(md["00091002"]["InlineBinary"]) == ds[0x00091002].value


def test_bulkdata_ranges_and_multipart(gw):
    ds = ds_of("bulk")
    value = ds[0x00091001].value
    n = len(value)
    uri = url(ds, "/bulkdata/00091001")
    st, h, body = get(gw, uri, {"Range": "bytes=10-19"})
    assert st == 206 and body == value[10:20]
    assert h["Content-Range"] == f"bytes 10-19/{n}"
    assert int(h["Content-Length"]) == 10
    st, h, body = get(gw, uri, {"Range": "bytes=-5"})
    assert st == 206 and body == value[-5:]
    assert h["Content-Range"] == f"bytes {n - 5}-{n - 1}/{n}"
    st, h, body = get(gw, uri, {"Range": f"bytes={n - 3}-"})
    assert st == 206 and body == value[-3:]
    st, h, body = get(gw, uri, {"Range": f"bytes={n}-"})
    assert st == 416, body[:200]
    assert h["Content-Range"] == f"bytes */{n}"
    # nested value with a range, served from a sequence item
    icon = ds.IconImageSequence[0].PixelData
    st, h, body = get(gw, url(ds, "/bulkdata/00880200/0/7FE00010"), {"Range": "bytes=1000-"})
    assert st == 206 and body == icon[1000:]
    # multipart when only multipart is accepted
    st, h, body = get(gw, uri, {"Accept": OCTET_ACCEPT})
    assert st == 200
    assert h["Content-Type"].startswith('multipart/related; type="application/octet-stream"')
    parts = multipart_strict(h["Content-Type"], body)
    assert len(parts) == 1 and parts[0][1] == value
    assert parts[0][0]["content-type"] == "application/octet-stream"
    # the native PixelData of the CT
    ct = ds_of("ct")
    st, h, body = get(gw, url(ct, "/bulkdata/7FE00010"), {"Range": "bytes=100-299"})
    assert st == 206 and body == ct.PixelData[100:300]


def test_bulkdata_errors(gw):
    ds = ds_of("bulk")
    for tagpath in ("00091009", "00880200/1/7FE00010", "00880200/0/00091001", "00100010/0/00100010"):
        st, h, body = get(gw, url(ds, f"/bulkdata/{tagpath}"))
        assert st == 404, (tagpath, st, body[:200])
        assert error_code(body) == "not_found"
    st, h, body = get(gw, url(ds_of("jls"), "/bulkdata/7FE00010"))
    assert st == 406 and error_code(body) == "not_acceptable"
    st, h, body = get(gw, url(ds, "/bulkdata/nothex00"))
    assert st in (400, 404)
    assert gw.https_ok()


# -- 5. rendered and thumbnail ---------------------------------------------------------------
def test_rendered_jpeg_native_size_and_viewports(gw):
    ct = ds_of("ct")
    st, h, body = get(gw, url(ct, "/rendered"))
    assert st == 200 and h["Content-Type"] == "image/jpeg"
    assert jpeg_size(body)[:2] == (128, 128)
    for vp, size in (("64,64", (64, 64)), ("100,50", (50, 50)), ("256,256", (256, 256)),
                     ("32,0", (32, 32))):
        st, h, body = get(gw, url(ct, f"/rendered?viewport={vp}"))
        assert st == 200, (vp, body[:200])
        assert jpeg_size(body)[:2] == size, vp
    # a tall image (256 x 1024) fits in the box keeping its aspect
    tall = ds_of("tall")
    st, h, body = get(gw, url(tall, "/rendered?viewport=100,100"))
    assert st == 200, body[:300]
    assert jpeg_size(body)[:2] == (25, 100)


def ct_expected(center, width):
    """What the PS3.3 C.11.2.1.2 linear VOI function gives for CT_small (8-bit output)."""
    ct = ds_of("ct")
    x = ct.pixel_array.astype(np.float64) * float(ct.RescaleSlope) + float(ct.RescaleIntercept)
    y = ((x - (center - 0.5)) / (width - 1) + 0.5) * 255
    return np.clip(y, 0, 255)


def test_rendered_png_and_window(gw):
    ct = ds_of("ct")
    st, h, png = get(gw, url(ct, "/rendered"), {"Accept": "image/png"})
    assert st == 200 and h["Content-Type"] == "image/png" and png[:8] == PNG_SIG
    w, hh, ch, rows = png_decode(png)
    assert (w, hh, ch) == (128, 128, 1)
    st, h, png_q = get(gw, url(ct, "/rendered?accept=image/png"))
    assert st == 200 and h["Content-Type"] == "image/png" and png_q == png
    st, h, png_w = get(gw, url(ct, "/rendered?window=40,400"), {"Accept": "image/png"})
    assert st == 200
    rows_w = png_decode(png_w)[3]
    assert rows_w != rows  # the window changes the picture
    got = np.frombuffer(b"".join(rows_w), np.uint8).reshape(128, 128).astype(np.int32)
    want = ct_expected(40, 400)
    assert np.abs(got - want).max() <= 1.01, np.abs(got - want).max()
    # the default (no window in the file): a min/max window spans the full grey range
    g = np.frombuffer(b"".join(rows), np.uint8)
    assert g.min() == 0 and g.max() == 255
    # the JPEG is the same picture as the PNG (decoded by DCMTK, small JPEG error only)
    st, h, jpg = get(gw, url(ct, "/rendered?window=40,400&quality=100"))
    dec = jpeg_pixels(jpg)
    assert (dec.Rows, dec.Columns) == (128, 128)
    diff = np.abs(dec.pixel_array.astype(np.int32).reshape(128, 128) - got)
    assert diff.mean() < 2, diff.mean()


def test_rendered_quality(gw):
    ct = ds_of("ct")
    sizes = {}
    for q in (10, 50, 100):
        st, h, body = get(gw, url(ct, f"/rendered?quality={q}"))
        assert st == 200 and body[:2] == b"\xff\xd8"
        sizes[q] = len(body)
    assert sizes[10] < sizes[50] < sizes[100], sizes


def test_rendered_frame_of_multiframe(gw):
    ds = ds_of("rle2")
    ref = dcmtk_convert("dcmdrle", stored_path(gw, ds.SOPInstanceUID))
    frames = native_frames(ref)
    for n in (1, 2):
        st, h, body = get(gw, url(ds, f"/frames/{n}/rendered"), {"Accept": "image/png"})
        assert st == 200, body[:200]
        w, hh, ch, rows = png_decode(body)
        assert (w, hh, ch) == (100, 100, 3)
        want = np.array(ref.pixel_array[n - 1], dtype=np.uint8).tobytes()
        assert b"".join(rows) == want, n
    assert frames[0] != frames[1]
    st, h, body = get(gw, url(ds, "/frames/3/rendered"))
    assert st == 404 and error_code(body) == "not_found"
    st, h, body = get(gw, url(ds, "/frames/1,2/rendered"))
    assert st == 400


def test_thumbnails(gw):
    ct, tall = ds_of("ct"), ds_of("tall")
    st, h, body = get(gw, url(ct, "/thumbnail"))
    assert st == 200 and h["Content-Type"] == "image/jpeg" and jpeg_size(body)[:2] == (128, 128)
    st, h, body = get(gw, url(tall, "/thumbnail"))
    assert st == 200 and jpeg_size(body)[:2] == (32, 128)
    st, h, body = get(gw, url(ct, "/thumbnail?viewport=40,40"))
    assert st == 200 and jpeg_size(body)[:2] == (40, 40)
    study = SYN.study_uid("S1")
    for path in (f"/dicom-web/studies/{study}/thumbnail",
                 f"/dicom-web/studies/{study}/series/{SYN.series_uid('S1', 0)}/thumbnail",
                 f"/dicom-web/studies/{ct.StudyInstanceUID}/thumbnail"):
        st, h, body = get(gw, path)
        assert st == 200, (path, body[:200])
        assert h["Content-Type"] == "image/jpeg"
        assert jpeg_size(body)[:2] == (128, 128)
    st, h, body = get(gw, f"/dicom-web/studies/{study}/thumbnail", {"Accept": "image/png"})
    assert st == 200 and png_decode(body)[:2] == (128, 128)


def test_series_rendered_is_one_jpeg_per_instance(gw):
    study, series = SYN.study_uid("S1"), SYN.series_uid("S1", 1)
    st, h, body = get(gw, f"/dicom-web/studies/{study}/series/{series}/rendered?viewport=16,16")
    assert st == 200, body[:300]
    assert h["Content-Type"].startswith('multipart/related; type="image/jpeg"')
    parts = multipart_strict(h["Content-Type"], body)
    assert len(parts) == len(SYN.studies["S1"]["series"][1][-1]) == 3
    for hdrs, data in parts:
        assert hdrs["content-type"] == "image/jpeg"
        assert jpeg_size(data)[:2] == (16, 16)
    st, h, body = get(gw, f"/dicom-web/studies/{study}/rendered", {"Accept": "image/png"})
    assert st == 200
    parts = multipart_strict(h["Content-Type"], body)
    assert len(parts) == 8 and all(d[:8] == PNG_SIG for _, d in parts)


def test_rendered_errors(gw):
    ct = ds_of("ct")
    for q in ("viewport=0,0", "viewport=abc", "viewport=64", "viewport=-1,5", "window=1,0",
              "window=abc,400", "quality=101", "quality=0", "viewport=9000,9000"):
        st, h, body = get(gw, url(ct, f"/rendered?{q}"))
        assert st == 400, (q, st, body[:200])
        assert h["Content-Type"] == "application/json" and error_code(body) == "invalid_argument", q
    st, h, body = get(gw, url(ct, "/rendered"), {"Accept": "image/gif"})
    assert st == 406 and error_code(body) == "not_acceptable"
    st, h, body = get(gw, url(ds_of("j2k"), "/rendered"))
    assert st == 406 and error_code(body) == "not_acceptable"
    st, h, body = get(gw, url(ds_of("ecg"), "/rendered"))
    assert st in (404, 406), (st, body[:200])
    assert gw.https_ok()


# -- 6. WADO-URI -----------------------------------------------------------------------------
def wado(ds, extra=""):
    return (f"/wado?requestType=WADO&studyUID={ds.StudyInstanceUID}&seriesUID="
            f"{ds.SeriesInstanceUID}&objectUID={ds.SOPInstanceUID}{extra}")


def test_wado_uri(gw):
    ct, jls = ds_of("ct"), ds_of("jls")
    st, h, body = get(gw, wado(ct, "&contentType=application/dicom"))
    assert st == 200 and h["Content-Type"] == "application/dicom"
    assert body == stored_bytes(gw, ct.SOPInstanceUID)
    assert int(h["Content-Length"]) == len(body)
    st, h, body = get(gw, wado(ct))
    assert st == 200 and h["Content-Type"] == "image/jpeg" and jpeg_size(body)[:2] == (128, 128)
    st, h, body = get(gw, wado(ct, "&contentType=image/png&rows=64&columns=64"))
    assert st == 200 and h["Content-Type"] == "image/png"
    assert png_decode(body)[:2] == (64, 64)
    st, h, body = get(gw, wado(ct, "&contentType=image%2Fpng&windowCenter=40&windowWidth=400"))
    assert st == 200
    got = np.frombuffer(b"".join(png_decode(body)[3]), np.uint8).reshape(128, 128)
    assert np.abs(got.astype(np.int32) - ct_expected(40, 400)).max() <= 1.01
    st, h, body = get(gw, wado(jls, f"&contentType=application/dicom&transferSyntax={EXPLICIT_LE}"))
    assert st == 200 and h["Content-Type"] == "application/dicom"
    out = dcm_from_bytes(body)
    assert str(out.file_meta.TransferSyntaxUID) == EXPLICIT_LE
    assert out.PixelData == pydicom.dcmread(os.path.join(T, "MR_small.dcm")).PixelData
    st, h, body = get(gw, wado(ds_of("j2k"), f"&contentType=application/dicom&transferSyntax={EXPLICIT_LE}"))
    assert st == 406
    st, h, body = get(gw, wado(ds_of("rle2"), "&contentType=image/png&frameNumber=2"))
    assert st == 200 and png_decode(body)[:3] == (100, 100, 3)


def test_wado_uri_errors(gw):
    ct = ds_of("ct")
    bad = [wado(ct).replace("requestType=WADO&", ""), wado(ct).replace("WADO", "WADX", 1),
           wado(ct).replace(f"objectUID={ct.SOPInstanceUID}", "objectUID=abc"),
           wado(ct).replace(f"&seriesUID={ct.SeriesInstanceUID}", ""),
           wado(ct, "&contentType=image/png&rows=x"), wado(ct, "&contentType=image/jpeg&imageQuality=101"),
           wado(ct, "&windowCenter=40")]
    for path in bad:
        st, h, body = get(gw, path)
        assert st == 400, (path, st, body[:200])
        assert error_code(body) == "invalid_argument"
    st, h, body = get(gw, wado(ct).replace(ct.SOPInstanceUID, "1.2.3.4"))
    assert st == 404 and error_code(body) == "not_found"
    st, h, body = get(gw, wado(ct, "&contentType=text/html"))
    assert st == 406


# -- 7. HEAD, OPTIONS, CORS ------------------------------------------------------------------
def raw_exchange(port, request):
    """Bytes the server sends back for one raw request (Connection: close) over TLS."""
    ctx = ssl._create_unverified_context()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        with ctx.wrap_socket(s) as t:
            t.sendall(request)
            data = b""
            while True:
                chunk = t.recv(65536)
                if not chunk:
                    return data
                data += chunk


def test_head_matches_get(gw):
    ct = ds_of("ct")
    study = SYN.study_uid("S1")
    for path, hdrs in ((url(ct), {"Accept": DICOM_ACCEPT}), (f"/dicom-web/studies/{study}", {}),
                       (url(ct, "/metadata"), {}), (url(ct, "/bulkdata/7FE00010"), {}),
                       (url(ct, "/rendered"), {}), (url(ds_of("jls")),
                                                    {"Accept": f"{DICOM_ACCEPT}; transfer-syntax={EXPLICIT_LE}"})):
        st, h, body = gw.https("GET", path, hdrs)
        assert st == 200
        st2, h2, body2 = gw.https("HEAD", path, hdrs)
        assert st2 == 200, path
        assert h2["Content-Length"] == h["Content-Length"] == str(len(body)), path
        assert h2["Content-Type"] == h["Content-Type"]
        assert body2 == b""
    # on the wire: headers only, nothing after them
    req = (f"HEAD {url(ct)} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: {DICOM_ACCEPT}\r\n"
           f"Authorization: Bearer {gw.token}\r\nConnection: close\r\n\r\n").encode()
    raw = raw_exchange(gw.https_port, req)
    head, sep, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and sep and rest == b"", raw[-200:]


def test_options_and_cors(gw):
    st, h, body = gw.https("OPTIONS", "/dicom-web/studies")
    assert st == 204 and body == b""
    allow = {m.strip() for m in h["Allow"].split(",")}
    assert {"GET", "POST", "OPTIONS", "HEAD"} <= allow
    assert h.get("Access-Control-Allow-Origin") is None
    ct = ds_of("ct")
    st, h, body = gw.https("OPTIONS", url(ct, "/rendered"))
    assert st == 204
    allow = {m.strip() for m in h["Allow"].split(",")}
    assert "GET" in allow and "POST" not in allow
    # preflight from the allowed origin
    st, h, body = gw.https("OPTIONS", "/dicom-web/studies", {
        "Origin": CORS_ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"})
    assert st == 204
    assert h["Access-Control-Allow-Origin"] == CORS_ORIGIN
    assert "POST" in h["Access-Control-Allow-Methods"]
    assert "content-type" in h["Access-Control-Allow-Headers"].lower()
    # the real requests from that origin
    wrong = {}
    for what, path in (("qido", "/dicom-web/studies"), ("metadata", url(ct, "/metadata")),
                       ("rendered", url(ct, "/rendered")), ("instance", url(ct)),
                       ("frames", url(ct, "/frames/1")),
                       ("bulkdata", url(ct, "/bulkdata/7FE00010")),
                       ("wado-uri", wado(ct, "&contentType=application/dicom"))):
        st, h, body = gw.https("GET", path, {"Origin": CORS_ORIGIN})
        assert st == 200, path
        if h["Access-Control-Allow-Origin"] != CORS_ORIGIN:
            wrong[what] = h["Access-Control-Allow-Origin"]
    assert not wrong, wrong
    # an error answer carries it too (the browser must be able to read the 404)
    st, h, body = gw.https("GET", "/dicom-web/studies/1.2.3", {"Origin": CORS_ORIGIN,
                                                                "Accept": DICOM_ACCEPT})
    assert st == 404 and h["Access-Control-Allow-Origin"] == CORS_ORIGIN
    # another origin: no CORS headers at all
    for method in ("GET", "OPTIONS"):
        st, h, body = gw.https(method, "/dicom-web/studies", {
            "Origin": "https://evil.example", "Access-Control-Request-Method": "GET"})
        assert st in (200, 204)
        assert h.get("Access-Control-Allow-Origin") is None, method
        assert h.get("Access-Control-Allow-Methods") is None
