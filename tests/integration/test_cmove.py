"""C-MOVE and C-GET SCP against the real daemon, with DCMTK's movescu, getscu and storescp.

A System ingests pydicom's CT_small and MR_small_jpeg_ls_lossless (JPEG-LS), a JPEG 2000 copy of
MR_small under new UIDs (we cannot decode JPEG 2000), and synthetic studies (one of 300
instances for C-CANCEL). Destinations are real storescp processes registered with
`pacsctl ae add`; what arrives is compared with the stored files (data set bytes when nothing was
transcoded, pixel data when it was)."""
import concurrent.futures
import os
import re
import shutil
import subprocess
import tempfile
import time

import pydicom
import pytest

import datasets
import kp

ROOT = "1.2.826.0.1.3680043.10.1411.99"
TF = os.path.join(kp.PYDICOM_DATA, "test_files")
CT_SMALL = os.path.join(TF, "CT_small.dcm")
MR_JLS = os.path.join(TF, "MR_small_jpeg_ls_lossless.dcm")
MR_SMALL = os.path.join(TF, "MR_small.dcm")
MR_J2K = os.path.join(TF, "MR_small_jp2klossless.dcm")
BULK = 300

STUDIES = {
    "S1": dict(name="MOVE^ONE", pid="MV-001", date="20200101", time="101500", acc="MVA-1",
               desc="two series", ref="", birth="19700101", sex="M",
               series=[("CT", 1, "Axial", [1, 2, 3]), ("MR", 2, "T1", [1, 2])]),
    "S2": dict(name="MOVE^BULK", pid="MV-002", date="20200202", time="090000", acc="MVA-2",
               desc="many", ref="", birth="", sex="F",
               series=[("CT", 1, "Bulk", list(range(1, BULK + 1)))]),
}
_DATA = datasets.Studies(ROOT, STUDIES)
J2K_STUDY = ROOT + ".77"
J2K_SOP = ROOT + ".77.1.1"


def _ds_bytes(path):
    """The data set of a Part 10 file as stored, without preamble and meta header."""
    with open(path, "rb") as f:
        raw = f.read()
    assert raw[128:132] == b"DICM", path
    assert raw[132:136] == b"\x02\x00\x00\x00", path  # (0002,0000) group length first
    meta_len = int.from_bytes(raw[140:144], "little")
    return raw[144 + meta_len:]


class Dest:
    """A storescp on a free loopback port, writing bit-preserving into its own directory."""

    def __init__(self, env, aet, opts=("+xa", "+B")):
        self.aet = aet
        self.dir = tempfile.mkdtemp(prefix="kp-dest-")
        self.out = os.path.join(self.dir, "in")
        os.makedirs(self.out)
        self.port = kp.free_port()
        self.env = env
        self.log = open(os.path.join(self.dir, "storescp.log"), "wb")
        self.p = subprocess.Popen(["storescp", "-aet", aet, "-od", self.out, *opts,
                                   str(self.port)], env=env, stdout=self.log,
                                  stderr=subprocess.STDOUT)
        kp.wait_for(self._echo, 20, f"storescp {aet}")

    def _echo(self):
        r = subprocess.run(["echoscu", "-aec", self.aet, "127.0.0.1", str(self.port)],
                           capture_output=True, env=self.env, timeout=20)
        return r.returncode == 0

    def files(self):
        """{SOPInstanceUID: path} of everything received so far."""
        got = {}
        for f in os.listdir(self.out):
            p = os.path.join(self.out, f)
            got[str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)] = p
        return got

    def clear(self):
        for f in os.listdir(self.out):
            os.unlink(os.path.join(self.out, f))

    def stop(self):
        self.p.terminate()
        self.p.wait(timeout=20)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def qr(cluster):
    s = kp.System(cluster, gateway=True)  # the gateway: STOW-RS stores bytes as they come
    dests = {}
    try:
        with tempfile.TemporaryDirectory() as d:
            files = _DATA.write(d)
            rc, res, out = s.storescu(files)
            assert all(res.get(f) == "ok" for f in files), out[-3000:]
            j2k = pydicom.dcmread(MR_J2K)
            j2k.SOPInstanceUID = j2k.file_meta.MediaStorageSOPInstanceUID = J2K_SOP
            j2k.StudyInstanceUID = J2K_STUDY
            j2k.SeriesInstanceUID = J2K_STUDY + ".1"
            j2k_path = os.path.join(d, "j2k.dcm")
            j2k.save_as(j2k_path, write_like_original=True)
            # a second, uncompressed instance in the same JPEG 2000 series
            plain = pydicom.dcmread(MR_SMALL)
            plain.SOPInstanceUID = plain.file_meta.MediaStorageSOPInstanceUID = J2K_SOP + "2"
            plain.StudyInstanceUID = J2K_STUDY
            plain.SeriesInstanceUID = J2K_STUDY + ".1"
            plain_path = os.path.join(d, "plain.dcm")
            plain.save_as(plain_path, write_like_original=True)
            s.send_each([CT_SMALL, MR_JLS, j2k_path, plain_path])
            s.wait_indexed(len(files) + 4)
        s.pacsctl("ae", "add", "MOVESCU", "--host", "127.0.0.1", "--port", "104")
        s.pacsctl("ae", "add", "GETSCU", "--host", "127.0.0.1", "--port", "104")
        s.pacsctl("ae", "add", "FINDSCU", "--host", "127.0.0.1", "--port", "104")
        dests["DEST"] = Dest(s.env, "DEST")
        dests["IMPLONLY"] = Dest(s.env, "IMPLONLY", ("+xi", "+B"))
        for aet, d in dests.items():
            s.pacsctl("ae", "add", aet, "--host", "127.0.0.1", "--port", str(d.port))
        s.pacsctl("ae", "add", "NORETRIEVE", "--host", "127.0.0.1",
                  "--port", str(dests["DEST"].port), "--no-retrieve")
        s.dests = dests
        yield s
    finally:
        for d in dests.values():
            d.stop()
        s.stop()


# ---- movescu / getscu ------------------------------------------------------------------------
_STATUS = re.compile(r"DIMSE Status\s*:\s*0x([0-9a-fA-F]{4})")
_COUNTS = re.compile(r"Completed Suboperations\s*:\s*(\d+|none)", re.I)
_FAILED = re.compile(r"Failed Suboperations\s*:\s*(\d+|none)", re.I)
_FAILED_LIST = re.compile(r"\(0008,0058\) UI \[(.*?)\]")


def _parse(out):
    statuses = _STATUS.findall(out)
    assert statuses, out[-3000:]

    def last(rx):
        v = rx.findall(out)
        return 0 if not v or v[-1].lower() == "none" else int(v[-1])
    failed_list = _FAILED_LIST.findall(out)
    return dict(status=int(statuses[-1], 16), completed=last(_COUNTS), failed=last(_FAILED),
                failed_uids=failed_list[-1].split("\\") if failed_list else [],
                pending=sum(1 for s in statuses[:-1] if s.lower() == "ff00"), out=out)


def movescu(system, keys, dest="DEST", aet="MOVESCU", model="-S", extra=(), timeout=300):
    cmd = ["movescu", "-d", "-aet", aet, "-aec", "KLINIKA", "-aem", dest, model, *extra]
    for k in keys:
        cmd += ["-k", k]
    cmd += ["127.0.0.1", str(system.port)]
    r = subprocess.run(cmd, capture_output=True, timeout=timeout, env=system.env)
    return _parse((r.stdout + r.stderr).decode("utf-8", "replace"))


def getscu(system, keys, outdir, aet="GETSCU", model="-S", extra=(), timeout=300):
    cmd = ["getscu", "-d", "-aet", aet, "-aec", "KLINIKA", model, "-od", outdir, *extra]
    for k in keys:
        cmd += ["-k", k]
    cmd += ["127.0.0.1", str(system.port)]
    r = subprocess.run(cmd, capture_output=True, timeout=timeout, env=system.env)
    return _parse((r.stdout + r.stderr).decode("utf-8", "replace"))


def stored(system, where, *args):
    """{sop_uid: (absolute path, transfer syntax)} of the indexed instances matching where."""
    root = system.env["KP_STORAGE_ROOT"]
    rows = system.sql("SELECT i.sop_uid, i.path, i.transfer_syntax_uid FROM instances i "
                      "JOIN series se ON se.pk = i.series_pk JOIN studies st ON "
                      "st.pk = se.study_pk WHERE " + where, args)
    return {u: (os.path.join(root, p), ts) for u, p, ts in rows}


def assert_same_as_stored(system, got, expect):
    assert set(got) == set(expect), (sorted(got), sorted(expect))
    for uid, (path, ts) in expect.items():
        rx = pydicom.dcmread(got[uid])
        if str(rx.file_meta.TransferSyntaxUID) == ts:
            assert _ds_bytes(got[uid]) == _ds_bytes(path), uid
        else:
            assert rx.PixelData == pydicom.dcmread(path).PixelData, uid


# ---- C-MOVE ----------------------------------------------------------------------------------
def test_move_study_root_study_level(qr):
    dest = qr.dests["DEST"]
    dest.clear()
    uid = _DATA.study_uid("S1")
    r = movescu(qr, ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={uid}"])
    assert r["status"] == 0, r["out"][-3000:]
    assert r["completed"] == 5 and r["failed"] == 0
    assert r["pending"] >= 4  # one Pending response per sub-operation but the last
    assert_same_as_stored(qr, dest.files(), stored(qr, "st.study_uid = %s", uid))


def test_move_patient_root_several_studies_as_stored(qr):
    """Patient Root, STUDY level with a list of Study UIDs: the JPEG-LS instance goes as it is
    stored (the destination accepts every syntax), byte for byte."""
    dest = qr.dests["DEST"]
    dest.clear()
    mr, ct = pydicom.dcmread(MR_JLS), pydicom.dcmread(CT_SMALL)
    r = movescu(qr, ["QueryRetrieveLevel=STUDY", f"PatientID={mr.PatientID}",
                     f"StudyInstanceUID={mr.StudyInstanceUID}"], model="-P")
    assert r["status"] == 0 and r["completed"] == 1, r["out"][-3000:]
    got = dest.files()
    rx = pydicom.dcmread(got[str(mr.SOPInstanceUID)])
    assert rx.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.80"
    assert_same_as_stored(qr, got, stored(qr, "st.study_uid = %s", str(mr.StudyInstanceUID)))
    dest.clear()
    # Study Root, a list of two studies
    r = movescu(qr, ["QueryRetrieveLevel=STUDY",
                     f"StudyInstanceUID={mr.StudyInstanceUID}\\{ct.StudyInstanceUID}"])
    assert r["status"] == 0 and r["completed"] == 2, r["out"][-3000:]
    assert_same_as_stored(qr, dest.files(), stored(
        qr, "st.study_uid IN (%s, %s)", str(mr.StudyInstanceUID), str(ct.StudyInstanceUID)))


def test_move_series_and_image_levels(qr):
    dest = qr.dests["DEST"]
    dest.clear()
    st, se = _DATA.study_uid("S1"), _DATA.series_uid("S1", 1)
    r = movescu(qr, ["QueryRetrieveLevel=SERIES", f"StudyInstanceUID={st}",
                     f"SeriesInstanceUID={se}"])
    assert r["status"] == 0 and r["completed"] == 2, r["out"][-3000:]
    assert set(dest.files()) == {_DATA.sop_uid("S1", 1, 1), _DATA.sop_uid("S1", 1, 2)}
    dest.clear()
    sops = [_DATA.sop_uid("S1", 0, 1), _DATA.sop_uid("S1", 0, 3)]
    r = movescu(qr, ["QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={st}",
                     f"SeriesInstanceUID={_DATA.series_uid('S1', 0)}",
                     "SOPInstanceUID=" + "\\".join(sops)])
    assert r["status"] == 0 and r["completed"] == 2, r["out"][-3000:]
    assert set(dest.files()) == set(sops)


def test_move_transcodes_jpeg_ls_for_implicit_only_destination(qr):
    dest = qr.dests["IMPLONLY"]
    dest.clear()
    mr = pydicom.dcmread(MR_JLS)
    r = movescu(qr, ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={mr.StudyInstanceUID}"],
                dest="IMPLONLY")
    assert r["status"] == 0 and r["completed"] == 1, r["out"][-3000:]
    rx = pydicom.dcmread(dest.files()[str(mr.SOPInstanceUID)])
    assert rx.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2"
    assert rx.PixelData == pydicom.dcmread(MR_SMALL).PixelData
    assert rx.SOPInstanceUID == mr.SOPInstanceUID


def test_move_partial_failure_reports_failed_uids(qr):
    """JPEG 2000 cannot be decoded here: to an Implicit-only destination that instance fails
    (B000 with its UID in the Failed SOP Instance UID List), the other one arrives."""
    dest = qr.dests["IMPLONLY"]
    dest.clear()
    r = movescu(qr, ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={J2K_STUDY}"],
                dest="IMPLONLY")
    assert r["status"] == 0xB000, r["out"][-3000:]
    assert r["completed"] == 1 and r["failed"] == 1
    assert r["failed_uids"] == [J2K_SOP]
    assert set(dest.files()) == {J2K_SOP + "2"}
    dest.clear()
    r = movescu(qr, ["QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={J2K_STUDY}",
                     f"SeriesInstanceUID={J2K_STUDY}.1", f"SOPInstanceUID={J2K_SOP}"],
                dest="IMPLONLY")
    assert r["status"] == 0xA702 and r["failed"] == 1, r["out"][-3000:]  # all failed
    # to a destination that takes JPEG 2000, it goes as stored
    r = movescu(qr, ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={J2K_STUDY}"])
    assert r["status"] == 0 and r["completed"] == 2, r["out"][-3000:]


def test_move_destination_unknown(qr):
    uid = _DATA.study_uid("S1")
    for dest in ("NOSUCHAE", "NORETRIEVE"):
        r = movescu(qr, ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={uid}"], dest=dest)
        assert r["status"] == 0xA801, r["out"][-3000:]
        assert r["completed"] == 0


def test_move_destination_down(qr):
    dead = kp.free_port()
    qr.pacsctl("ae", "add", "DEADDEST", "--host", "127.0.0.1", "--port", str(dead))
    r = movescu(qr, ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={_DATA.study_uid('S1')}"],
                dest="DEADDEST")
    assert r["status"] == 0xA702 and r["failed"] == 5, r["out"][-3000:]


def test_move_bad_identifier(qr):
    r = movescu(qr, ["QueryRetrieveLevel=SERIES", f"StudyInstanceUID={_DATA.study_uid('S1')}"])
    assert r["status"] == 0xA900, r["out"][-3000:]
    r = movescu(qr, ["QueryRetrieveLevel=STUDY", "StudyInstanceUID=1.2.*"])
    assert r["status"] == 0xA900, r["out"][-3000:]
    r = movescu(qr, ["QueryRetrieveLevel=PATIENT", "PatientID=MV-001"])  # Study Root
    assert r["status"] == 0xA900, r["out"][-3000:]


def test_move_no_match_is_success(qr):
    r = movescu(qr, ["QueryRetrieveLevel=STUDY", "StudyInstanceUID=1.2.3.4.5.6.7"])
    assert r["status"] == 0 and r["completed"] == 0, r["out"][-3000:]


def test_unregistered_calling_ae_refused(qr):
    uid = _DATA.study_uid("S1")
    r = movescu(qr, ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={uid}"], aet="STRANGER")
    assert r["status"] == 0x0124, r["out"][-3000:]
    with tempfile.TemporaryDirectory() as d:
        r = getscu(qr, ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={uid}"], d,
                   aet="STRANGER")
        assert r["status"] == 0x0124, r["out"][-3000:]
        assert os.listdir(d) == []
    log = qr.log("pacs-dicomd")
    assert "C-MOVE from STRANGER" in log and "not a registered AE" in log


def test_move_cancel(qr):
    dest = qr.dests["DEST"]
    dest.clear()
    uid = _DATA.study_uid("S2")
    r = movescu(qr, ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={uid}"],
                extra=["--cancel", "5"])
    assert r["status"] == 0xFE00, r["out"][-3000:]
    assert 5 <= r["completed"] < BULK
    assert "Remaining Suboperations" in r["out"]
    assert "cancelled after" in qr.log("pacs-dicomd")


def test_move_large_study(qr):
    dest = qr.dests["DEST"]
    dest.clear()
    uid = _DATA.study_uid("S2")
    r = movescu(qr, ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={uid}"])
    assert r["status"] == 0 and r["completed"] == BULK, r["out"][-3000:]
    assert len(dest.files()) == BULK


def test_move_sends_the_stored_bytes_unchanged(qr):
    """An instance as a modality encoded it (here a sequence and its item of undefined length,
    which re-encoding would turn into defined lengths) reaches the destination byte for byte:
    the data set goes from the stored file to the network as it is. (It is stored with STOW-RS:
    storescu itself re-encodes sequences with defined lengths.)"""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    ds = pydicom.dcmread(CT_SMALL)
    uid = ROOT + ".88"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uid, uid + ".1"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid + ".1.1"
    item = Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = ROOT + ".88.9"
    item.is_undefined_length_sequence_item = True
    ds.ReferencedImageSequence = Sequence([item])
    ds["ReferencedImageSequence"].is_undefined_length = True
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "undefined.dcm")
        ds.save_as(path, write_like_original=True)
        sent = _ds_bytes(path)
        assert b"\x08\x00\x40\x11SQ\x00\x00\xff\xff\xff\xff" in sent  # undefined length
        with open(path, "rb") as f:
            data = f.read()
    b = "KlinikaCmoveRaw"
    st, _, body = qr.https("POST", "/dicom-web/studies", {
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={b}',
        "Accept": "application/dicom+json"},
        f"--{b}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data +
        f"\r\n--{b}--\r\n".encode(), timeout=60)
    assert st == 200, body[-2000:]
    kp.wait_for(lambda: stored(qr, "st.study_uid = %s", uid), 60, "the instance indexed")
    (spath, _), = stored(qr, "st.study_uid = %s", uid).values()
    assert _ds_bytes(spath) == sent  # stored as received
    dest = qr.dests["DEST"]
    dest.clear()
    r = movescu(qr, ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={uid}"])
    assert r["status"] == 0 and r["completed"] == 1, r["out"][-3000:]
    got = dest.files()
    assert _ds_bytes(got[uid + ".1.1"]) == sent


# ---- C-MOVE over several associations ---------------------------------------------------------
@pytest.fixture(scope="module")
def forking_dest(qr):
    """A storescp that serves every association in its own process (--fork), registered as
    PARDEST with --move-associations 4."""
    d = Dest(qr.env, "PARDEST", ("+xa", "+B", "--fork", "-v"))
    qr.pacsctl("ae", "add", "PARDEST", "--host", "127.0.0.1", "--port", str(d.port),
               "--move-associations", "4")
    yield d
    d.stop()


def _associations_received(dest):
    with open(os.path.join(dest.dir, "storescp.log"), "rb") as f:
        return f.read().count(b"Association Received")


def test_move_over_four_associations_as_stored(qr, forking_dest):
    dest = forking_dest
    dest.clear()
    before = _associations_received(dest)
    uids = [_DATA.study_uid("S1"), _DATA.study_uid("S2")]
    r = movescu(qr, ["QueryRetrieveLevel=STUDY", "StudyInstanceUID=" + "\\".join(uids)],
                dest="PARDEST")
    assert r["status"] == 0, r["out"][-3000:]
    assert r["completed"] == BULK + 5 and r["failed"] == 0 and r["pending"] >= 1
    # every instance arrived exactly once, byte for byte as stored
    assert_same_as_stored(qr, dest.files(), stored(qr, "st.study_uid IN (%s, %s)", *uids))
    assert len(os.listdir(dest.out)) == BULK + 5
    # ... over four associations: the destination saw them, and so did we
    kp.wait_for(lambda: _associations_received(dest) - before >= 4, 10, "storescp's log")
    assert _associations_received(dest) - before == 4
    assert re.search(r"C-MOVE from MOVESCU to PARDEST: 305 instance\(s\) over 4 association",
                     qr.log("pacs-dicomd"))


def test_move_over_several_associations_cancel(qr, forking_dest):
    dest = forking_dest
    dest.clear()
    uid = _DATA.study_uid("S2")
    r = movescu(qr, ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={uid}"], dest="PARDEST",
                extra=["--cancel", "3"])
    assert r["status"] == 0xFE00, r["out"][-3000:]
    assert 3 <= r["completed"] < BULK and r["failed"] == 0
    assert "Remaining Suboperations" in r["out"]
    # what was reported completed did arrive (the ones in flight at the cancel may be more)
    assert len(dest.files()) >= r["completed"]


def test_move_associations_to_a_one_at_a_time_destination(qr):
    """A destination that serves one association at a time (storescp without --fork) but is
    registered for 3: the extra associations wait unanswered, the first carries everything, the
    C-MOVE succeeds and every instance arrives once."""
    dest = qr.dests["DEST"]
    dest.clear()
    qr.pacsctl("ae", "add", "SERIALDEST", "--host", "127.0.0.1", "--port", str(dest.port),
               "--move-associations", "3")
    uid = _DATA.study_uid("S1")
    r = movescu(qr, ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={uid}"], dest="SERIALDEST")
    assert r["status"] == 0 and r["completed"] == 5 and r["failed"] == 0, r["out"][-3000:]
    assert_same_as_stored(qr, dest.files(), stored(qr, "st.study_uid = %s", uid))
    # the destination is usable right after (no association of ours left hanging on it)
    r = movescu(qr, ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={uid}"], dest="DEST")
    assert r["status"] == 0 and r["completed"] == 5, r["out"][-3000:]


# ---- C-GET -----------------------------------------------------------------------------------
def test_get_series_level(qr):
    st, se = _DATA.study_uid("S1"), _DATA.series_uid("S1", 0)
    with tempfile.TemporaryDirectory() as d:
        r = getscu(qr, ["QueryRetrieveLevel=SERIES", f"StudyInstanceUID={st}",
                        f"SeriesInstanceUID={se}"], d)
        assert r["status"] == 0 and r["completed"] == 3, r["out"][-3000:]
        got = {str(pydicom.dcmread(os.path.join(d, f)).SOPInstanceUID): os.path.join(d, f)
               for f in os.listdir(d)}
        assert_same_as_stored(qr, got, stored(qr, "se.series_uid = %s", se))


def test_get_transcodes_jpeg_ls(qr):
    """getscu proposes uncompressed syntaxes only: the JPEG-LS instance is decoded for it."""
    mr = pydicom.dcmread(MR_JLS)
    with tempfile.TemporaryDirectory() as d:
        r = getscu(qr, ["QueryRetrieveLevel=STUDY", f"PatientID={mr.PatientID}",
                        f"StudyInstanceUID={mr.StudyInstanceUID}"], d, model="-P")
        assert r["status"] == 0 and r["completed"] == 1, r["out"][-3000:]
        (f,) = os.listdir(d)
        rx = pydicom.dcmread(os.path.join(d, f))
        assert rx.SOPInstanceUID == mr.SOPInstanceUID
        assert not rx.file_meta.TransferSyntaxUID.is_compressed
        assert rx.PixelData == pydicom.dcmread(MR_SMALL).PixelData


# ---- concurrency -----------------------------------------------------------------------------
def test_sixteen_sessions_at_once(qr):
    """16 sessions (6 findscu, 5 movescu each to its own storescp, 5 getscu) held open at the
    same time with the default pool (dicom.max_associations = 16), proven without timings: the
    test locks the studies table, so every request waits in the database on its own association
    thread until all 16 are seen waiting there together (pg_stat_activity); a 17th association
    is refused meanwhile (the pool is full). Then the lock goes and every session must complete
    with exactly the expected identifiers or instances."""
    import psycopg2
    dests = {}
    held = None
    try:
        for i in range(5):
            aet = f"PAR{i}"
            dests[aet] = Dest(qr.env, aet)
            qr.pacsctl("ae", "add", aet, "--host", "127.0.0.1", "--port", str(dests[aet].port))
        uid = _DATA.study_uid("S1")
        series = {_DATA.series_uid("S1", i) for i in range(2)}
        getdirs = [tempfile.mkdtemp(prefix="kp-get-") for _ in range(5)]

        def move(aet):
            return movescu(qr, ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={uid}"],
                           dest=aet)

        def get(d):
            return getscu(qr, ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={uid}"], d)

        def find(i):
            model = "-P" if i % 2 else "-S"
            keys = ["QueryRetrieveLevel=SERIES", f"StudyInstanceUID={uid}", "SeriesInstanceUID"]
            if model == "-P":
                keys.insert(1, "PatientID=MV-001")
            cmd = ["findscu", "-v", "-aet", "FINDSCU", "-aec", "KLINIKA", model]
            for k in keys:
                cmd += ["-k", k]
            r = subprocess.run(cmd + ["127.0.0.1", str(qr.port)], capture_output=True,
                               timeout=120, env=qr.env)
            out = (r.stdout + r.stderr).decode("utf-8", "replace")
            got = set(re.findall(r"\(0020,000e\) UI \[([0-9.]+)\]", out.split("Find Response", 1)[-1]))
            return r.returncode, "Final Find Response (Success)" in out, got, out

        def waiting():
            return qr.sql("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                          "AND query ~ 'studies st'")[0][0]

        qr.wait_jobs_settled()
        held = psycopg2.connect(qr.dsn)
        held.cursor().execute("LOCK TABLE studies IN ACCESS EXCLUSIVE MODE")
        with concurrent.futures.ThreadPoolExecutor(16) as ex:
            finds = [ex.submit(find, i) for i in range(6)]
            moves = [ex.submit(move, a) for a in dests]
            gets = [ex.submit(get, d) for d in getdirs]
            kp.wait_for(lambda: waiting() >= 16, 60, "16 requests waiting at once")
            assert waiting() == 16
            assert not qr.echo(aet="SEVENTEEN")  # the pool is full: refused, not queued
            held.rollback()
            held.close()
            held = None
            for f in finds:
                rc, success, got, out = f.result()
                assert rc == 0 and success and got == series, out[-2000:]
            for f in moves:
                r = f.result()
                assert r["status"] == 0 and r["completed"] == 5, r["out"][-2000:]
            for f in gets:
                r = f.result()
                assert r["status"] == 0 and r["completed"] == 5, r["out"][-2000:]
        assert "16 associations already active" in qr.log("pacs-dicomd")
        expect = stored(qr, "st.study_uid = %s", uid)
        for d in dests.values():
            assert_same_as_stored(qr, d.files(), expect)
        for d in getdirs:
            got = {str(pydicom.dcmread(os.path.join(d, f)).SOPInstanceUID): os.path.join(d, f)
                   for f in os.listdir(d)}
            assert_same_as_stored(qr, got, expect)
            shutil.rmtree(d, ignore_errors=True)
    finally:
        if held is not None:
            held.close()
        for d in dests.values():
            d.stop()


def test_silent_and_trickling_peers_block_nobody(cluster):
    """A peer that connects and sends nothing, and one that sends its association request a few
    bytes at a time, do not hold up anyone else: while both are connected, C-ECHO and C-STORE on
    new associations complete at once (before dicom.acse_timeout, 12 s here, which is how long
    either peer could otherwise hold the accept loop); the silent one is then closed after
    acse_timeout, and the trickling one, once its request is complete, is served normally."""
    import socket
    s = kp.System(cluster, extra_env={"KP_DICOM_ACSE_TIMEOUT": "12"})
    silent = trickle = None
    try:
        silent = socket.create_connection(("127.0.0.1", s.port), timeout=30)
        trickle = socket.create_connection(("127.0.0.1", s.port), timeout=30)
        # a valid A-ASSOCIATE-RQ (Verification), sent in pieces
        pc = (b"\x20\x00\x00\x2e\x01\x00\x00\x00" + b"\x30\x00\x00\x11" + b"1.2.840.10008.1.1" +
              b"\x40\x00\x00\x11" + b"1.2.840.10008.1.2")
        app = b"\x10\x00\x00\x15" + b"1.2.840.10008.3.1.1.1"
        ui = b"\x50\x00\x00\x08" + b"\x51\x00\x00\x04\x00\x00\x40\x00"
        body = (b"\x00\x01\x00\x00" + b"KLINIKA".ljust(16) + b"TRICKLE".ljust(16) + b"\x00" * 32 +
                app + pc + ui)
        rq = b"\x01\x00" + len(body).to_bytes(4, "big") + body
        trickle.sendall(rq[:7])
        t0 = time.monotonic()
        assert s.echo(aet="WHILEWAITING")
        rc, res, out = s.storescu([CT_SMALL], aet="WHILEWAITING2")
        assert res[CT_SMALL] == "ok", out
        assert time.monotonic() - t0 < 10, "served only after a blocked peer timed out"
        trickle.sendall(rq[7:40])
        assert s.echo(aet="STILLFINE")
        trickle.sendall(rq[40:])
        ac = trickle.recv(6)
        assert ac[:1] == b"\x02", f"expected A-ASSOCIATE-AC, got {ac!r}"  # accepted
        # the silent peer is closed by the server once acse_timeout has passed
        silent.settimeout(20)
        assert silent.recv(1) == b""
        assert "no complete association request within 12 s" in s.log("pacs-dicomd")
    finally:
        for sock in (silent, trickle):
            if sock:
                sock.close()
        s.stop()
