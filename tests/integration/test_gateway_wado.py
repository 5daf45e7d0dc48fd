"""WADO-RS retrieval: whole instances and frames, straight from the stored files.

Frames are compared with what pydicom reads from the source files (native pixel bytes, or the
encapsulated fragments of each frame), parsed the way OHIF's cornerstone loader parses them
(boundary = first line starting with "--", part type from the case-sensitive "Content-Type:"
header, bytes end 2 bytes before the next boundary)."""
import os

import pydicom
import pydicom.encaps
import pytest

import kp
from dicomweb import parse_multipart

T = os.path.join(kp.PYDICOM_DATA, "test_files")
GENERATED = os.path.join(kp.BUILD, "testdata", "wado")
FILES = {
    "ct": "CT_small.dcm",                      # native 16-bit, 1 frame
    "emri": os.path.join(GENERATED, "mf10.dcm"),  # native 16-bit, 10 frames (generated)
    "big": "ExplVR_BigEnd.dcm",                # Explicit VR Big Endian
    "jpeg": "SC_rgb_jpeg_dcmtk.dcm",           # JPEG baseline
    "jls": "MR_small_jpeg_ls_lossless.dcm",    # JPEG-LS lossless
    "j2k": "GDCMJ2K_TextGBR.dcm",              # JPEG 2000 lossless
    "j2k91": "693_J2KI.dcm",                   # JPEG 2000
    "rle2": "SC_rgb_rle_2frame.dcm",           # RLE, 2 frames
}
OHIF_ACCEPT = "multipart/related; type=application/octet-stream; transfer-syntax=*"


def make_multiframe(path, frames=10):
    """A native 16-bit multi-frame MR with distinct frames (pydicom ships none)."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4.1"  # Enhanced MR
    meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.10.1411.77.1.1.1"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.10.1411.77.1"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.10.1411.77.1.1"
    ds.PatientName, ds.PatientID, ds.Modality = "Frames^Multi", "MF1", "MR"
    ds.Rows = ds.Columns = 64
    ds.NumberOfFrames = frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.arange(frames * 64 * 64, dtype=np.uint16).tobytes()
    ds.is_little_endian, ds.is_implicit_VR = True, False
    ds.save_as(path, write_like_original=False)


@pytest.fixture(scope="module")
def gw(cluster):
    os.makedirs(GENERATED, exist_ok=True)
    make_multiframe(FILES["emri"])
    s = kp.System(cluster, gateway=True)
    try:
        s.send_each([os.path.join(T, name) for name in FILES.values()])
        yield s
    finally:
        s.stop()


def ds_of(key):
    return pydicom.dcmread(os.path.join(T, FILES[key]))


def url(ds, suffix=""):
    return (f"/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
            f"/instances/{ds.SOPInstanceUID}{suffix}")


def frames_of(ds):
    n = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        return list(pydicom.encaps.generate_pixel_data_frame(ds.PixelData, n))
    size = ds.Rows * ds.Columns * ds.SamplesPerPixel * ds.BitsAllocated // 8
    return [ds.PixelData[i * size:(i + 1) * size] for i in range(n)]


def stored(gw, ds):
    path = gw.sql("SELECT path FROM instances WHERE sop_uid = %s", (ds.SOPInstanceUID,))[0][0]
    return pydicom.dcmread(os.path.join(gw.env["KP_STORAGE_ROOT"], path))


@pytest.mark.parametrize("key", list(FILES))
def test_every_frame_equals_the_source(gw, key):
    ds = ds_of(key)
    st_ds = stored(gw, ds)
    ts = str(st_ds.file_meta.TransferSyntaxUID)
    if key == "big":
        # storescu converted Big Endian to the Explicit Little Endian we preferred: same pixels
        assert ts == "1.2.840.10008.1.2.1"
        assert (st_ds.pixel_array == ds.pixel_array).all()
    else:
        assert ts == str(ds.file_meta.TransferSyntaxUID)  # stored as received
    want = frames_of(st_ds)
    if key != "big":
        assert want == frames_of(ds)
    for n, frame in enumerate(want, 1):
        st, h, body = gw.https("GET", url(ds, f"/frames/{n}"), {"Accept": OHIF_ACCEPT})
        assert st == 200, (key, n, body[:300])
        assert h["Content-Type"].startswith("multipart/related")
        parts = parse_multipart(body)
        assert len(parts) == 1
        ctype, data = parts[0]
        media = {"1.2.840.10008.1.2.4.50": "image/jpeg", "1.2.840.10008.1.2.4.80": "image/jls",
                 "1.2.840.10008.1.2.4.90": "image/jp2", "1.2.840.10008.1.2.4.91": "image/jp2",
                 "1.2.840.10008.1.2.5": "image/x-dicom-rle"
                 }.get(ts, "application/octet-stream")
        assert ctype == f"{media}; transfer-syntax={ts}", (key, ctype)
        assert data == frame, (key, n, len(data), len(frame))


def test_frame_list_gives_one_part_each(gw):
    ds = ds_of("emri")
    st, h, body = gw.https("GET", url(ds, "/frames/3,1,10"),
                           {"Accept": 'multipart/related; type="application/octet-stream"; '
                                      'transfer-syntax="*"'})
    assert st == 200
    want = frames_of(ds)
    assert len(want) == 10 and want[2] != want[0]
    assert [p[1] for p in parse_multipart(body)] == [want[2], want[0], want[9]]


def test_accept_negotiation(gw):
    jpeg, ct = ds_of("jpeg"), ds_of("ct")
    plain = 'multipart/related; type="application/octet-stream"'
    # a native frame satisfies a request for uncompressed octet-stream
    assert gw.https("GET", url(ct, "/frames/1"), {"Accept": plain})[0] == 200
    # a JPEG frame is decoded for it (DCMTK): Explicit VR LE pixel bytes
    st, h, body = gw.https("GET", url(jpeg, "/frames/1"), {"Accept": plain})
    assert st == 200, body[:300]
    parts = parse_multipart(body)
    assert parts[0][0] == "application/octet-stream; transfer-syntax=1.2.840.10008.1.2.1"
    assert len(parts[0][1]) == jpeg.Rows * jpeg.Columns * jpeg.SamplesPerPixel
    # JPEG 2000 has no decoder here: 406 with a JSON body
    st, h, body = gw.https("GET", url(ds_of("j2k"), "/frames/1"), {"Accept": plain})
    assert st == 406 and b'"not_acceptable"' in body
    # asking for the stored syntax or its media type works
    assert gw.https("GET", url(jpeg, "/frames/1"),
                    {"Accept": "multipart/related; type=\"image/jpeg\"; "
                               "transfer-syntax=1.2.840.10008.1.2.4.50"})[0] == 200
    assert gw.https("GET", url(jpeg, "/frames/1"), {"Accept": "*/*"})[0] == 200


def test_instance_retrieval_is_the_stored_file(gw):
    for key in ("ct", "jpeg", "rle2"):
        ds = ds_of(key)
        st, h, body = gw.https("GET", url(ds), {"Accept": 'multipart/related; '
                                                          'type="application/dicom"'})
        assert st == 200, body[:300]
        assert h["Content-Type"].startswith('multipart/related; type="application/dicom"')
        parts = parse_multipart(body)
        assert len(parts) == 1 and parts[0][0].startswith("application/dicom")
        path = gw.sql("SELECT path FROM instances WHERE sop_uid = %s", (ds.SOPInstanceUID,))[0][0]
        with open(os.path.join(gw.env["KP_STORAGE_ROOT"], path), "rb") as f:
            assert parts[0][1] == f.read()
    # a syntax that cannot be produced (JPEG 2000 encoding) is refused clearly
    st, h, body = gw.https("GET", url(ds_of("ct")), {
        "Accept": 'multipart/related; type="application/dicom"; '
                  'transfer-syntax=1.2.840.10008.1.2.4.90'})
    assert st == 406 and b"not_acceptable" in body


def test_bad_requests(gw):
    ds = ds_of("emri")
    for frames, status in (("0", 400), ("1,,2", 400), ("1,", 400), ("11", 404), ("99999", 404),
                           ("x", 400), ("1;2", 400)):
        st, h, body = gw.https("GET", url(ds, f"/frames/{frames}"), {"Accept": OHIF_ACCEPT})
        assert st == status, (frames, st, body[:200])
        assert h["Content-Type"] == "application/json"
    st, h, body = gw.https("GET", url(ds, "/frames/" + ",".join(["1"] * 40)),
                           {"Accept": OHIF_ACCEPT})
    assert st == 400  # longer than a UID-sized segment
    unknown = f"/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/1.2.3"
    for suffix in ("", "/frames/1"):
        st, h, body = gw.https("GET", unknown + suffix)
        assert st == 404 and b'"not_found"' in body
    assert gw.https_ok()


def test_metadata_cache_follows_new_instances(gw, tmp_path):
    """Metadata is cached in the gateway; the indexer's study.changed event drops the entry, so
    an instance that arrives later is in the very next response (no TTL wait)."""
    ds = ds_of("emri")
    path = (f"/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/metadata")
    st, h, body = gw.https("GET", path)
    assert st == 200
    import json
    before = json.loads(body)
    etag, lm = h["ETag"], h["Last-Modified"]
    assert lm.endswith(" GMT")
    # served again (from the cache): same ETag, 304 on revalidation either way
    st2, h2, _ = gw.https("GET", path)
    assert st2 == 200 and h2["ETag"] == etag
    assert gw.https("GET", path, {"If-None-Match": etag})[0] == 304
    assert gw.https("GET", path, {"If-Modified-Since": lm})[0] == 304
    assert gw.https("GET", path, {"If-Modified-Since": "Mon, 01 Jan 2001 00:00:00 GMT"})[0] == 200
    # a second instance of the same series arrives over DICOM
    extra = pydicom.dcmread(FILES["emri"])
    extra.SOPInstanceUID = extra.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID + ".2"
    extra.InstanceNumber = 2
    f = str(tmp_path / "extra.dcm")
    extra.save_as(f)
    n = gw.count("instances")
    gw.send_each([f])
    gw.wait_indexed(n + 1)
    kp.wait_for(lambda: len(json.loads(gw.https("GET", path)[2])) == len(before) + 1, 10,
                "the new instance in the series metadata")
    st, h, body = gw.https("GET", path, {"If-None-Match": etag})
    assert st == 200 and h["ETag"] != etag
    assert {i["00080018"]["Value"][0] for i in json.loads(body)} == {
        ds.SOPInstanceUID, extra.SOPInstanceUID}
