"""pacs-compressor: lossless compression of stored instances (issue 6, item 1).

Part 1 stores every file of pydicom's test_files/ (each under a SOP Instance UID of its own,
set with dcmodify, so no two share an index row) into a system whose compressor works on
arrival, and checks each decision against an independent oracle: DCMTK's own command-line
round trip (dcmcjpls, then dcmdjpls or dcmconv). A compressed instance must decode to exactly
the original pixel bytes - through dcmdjpls of the stored file and through WADO-RS frames
asked for as Explicit VR Little Endian - and must be served as JPEG-LS to a client accepting
any syntax; everything else is left as it was with a reason.

Part 2 kills the compressor with SIGKILL at random moments while it works through 500
generated CT images, checking after every kill that each index row agrees with the file on
disk (size, SHA-256, transfer syntax), then lets it finish: all 500 end compressed (a sample
decoded with dcmdjpls gives the original pixels) and the storage holds exactly one file per
instance."""
import concurrent.futures
import glob
import hashlib
import os
import random
import re
import shutil
import signal
import subprocess
import tempfile
import time

import pydicom
import pytest

import kp
from dicomweb import multipart_strict

JLS = "1.2.840.10008.1.2.4.80"
ELE = "1.2.840.10008.1.2.1"
T = os.path.join(kp.PYDICOM_DATA, "test_files")
UID_ROOT = "1.2.826.0.1.3680043.10.1411.99"
REASONS = {"already-compressed", "no-pixel-data", "float-pixel-data", "unsupported-bit-depth",
           "too-large", "encoder-refused", "undecodable", "not-smaller", "roundtrip-mismatch",
           "roundtrip-failed", "unreadable"}
COMPRESS_ENV = {"KP_COMPRESS_ENABLED": "true", "KP_COMPRESS_UNLINK_GRACE": "0",
                "KP_COMPRESS_SCAN_INTERVAL": "1"}


def run(*cmd):
    return subprocess.run(cmd, capture_output=True, timeout=60)


def pixels(path):
    """Native pixel bytes of a DICOM file as DCMTK decodes them (Explicit VR Little Endian), or
    None when DCMTK cannot make it native."""
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "n.dcm")
        ts = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        tool = {JLS: "dcmdjpls", "1.2.840.10008.1.2.4.70": "dcmdjpeg"}.get(ts, "dcmconv")
        args = [tool, path, out] if tool != "dcmconv" else [tool, "+te", path, out]
        if run(*args).returncode:
            return None
        ds = pydicom.dcmread(out)
        return bytes(ds.PixelData) if "PixelData" in ds else None


def frame_bytes(ds):
    n = int(getattr(ds, "NumberOfFrames", 1) or 1)
    return ds.Rows * ds.Columns * ds.SamplesPerPixel * ds.BitsAllocated // 8, n


def oracle(path):
    """DCMTK's command-line verdict: (lossless JPEG-LS round trip works, compressed size)."""
    with tempfile.TemporaryDirectory() as d:
        c = os.path.join(d, "c.dcm")
        if run("dcmcjpls", path, c).returncode:
            return False, None
        before, after = pixels(path), pixels(c)
        return before is not None and before == after, os.path.getsize(c)


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def stored_files(root):
    return sorted(os.path.relpath(p, root) for p in glob.glob(os.path.join(root, "??/??/*.dcm")))


def decided_all(system):
    """Every instance has a decision for its current file and no job is pending."""
    open_ = system.sql(
        "SELECT count(*) FROM instances i WHERE NOT EXISTS (SELECT 1 FROM compression c WHERE "
        "c.sop_uid = i.sop_uid AND i.file_sha256 IN (c.before_sha256, c.after_sha256))")[0][0]
    pending = system.sql("SELECT count(*) FROM jobs WHERE state = 'pending'")[0][0]
    return open_ == 0 and pending == 0


def check_rows_match_files(system):
    """Each index row's file exists and has the row's size, digest and transfer syntax."""
    root = system.env["KP_STORAGE_ROOT"]
    rows = system.sql("SELECT sop_uid, path, file_size, file_sha256, transfer_syntax_uid "
                      "FROM instances")
    for sop, path, size, digest, ts in rows:
        p = os.path.join(root, path)
        assert os.path.exists(p), (sop, path)
        assert os.path.getsize(p) == size, (sop, path)
        assert sha256(p) == digest, (sop, path)
        assert str(pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID) == ts
    return rows


# ---- part 1: pydicom's test files -----------------------------------------------------------

@pytest.fixture(scope="module")
def corpus(cluster, tmp_path_factory):
    """(system, {sop: source file}, {sop: oracle verdict}) once everything is decided."""
    d = tmp_path_factory.mktemp("compress-corpus")
    sources = {}
    for i, f in enumerate(sorted(glob.glob(os.path.join(T, "*.dcm")))):
        dst = os.path.join(d, os.path.basename(f))
        shutil.copy(f, dst)
        sop = f"{UID_ROOT}.{i + 1}"
        if run("dcmodify", "-nb", "-ie", "-m", f"(0008,0018)={sop}", dst).returncode == 0:
            sources[sop] = dst
    s = kp.System(cluster, gateway=True, compressors=1, extra_env=COMPRESS_ENV)
    try:
        def send(item):
            sop, f = item
            return sop, s.storescu([f], extra=kp.storescu_flags(f))[1].get(f) == "ok"

        with concurrent.futures.ThreadPoolExecutor(4) as ex:
            sent = dict(ex.map(send, sources.items()))
        for sop in [sop for sop, ok in sent.items() if not ok]:  # once more, alone (a busy host)
            sent[sop] = send((sop, sources[sop]))[1]
        stored = {sop for (sop,) in s.sql("SELECT sop_uid FROM instances")}
        sources = {sop: f for sop, f in sources.items() if sent[sop] and sop in stored}
        assert len(sources) >= 40, len(sources)
        with concurrent.futures.ThreadPoolExecutor(4) as ex:
            verdicts = dict(zip(sources, ex.map(oracle, sources.values())))
        kp.wait_for(lambda: decided_all(s), 90, "a compression decision for every instance", 0.3)
        yield s, sources, verdicts
    finally:
        s.stop()


def decisions(system):
    rows = system.sql("SELECT c.sop_uid, c.outcome, c.reason, c.before_size, c.after_size, "
                      "i.file_size, i.transfer_syntax_uid, i.path FROM compression c JOIN "
                      "instances i ON i.sop_uid = c.sop_uid")
    return {r[0]: r[1:] for r in rows}


def test_every_instance_is_decided_with_a_reason(corpus):
    s, sources, _ = corpus
    dec = decisions(s)
    assert set(dec) == set(sources)
    compressed = [sop for sop, d in dec.items() if d[0] == "compressed"]
    assert len(compressed) >= 5, dec
    for sop, (outcome, reason, before, after, size, ts, path) in dec.items():
        name = os.path.basename(sources[sop])
        if outcome == "compressed":
            assert reason is None and ts == JLS and size == after < before, (name, dec[sop])
        else:
            assert reason in REASONS, (name, reason)
    by_name = {os.path.basename(sources[sop]): d for sop, d in dec.items()}
    for name in ("JPEG2000.dcm", "MR_small_jp2klossless.dcm", "SC_rgb_rle.dcm",
                 "MR_small_jpeg_ls_lossless.dcm"):
        if name in by_name:
            assert by_name[name][:2] == ("skipped", "already-compressed"), (name, by_name[name])
    for name in ("rtplan.dcm", "test-SR.dcm"):
        if name in by_name:
            assert by_name[name][:2] == ("skipped", "no-pixel-data"), (name, by_name[name])
    for name in ("rtdose.dcm", "liver_1frame.dcm"):
        if name in by_name:
            assert by_name[name][:2] == ("skipped", "unsupported-bit-depth"), by_name[name]


def test_decisions_agree_with_dcmtk(corpus):
    """Every file DCMTK's tools compress losslessly and clearly smaller is compressed; nothing
    is compressed that DCMTK's own round trip does not reproduce."""
    s, sources, verdicts = corpus
    dec = decisions(s)
    for sop, (ok, size) in verdicts.items():
        name = os.path.basename(sources[sop])
        outcome = dec[sop][0]
        if ok and size < 0.95 * os.path.getsize(sources[sop]):
            assert outcome == "compressed", (name, dec[sop])
        if outcome == "compressed":
            assert ok, (name, "compressed although DCMTK's round trip differs")


def test_ct_and_mr_are_smaller(corpus):
    s, sources, _ = corpus
    dec = decisions(s)
    by_name = {os.path.basename(sources[sop]): (sop, d) for sop, d in dec.items()}
    for name in ("CT_small.dcm", "MR_small.dcm", "MR_small_implicit.dcm", "MR_small_expb.dcm"):
        assert name in by_name, f"{name} was not stored"
        sop, d = by_name[name]
        assert d[0] == "compressed", (name, d)
        assert d[4] < os.path.getsize(sources[sop]), (name, d)


def test_compressed_files_decode_to_the_original_pixels(corpus):
    s, sources, _ = corpus
    root = s.env["KP_STORAGE_ROOT"]
    check_rows_match_files(s)
    for sop, d in decisions(s).items():
        if d[0] != "compressed":
            continue
        stored = os.path.join(root, d[6])
        src = pydicom.dcmread(sources[sop], stop_before_pixels=True)
        size, n = frame_bytes(src)
        want, got = pixels(sources[sop]), pixels(stored)
        assert want is not None and got is not None, sources[sop]
        assert got[:size * n] == want[:size * n], sources[sop]
        # everything but the pixel data and the syntax is as received
        a, b = pydicom.dcmread(sources[sop]), pydicom.dcmread(stored)
        for elem in a:
            if elem.tag != 0x7FE00010:
                assert elem.tag in b and b[elem.tag].value == elem.value, (sources[sop], elem.tag)


def test_wado_frames_after_compression(corpus):
    """transfer-syntax=* gets the stored JPEG-LS frames; Explicit VR Little Endian gets the
    original pixels, frame by frame."""
    s, sources, _ = corpus
    for sop, d in decisions(s).items():
        if d[0] != "compressed":
            continue
        src = pydicom.dcmread(sources[sop], stop_before_pixels=True)
        size, n = frame_bytes(src)
        raw = pixels(sources[sop])
        url = (f"/dicom-web/studies/{src.StudyInstanceUID}/series/{src.SeriesInstanceUID}"
               f"/instances/{sop}/frames/")
        for k in range(1, min(n, 3) + 1):
            st, h, body = s.https("GET", url + str(k), {
                "Accept": "multipart/related; type=application/octet-stream; transfer-syntax=*"})
            assert st == 200, (sources[sop], body[:300])
            (hdrs, data), = multipart_strict(h["Content-Type"], body)
            assert hdrs["content-type"] == f"image/jls; transfer-syntax={JLS}", hdrs
            assert data[:2] == b"\xff\xd8", sources[sop]  # a JPEG-LS codestream (SOI)
            st, h, body = s.https("GET", url + str(k), {
                "Accept": f"multipart/related; type=application/octet-stream; "
                          f"transfer-syntax={ELE}"})
            assert st == 200, (sources[sop], body[:300])
            (hdrs, data), = multipart_strict(h["Content-Type"], body)
            assert hdrs["content-type"] == f"application/octet-stream; transfer-syntax={ELE}"
            assert data == raw[(k - 1) * size:k * size], (sources[sop], k)


def test_originals_are_removed_and_storage_matches_the_index(corpus):
    s, _, _ = corpus
    kp.wait_for(lambda: not s.sql("SELECT 1 FROM storage_orphans WHERE not_before <= now()"),
                30, "replaced files removed")
    root = s.env["KP_STORAGE_ROOT"]
    for (before,) in s.sql("SELECT before_path FROM compression WHERE outcome = 'compressed'"):
        assert not os.path.exists(os.path.join(root, before)), before
    referenced = {p for (p,) in s.sql("SELECT path FROM instances")}
    registered = {p for (p,) in s.sql("SELECT path FROM storage_orphans")}  # none expected
    assert set(stored_files(root)) <= referenced | registered
    assert referenced <= set(stored_files(root))


def test_pacsctl_stats_shows_bytes_before_and_after(corpus):
    s, _, _ = corpus
    n, before, after = s.sql("SELECT count(*), sum(before_size), sum(after_size) FROM "
                             "compression WHERE outcome = 'compressed'")[0]
    out = s.pacsctl("stats").stdout
    m = re.search(r"compressed\s+(\d+) instances: (\d+) bytes before, (\d+) bytes after", out)
    assert m, out
    assert tuple(map(int, m.groups())) == (n, before, after), out
    assert "ratio" in out and "skipped" in out
    for (reason,) in s.sql("SELECT DISTINCT reason FROM compression WHERE outcome = 'skipped'"):
        assert re.search(rf"^\s+{re.escape(reason)}\s+\d+$", out, re.M), (reason, out)


def test_policy_filters_and_jpeg_lossless_target(cluster):
    """compress.modalities selects what is compressed; compress.target jpeg-lossless gives JPEG
    lossless SV1, and those frames still decode to the original pixels."""
    env = dict(COMPRESS_ENV, KP_COMPRESS_MODALITIES="CT", KP_COMPRESS_TARGET="jpeg-lossless")
    s = kp.System(cluster, compressors=1, extra_env=env)
    try:
        ct, mr = os.path.join(T, "CT_small.dcm"), os.path.join(T, "MR_small.dcm")
        s.send_each([ct, mr])
        ct_uid = pydicom.dcmread(ct, stop_before_pixels=True).SOPInstanceUID
        mr_uid = pydicom.dcmread(mr, stop_before_pixels=True).SOPInstanceUID
        kp.wait_for(lambda: s.sql("SELECT outcome FROM compression WHERE sop_uid = %s",
                                  (ct_uid,)), 30, "the CT decided")
        rows = check_rows_match_files(s)
        ts = {r[0]: r[4] for r in rows}
        assert ts[ct_uid] == "1.2.840.10008.1.2.4.70"
        assert ts[mr_uid] == ELE
        path = os.path.join(s.env["KP_STORAGE_ROOT"], [r[1] for r in rows if r[0] == ct_uid][0])
        assert pixels(path) == pixels(ct)
        time.sleep(2.5)  # two more scans: the MR is never queued
        assert not s.sql("SELECT 1 FROM compression WHERE sop_uid = %s", (mr_uid,))
        assert not s.sql("SELECT 1 FROM jobs WHERE type = 'compress' AND payload->>'sop' = %s",
                         (mr_uid,))
        assert re.search(r"not decided yet\s+1 instances", s.pacsctl("stats").stdout)
    finally:
        s.stop()


# ---- part 2: kill -9 while compressing ------------------------------------------------------

def write_ct_series(outdir, n):
    """n small CT-like images (12-bit, smooth with noise: they compress like CT)."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:64, 0:64]
    files = []
    for i in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        meta.MediaStorageSOPInstanceUID = f"{UID_ROOT}.500.1.{i + 1}"
        meta.TransferSyntaxUID = ELE
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = f"{UID_ROOT}.500"
        ds.SeriesInstanceUID = f"{UID_ROOT}.500.1"
        ds.PatientName, ds.PatientID, ds.Modality = "Kill^Nine", "K9", "CT"
        ds.InstanceNumber = i + 1
        ds.Rows = ds.Columns = 64
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        img = 1000 + 800 * np.sin((xx + i) / 9.0) * np.cos(yy / 7.0) + rng.normal(0, 6, (64, 64))
        ds.PixelData = np.clip(img, 0, 4095).astype(np.uint16).tobytes()
        ds.is_little_endian, ds.is_implicit_VR = True, False
        path = os.path.join(outdir, f"ct{i:03d}.dcm")
        ds.save_as(path, write_like_original=False)
        files.append(path)
    return files


def test_kill_9_during_compression_loses_nothing(cluster, tmp_path):
    s = kp.System(cluster, extra_env=COMPRESS_ENV)
    try:
        files = write_ct_series(str(tmp_path), 500)
        originals = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID: f for f in files}
        rc, res, out = s.storescu(files)
        assert all(res.get(f) == "ok" for f in files), out[-2000:]
        s.wait_indexed(500)
        rnd = random.Random(6)
        kills = 0
        for _ in range(8):
            s.start("pacs-compressor")
            time.sleep(rnd.uniform(0.3, 1.5))
            s.kill("pacs-compressor", signal.SIGKILL)
            kills += 1
            # between two lives: the index and the disk agree, whatever the moment of death
            check_rows_match_files(s)
            done = s.sql("SELECT count(*) FROM compression WHERE outcome = 'compressed'")[0][0]
            if done == 500:
                break
        assert kills >= 2
        s.start("pacs-compressor")
        kp.wait_for(lambda: decided_all(s), 90, "every instance decided after the kills", 0.3)
        rows = check_rows_match_files(s)
        assert len(rows) == 500
        assert {r[4] for r in rows} == {JLS}, "not every instance ended compressed"
        outcomes = s.sql("SELECT outcome, count(*) FROM compression GROUP BY outcome")
        assert outcomes == [("compressed", 500)], outcomes
        # each file is the compressed copy whose round trip the compressor checked ...
        verified = dict(s.sql("SELECT sop_uid, after_sha256 FROM compression"))
        assert all(verified[r[0]] == r[3] for r in rows)
        # ... and decodes to the pixels that were sent (checked here for a sample, with DCMTK)
        root = s.env["KP_STORAGE_ROOT"]

        def same(row):
            sop, path = row[0], row[1]
            want = bytes(pydicom.dcmread(originals[sop]).PixelData)
            return sop, pixels(os.path.join(root, path)) == want

        with concurrent.futures.ThreadPoolExecutor(4) as ex:
            bad = [sop for sop, ok in ex.map(same, rnd.sample(rows, 60)) if not ok]
        assert not bad, bad[:5]
        # the replaced originals are removed; a copy a kill interrupted before its switch is
        # still registered (removed when its write lease ends): no file is untracked
        kp.wait_for(lambda: not s.sql("SELECT 1 FROM storage_orphans WHERE not_before <= now()"),
                    30, "replaced originals removed")
        referenced = {r[1] for r in rows}
        registered = {p for (p,) in s.sql("SELECT path FROM storage_orphans")}
        assert not referenced & registered
        assert set(stored_files(root)) <= referenced | registered
        assert referenced <= set(stored_files(root))
        assert not s.sql("SELECT id FROM jobs WHERE type = 'compress' AND state <> 'done'")
    finally:
        s.stop()


# ---- part 3: the same instance sent again after it was compressed ---------------------------
#
# The stored original is gone once its compressed copy took its place, so a second copy can no
# longer be compared with the file at the instance's storage path: the compressor leaves a small
# note of the original's size and SHA-256 there instead (kp_storage_original_*), and the ingest
# recognises an identical copy by it and applies storage.duplicate_policy to a different one.

def write_ct(path, sop, name="Dup^Check", series="1"):
    """One small CT image (12 bits, smooth: it compresses) with the given SOP Instance UID."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    yy, xx = np.mgrid[0:64, 0:64]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ELE
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, sop
    ds.StudyInstanceUID = f"{UID_ROOT}.600"
    ds.SeriesInstanceUID = f"{UID_ROOT}.600.{series}"
    ds.PatientName, ds.PatientID, ds.Modality = name, "DUP1", "CT"
    ds.InstanceNumber = 1
    ds.Rows = ds.Columns = 64
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    img = 1000 + 800 * np.sin(xx / 9.0) * np.cos(yy / 7.0)
    ds.PixelData = np.clip(img, 0, 4095).astype(np.uint16).tobytes()
    ds.is_little_endian, ds.is_implicit_VR = True, False
    ds.save_as(str(path), write_like_original=False)
    return str(path)


def canonical(system, sop):
    """The instance's own storage path (kp_storage_relpath: the SHA-256 of its UID)."""
    h = hashlib.sha256(sop.encode()).hexdigest()
    return os.path.join(system.env["KP_STORAGE_ROOT"], h[:2], h[2:4], h + ".dcm")


def instance_row(system, sop):
    rows = system.sql("SELECT path, file_size, file_sha256, transfer_syntax_uid, updated_at, "
                      "metadata->'00100010'->'Value'->0->>'Alphabetic' FROM instances WHERE "
                      "sop_uid = %s", (sop,))
    return rows[0] if rows else None


def index_jobs(system, sop):
    return system.sql("SELECT count(*) FROM jobs WHERE type = 'index' AND payload->>'sop' = %s",
                      (sop,))[0][0]


def wait_compressed(system, sop, timeout=60):
    """Waits until sop is indexed at its compressed copy and the original is removed; returns
    the index row."""
    def done():
        row = instance_row(system, sop)
        dec = system.sql("SELECT after_sha256 FROM compression WHERE sop_uid = %s AND outcome = "
                         "'compressed'", (sop,))
        due = system.sql("SELECT 1 FROM storage_orphans WHERE not_before <= now()")
        return (row if row and dec and dec[0][0] == row[2] and row[3] == JLS and not due
                and not os.path.exists(canonical(system, sop)) else None)
    return kp.wait_for(done, timeout, f"{sop} compressed and its original removed", 0.2)


def store_status(output):
    """The DIMSE status codes of the C-STORE responses in storescu -d output (-d prints no
    "(Success)" after "Received Store Response", so kp.parse_storescu cannot tell)."""
    return [s.upper() for s in kp._STATUS.findall(output)]


def stow_post(system, data):
    """POSTs one Part 10 file with STOW-RS; returns (status, response JSON)."""
    import json
    b = "KlinikaDupCheck-7f3a"
    body = (f"--{b}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data +
            f"\r\n--{b}--\r\n".encode())
    st, _, raw = system.https("POST", "/dicom-web/studies", {
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={b}',
        "Accept": "application/dicom+json"}, body, timeout=60)
    return st, json.loads(raw or b"{}")


def settle(system):
    system.wait_jobs_settled()
    time.sleep(2.5)  # two compressor passes (scan_interval 1 s): what they would do is done


def test_identical_copy_after_compression_is_recognised(cluster, tmp_path):
    """C-STORE and STOW-RS of the very bytes received before: success, nothing written, the
    index row still points to the compressed copy, no index job, no second file."""
    s = kp.System(cluster, gateway=True, compressors=1, extra_env=COMPRESS_ENV)
    try:
        root = s.env["KP_STORAGE_ROOT"]
        a_sop, b_sop = f"{UID_ROOT}.600.1.1", f"{UID_ROOT}.600.1.2"
        a = write_ct(tmp_path / "a.dcm", a_sop)
        b = write_ct(tmp_path / "b.dcm", b_sop)
        rc, res, out = s.storescu([a])
        assert res.get(a) == "ok", out[-2000:]
        st, doc = stow_post(s, open(b, "rb").read())
        assert st == 200, doc
        a_row, b_row = wait_compressed(s, a_sop), wait_compressed(s, b_sop)
        assert stored_files(root) == sorted([a_row[0], b_row[0]])
        a_jobs, b_jobs = index_jobs(s, a_sop), index_jobs(s, b_sop)
        assert (a_jobs, b_jobs) == (1, 1)

        # C-STORE of the same file again: the archive receives the same bytes as the first time
        rc, res, out = s.storescu([a], extra=["-d"])  # -d: the status code is printed
        assert store_status(out) == ["0000"], out[-2000:]
        # STOW-RS of the same part again
        st, doc = stow_post(s, open(b, "rb").read())
        assert st == 200, doc
        assert "00081198" not in doc, doc  # no FailedSOPSequence
        refs = [i["00081155"]["Value"][0] for i in doc["00081199"]["Value"]]
        assert refs == [b_sop], doc
        settle(s)

        assert instance_row(s, a_sop) == a_row
        assert instance_row(s, b_sop) == b_row
        assert (index_jobs(s, a_sop), index_jobs(s, b_sop)) == (1, 1)
        assert not os.path.exists(canonical(s, a_sop))
        assert not os.path.exists(canonical(s, b_sop))
        assert stored_files(root) == sorted([a_row[0], b_row[0]])
        assert s.sql("SELECT count(*) FROM compression WHERE outcome = 'compressed'")[0][0] == 2
        assert not s.sql("SELECT 1 FROM storage_orphans")
        check_rows_match_files(s)
        assert "identical copy already stored" in s.log("pacs-dicomd")
        # reindex from storage still finds exactly the two compressed copies (not the notes)
        s.pacsctl("reindex")
        assert s.count("instances") == 2
        assert instance_row(s, a_sop)[:4] == a_row[:4]
        assert instance_row(s, b_sop)[:4] == b_row[:4]
        # a backup holds the notes too (it copies every stored file), and verifies
        notes = sorted(glob.glob(os.path.join(root, "??/??/*.orig")))
        assert [os.path.basename(n) for n in notes] == sorted(
            os.path.basename(canonical(s, x))[:-4] + ".orig" for x in (a_sop, b_sop))
        key, dest = str(tmp_path / "backup.key"), str(tmp_path / "backups")
        s.pacsctl("backup", "keygen", key)
        s.env["KP_BACKUP_KEY_FILE"] = key
        out = s.pacsctl("backup", dest).stdout
        snap = re.search(r"^snapshot: (\S+)$", out, re.M).group(1)
        assert len(glob.glob(os.path.join(dest, "objects", "*", "*"))) == 4  # 2 copies, 2 notes
        s.pacsctl("backup", "verify", snap, "--no-scratch")
        # instances compressed before notes existed get theirs from the compressor, once
        s.kill("pacs-compressor#0", signal.SIGTERM)
        for n in notes:
            os.unlink(n)
        os.unlink(os.path.join(root, ".original-notes"))
        s.start("pacs-compressor#0", "pacs-compressor")
        kp.wait_for(lambda: sorted(glob.glob(os.path.join(root, "??/??/*.orig"))) == notes, 30,
                    "the notes written again")
        assert "2 original note(s) written" in s.log("pacs-compressor#0")
        rc, res, out = s.storescu([a])
        assert res.get(a) == "ok", out[-2000:]
        settle(s)
        assert instance_row(s, a_sop)[:4] == a_row[:4]
        assert stored_files(root) == sorted([a_row[0], b_row[0]])
    finally:
        s.stop()


def test_identical_copy_within_the_unlink_grace(cluster, tmp_path):
    """While the replaced original still waits for its removal, an identical copy does not put
    the index back on it: the compressed copy stays the instance and the original is removed."""
    env = dict(COMPRESS_ENV, KP_COMPRESS_UNLINK_GRACE="4")
    s = kp.System(cluster, compressors=1, extra_env=env)
    try:
        sop = f"{UID_ROOT}.600.2.1"
        f = write_ct(tmp_path / "g.dcm", sop, series="2")
        rc, res, out = s.storescu([f])
        assert res.get(f) == "ok", out[-2000:]
        row = kp.wait_for(lambda: (lambda r: r if r and r[3] == JLS else None)(
            instance_row(s, sop)), 60, "compressed")
        assert os.path.exists(canonical(s, sop))  # the original, registered for removal
        rc, res, out = s.storescu([f])
        assert res.get(f) == "ok", out[-2000:]
        s.wait_jobs_settled()
        assert instance_row(s, sop) == row
        assert index_jobs(s, sop) == 1
        kp.wait_for(lambda: not os.path.exists(canonical(s, sop)), 30, "the original removed")
        time.sleep(1.5)
        assert instance_row(s, sop) == row
        assert stored_files(s.env["KP_STORAGE_ROOT"]) == [row[0]]
        check_rows_match_files(s)
    finally:
        s.stop()


def modified(src, dst, name):
    ds = pydicom.dcmread(src)
    ds.PatientName = name
    ds.save_as(str(dst), write_like_original=False)
    return str(dst)


@pytest.mark.parametrize("policy", ["reject", "keep", "replace"])
def test_different_copy_after_compression_follows_the_policy(cluster, tmp_path, policy):
    """Another data set with the UID of a compressed instance: reject refuses it (0111, the
    same reason as before compression), keep acknowledges it and keeps the compressed one,
    replace stores it, indexes it (it is compressed in turn) and retires the old copy."""
    env = dict(COMPRESS_ENV, KP_STORAGE_DUPLICATE_POLICY=policy)
    s = kp.System(cluster, compressors=1, extra_env=env)
    try:
        root = s.env["KP_STORAGE_ROOT"]
        sop = f"{UID_ROOT}.600.3.1"
        f = write_ct(tmp_path / "o.dcm", sop, name="Dup^Original", series="3")
        g = modified(f, tmp_path / "m.dcm", "Dup^Modified")
        rc, res, out = s.storescu([f])
        assert res.get(f) == "ok", out[-2000:]
        row = wait_compressed(s, sop)
        assert row[5] == "Dup^Original"
        old = row[0]

        rc, res, out = s.storescu([g], extra=["-d"])
        if policy == "reject":
            assert store_status(out) == ["0111"], out[-2000:]
            assert "refused (policy reject)" in s.log("pacs-dicomd")
        else:
            assert store_status(out) == ["0000"], out[-2000:]
        settle(s)
        if policy in ("reject", "keep"):
            assert instance_row(s, sop) == row
            assert index_jobs(s, sop) == 1
            assert stored_files(root) == [old]
            assert not os.path.exists(canonical(s, sop))
        else:
            # the new data set is the instance now, compressed in its turn ...
            new = wait_compressed(s, sop)
            assert new[5] == "Dup^Modified"
            assert new[0] != old
            # ... and the first compressed copy is retired, not left behind
            kp.wait_for(lambda: stored_files(root) == [new[0]], 30, "the old copy removed")
            assert not s.sql("SELECT 1 FROM storage_orphans WHERE path = %s", (old,))
            # the first data set again is a different one now: it replaces in turn
            rc, res, out = s.storescu([f])
            assert res.get(f) == "ok", out[-2000:]
            s.wait_jobs_settled()
            last = wait_compressed(s, sop)
            assert last[5] == "Dup^Original"
            kp.wait_for(lambda: stored_files(root) == [last[0]], 30, "the second copy removed")
        check_rows_match_files(s)
    finally:
        s.stop()
