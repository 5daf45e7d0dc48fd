"""C-FIND SCP (Patient Root and Study Root, FIND) against the real daemon, with DCMTK's findscu.

A System ingests pydicom's test and charset files plus generated studies with known names,
dates and modalities (and one large series), then queries every level of both models with each
matching type and compares the identifiers returned with what the index holds (SQL)."""
import os
import re
import subprocess
import tempfile

import pydicom
import pytest

import datasets
import kp

ROOT = "1.2.826.0.1.3680043.10.1411.88"
SOP = datasets.SOP_CLASS
MAX_RESULTS = 300
BULK = 310  # instances in the large series: more than MAX_RESULTS

STUDIES = {
    "S1": dict(name="Müller^Jürgen", pid="CF-001", date="20200115", time="101500", acc="CFA-001",
               desc="Phantom CT head", ref="Doe^Jane", birth="19700101", sex="M",
               series=[("CT", 1, "Axial", [3, 1, 2]), ("CT", 2, "Coronal", [1, 2])]),
    "S2": dict(name="Иванов^Иван", pid="CF-002", date="20210610", time="083000", acc="CFA-002",
               desc="MR knee", ref="", birth="19800202", sex="M",
               series=[("MR", 1, "T1 sag", [1, 2])]),
    "S3": dict(name="SMITH^JOHN", pid="CF-003", date="20221231", time="235959", acc="CFA_003%",
               desc="US abdomen", ref="", birth="19900303", sex="F",
               series=[("US", 5, "Liver", [1])]),
    "S4": dict(name="Müller^Jürgen", pid="CF-001", date="20230301", time="120000", acc="CFA-004",
               desc="Follow-up", ref="", birth="19700101", sex="M",
               series=[("MR", 1, "Brain", [1]), ("CT", 2, "Chest", [1])]),
    "S5": dict(name="BULK^SERIES", pid="CF-005", date="20240101", time="090000", acc="CFA-005",
               desc="Many images", ref="", birth="", sex="O",
               series=[("CT", 1, "Bulk", list(range(1, BULK + 1)))]),
}


_DATA = datasets.Studies(ROOT, STUDIES)
study_uid, series_uid, sop_uid = _DATA.study_uid, _DATA.series_uid, _DATA.sop_uid
pydicom_files = datasets.pydicom_files


@pytest.fixture(scope="module")
def qr(cluster):
    s = kp.System(cluster, extra_env={"KP_DICOM_FIND_MAX_RESULTS": str(MAX_RESULTS)})
    try:
        datasets.load(s, _DATA)
        yield s
    finally:
        s.stop()


# ---- findscu ---------------------------------------------------------------------------------
_STATUS = re.compile(r"DIMSE Status\s*:\s*0x([0-9a-fA-F]{4})")
_COMMENT = re.compile(r"\(0000,0902\) LO \[(.*?)\]")


def find(system, keys, model="-S", aet="CFINDSCU", extra=()):
    """Runs findscu; returns (final status, error comment, [response data sets])."""
    with tempfile.TemporaryDirectory() as d:
        cmd = ["findscu", "-d", "-aet", aet, "-aec", "KLINIKA", model, "-X", "-od", d, *extra]
        for k in keys:
            cmd += ["-k", k]
        cmd += ["127.0.0.1", str(system.port)]
        r = subprocess.run(cmd, capture_output=True, timeout=120, env=system.env)
        out = (r.stdout + r.stderr).decode("utf-8", "replace")
        statuses = _STATUS.findall(out)
        assert statuses, out[-3000:]
        comment = _COMMENT.findall(out)
        rsps = [pydicom.dcmread(os.path.join(d, f), force=True) for f in sorted(os.listdir(d))
                if f.startswith("rsp")]
        return int(statuses[-1], 16), (comment[-1] if comment else ""), rsps


def text(r, keyword):
    """The value exactly as sent (UTF-8 bytes, padding removed), before pydicom interprets
    escape sequences a raw-kept name may contain (ISO 2022 IR 87 files the index could not
    convert)."""
    if keyword not in r:
        return None
    el = r.get_item(keyword)
    v = el.value
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace").rstrip(" \0")
    return str(v)


def multi(r, keyword):
    """A multi-valued attribute as DICOM encodes it (values joined by backslash)."""
    v = r[keyword].value if keyword in r else ""
    return "\\".join(str(x) for x in v) if isinstance(v, (list, pydicom.multival.MultiValue)) \
        else str(v if v is not None else "")


def values(rsps, keyword):
    return [str(getattr(r, keyword, "")) for r in rsps]


def ok(system, keys, **kw):
    st, comment, rsps = find(system, keys, **kw)
    assert st == 0, f"status {st:04x} ({comment})"
    for r in rsps:
        assert r.SpecificCharacterSet == "ISO_IR 192"
        assert r.RetrieveAETitle == "KLINIKA"
    return rsps


def sql_set(system, q, args=None):
    return {r[0] for r in system.sql(q, args)}


# ---- study level ---------------------------------------------------------------------------
def test_study_root_all_studies_match_the_index(qr):
    rsps = ok(qr, ["QueryRetrieveLevel=STUDY", "StudyInstanceUID", "PatientName", "PatientID",
                   "StudyDate", "AccessionNumber", "ModalitiesInStudy",
                   "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
                   "StudyDescription", "ReferringPhysicianName", "StudyID", "StudyTime",
                   "PatientBirthDate", "PatientSex", "StationName"])
    got = {str(r.StudyInstanceUID): r for r in rsps}
    assert len(got) == len(rsps)
    rows = qr.sql("SELECT study_uid, coalesce(patient_name, ''), coalesce(patient_id, ''), "
                  "coalesce(study_date, ''), coalesce(accession_number, ''), "
                  "array_to_string(modalities, '\\'), num_series, num_instances, "
                  "coalesce(study_description, '') FROM studies")
    assert set(got) == {r[0] for r in rows}
    for uid, name, pid, date, acc, mods, nse, nin, desc in rows:
        r = got[uid]
        assert text(r, "PatientName") == name, uid
        assert str(r.PatientID) == pid
        assert str(r.StudyDate) == date
        assert str(r.AccessionNumber) == acc
        assert multi(r, "ModalitiesInStudy") == mods
        assert int(r.NumberOfStudyRelatedSeries) == nse
        assert int(r.NumberOfStudyRelatedInstances) == nin
        assert str(r.StudyDescription) == desc
        assert "StationName" in r and r.StationName == ""  # not indexed: returned empty
    s1 = got[study_uid("S1")]
    assert s1.ReferringPhysicianName == "Doe^Jane" and s1.StudyID == "S1"
    assert s1.StudyTime == "101500" and s1.PatientBirthDate == "19700101"
    assert list(got[study_uid("S4")].ModalitiesInStudy) == ["CT", "MR"]


def uids(rsps):
    return {str(r.StudyInstanceUID) for r in rsps}


def study_query(qr, *keys, **kw):
    return uids(ok(qr, ["QueryRetrieveLevel=STUDY", "StudyInstanceUID", *keys], **kw))


def test_single_value_and_wildcards_with_escaping(qr):
    assert study_query(qr, "AccessionNumber=CFA-002") == {study_uid("S2")}
    # '_' and '%' are literal in DICOM: only S3's accession (CFA_003%) matches
    assert study_query(qr, "AccessionNumber=CFA_*") == {study_uid("S3")}
    assert study_query(qr, "AccessionNumber=CFA_003%") == {study_uid("S3")}
    assert study_query(qr, "AccessionNumber=CFA?00?") == {study_uid(k) for k in
                                                           ("S1", "S2", "S4", "S5")}
    assert study_query(qr, "AccessionNumber=CFA-00") == set()
    assert study_query(qr, "StudyDescription=*knee") == {study_uid("S2")}
    # text other than names is case-sensitive
    assert study_query(qr, "StudyDescription=*KNEE") == set()
    want = sql_set(qr, "SELECT study_uid FROM studies WHERE accession_number LIKE 'CFA%%'")
    assert study_query(qr, "AccessionNumber=CFA*") == want and len(want) == 5


def test_person_names_fold_case_and_accents(qr):
    both = {study_uid("S1"), study_uid("S4")}
    assert study_query(qr, "PatientName=Müller^Jürgen") == both
    assert study_query(qr, "PatientName=müller*") == both
    assert study_query(qr, "PatientName=MULLER^JURGEN") == both
    assert study_query(qr, "PatientName=smith^john") == {study_uid("S3")}
    assert study_query(qr, "ReferringPhysicianName=doe*") == {study_uid("S1")}
    want = sql_set(qr, "SELECT study_uid FROM studies WHERE patient_name_fold LIKE 'm%%'")
    assert study_query(qr, "PatientName=M*") == want and both <= want


def test_cyrillic_name_in_utf8_and_in_iso_8859_5(qr):
    s2 = {study_uid("S2")}
    assert study_query(qr, "SpecificCharacterSet=ISO_IR 192", "PatientName=иванов*") == s2
    # an identifier in ISO 8859-5 is converted to UTF-8 before matching
    st, comment, rsps = find(qr, ["QueryRetrieveLevel=STUDY", "StudyInstanceUID",
                                  "SpecificCharacterSet=ISO_IR 144",
                                  "PatientName=".encode() + "Иванов*".encode("iso8859_5")])
    assert st == 0 and uids(rsps) == s2
    assert text(rsps[0], "PatientName") == "Иванов^Иван"  # answered in UTF-8
    # names from pydicom's charset files (indexed in UTF-8) are found by their folded form
    rows = qr.sql("SELECT study_uid, patient_name FROM studies WHERE patient_name ~ '[А-я]' "
                  "AND study_uid NOT LIKE %s", (ROOT + "%",))
    for uid, name in rows:
        first = name.split("^")[0].split("=")[0]
        if not first:
            continue
        got = study_query(qr, "SpecificCharacterSet=ISO_IR 192",
                          f"PatientName={first.lower()}*")
        assert uid in got, (name, got)


def test_date_and_time_ranges(qr):
    def want(cond, args=()):
        return sql_set(qr, f"SELECT study_uid FROM studies WHERE {cond}", args)

    got = study_query(qr, "StudyDate=20200101-20211231")
    assert got == want("study_date <> '' AND study_date BETWEEN '20200101' AND '20211231'")
    assert {study_uid("S1"), study_uid("S2")} <= got and study_uid("S3") not in got
    got = study_query(qr, "StudyDate=20220101-")
    assert got == want("study_date >= '20220101'")
    assert {study_uid(k) for k in ("S3", "S4", "S5")} <= got
    got = study_query(qr, "StudyDate=-20000101")
    assert got == want("study_date <> '' AND study_date <= '20000101'")
    assert study_query(qr, "StudyDate=20210610") == want("study_date = '20210610'")
    got = study_query(qr, "StudyTime=1000-1200")
    assert got == want("study_time <> '' AND study_time >= '1000' AND left(study_time, 4) <= "
                       "'1200'")
    assert {study_uid("S1"), study_uid("S4")} <= got and study_uid("S2") not in got
    got = study_query(qr, "StudyDate=20200101-20231231", "StudyTime=1000-1200")
    assert {study_uid("S1"), study_uid("S4")} <= got and study_uid("S3") not in got
    assert study_query(qr, "PatientBirthDate=19800202") == {study_uid("S2")}


def test_uid_list_and_modalities(qr):
    pair = {study_uid("S1"), study_uid("S3")}
    assert study_query(qr, "StudyInstanceUID=" + "\\".join(sorted(pair))) == pair
    got = study_query(qr, "ModalitiesInStudy=MR")
    assert got == sql_set(qr, "SELECT study_uid FROM studies WHERE 'MR' = ANY(modalities)")
    assert {study_uid("S2"), study_uid("S4")} <= got and study_uid("S1") not in got
    got = study_query(qr, "ModalitiesInStudy=US\\MR")
    assert {study_uid(k) for k in ("S2", "S3", "S4")} <= got and study_uid("S1") not in got
    assert study_query(qr, "ModalitiesInStudy=U?") == sql_set(
        qr, "SELECT study_uid FROM studies WHERE modalities && ARRAY['US']")


# ---- patient level (Patient Root) ----------------------------------------------------------
def test_patient_root_patient_level(qr):
    rsps = ok(qr, ["QueryRetrieveLevel=PATIENT", "PatientID=CF-00*", "PatientName",
                   "PatientBirthDate", "PatientSex", "NumberOfPatientRelatedStudies",
                   "NumberOfPatientRelatedSeries", "NumberOfPatientRelatedInstances"],
              model="-P")
    got = {str(r.PatientID): r for r in rsps}
    assert set(got) == sql_set(qr, "SELECT patient_id FROM patients WHERE patient_id LIKE "
                                   "'CF-00%%'")
    assert set(got) == {"CF-001", "CF-002", "CF-003", "CF-005"}
    assert int(got["CF-001"].NumberOfPatientRelatedStudies) == 2
    assert int(got["CF-001"].NumberOfPatientRelatedSeries) == 4
    assert int(got["CF-001"].NumberOfPatientRelatedInstances) == 7
    assert text(got["CF-002"], "PatientName") == "Иванов^Иван"
    assert got["CF-003"].PatientSex == "F"
    # Patient Root STUDY level needs the PatientID; every response carries it
    rsps = ok(qr, ["QueryRetrieveLevel=STUDY", "PatientID=CF-001", "StudyInstanceUID",
                   "StudyDate"], model="-P")
    assert uids(rsps) == {study_uid("S1"), study_uid("S4")}
    assert set(values(rsps, "PatientID")) == {"CF-001"}
    st, comment, _ = find(qr, ["QueryRetrieveLevel=STUDY", "StudyInstanceUID"], model="-P")
    assert st == 0xA900 and "PatientID" in comment


# ---- series and image levels -----------------------------------------------------------------
def test_series_level_both_models(qr):
    keys = ["QueryRetrieveLevel=SERIES", f"StudyInstanceUID={study_uid('S1')}",
            "SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription",
            "NumberOfSeriesRelatedInstances"]
    for model, extra in (("-S", []), ("-P", ["PatientID=CF-001"])):
        rsps = ok(qr, keys + extra, model=model)
        got = {str(r.SeriesInstanceUID): r for r in rsps}
        assert set(got) == {series_uid("S1", 0), series_uid("S1", 1)}
        a = got[series_uid("S1", 0)]
        assert (a.Modality, int(a.SeriesNumber), a.SeriesDescription,
                int(a.NumberOfSeriesRelatedInstances)) == ("CT", 1, "Axial", 3)
        assert all(str(r.StudyInstanceUID) == study_uid("S1") for r in rsps)
    rsps = ok(qr, ["QueryRetrieveLevel=SERIES", f"StudyInstanceUID={study_uid('S4')}",
                   "Modality=MR", "SeriesInstanceUID"])
    assert values(rsps, "SeriesInstanceUID") == [series_uid("S4", 0)]
    rsps = ok(qr, ["QueryRetrieveLevel=SERIES", f"StudyInstanceUID={study_uid('S1')}",
                   "SeriesNumber=2", "SeriesInstanceUID"])
    assert values(rsps, "SeriesInstanceUID") == [series_uid("S1", 1)]
    st, comment, _ = find(qr, ["QueryRetrieveLevel=SERIES", "Modality=CT"])
    assert st == 0xA900 and "StudyInstanceUID" in comment


def test_image_level_both_models(qr):
    keys = ["QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={study_uid('S1')}",
            f"SeriesInstanceUID={series_uid('S1', 0)}", "SOPInstanceUID", "SOPClassUID",
            "InstanceNumber", "Rows", "Columns", "NumberOfFrames", "BitsStored"]
    for model, extra in (("-S", []), ("-P", ["PatientID=CF-001"])):
        rsps = ok(qr, keys + extra, model=model)
        got = {str(r.SOPInstanceUID): r for r in rsps}
        want = sql_set(qr, "SELECT i.sop_uid FROM instances i JOIN series se ON se.pk = "
                           "i.series_pk WHERE se.series_uid = %s", (series_uid("S1", 0),))
        assert set(got) == want == {sop_uid("S1", 0, n) for n in (1, 2, 3)}
        r = got[sop_uid("S1", 0, 3)]
        assert (r.SOPClassUID, int(r.InstanceNumber), int(r.Rows), int(r.Columns)) == \
            (SOP["CT"], 3, 8, 8)
        assert int(r.BitsStored) == 12  # not a column: read from the instance's metadata
        assert str(r.SeriesInstanceUID) == series_uid("S1", 0)
    rsps = ok(qr, keys[:3] + ["SOPInstanceUID", "InstanceNumber=1\\3"])
    assert set(values(rsps, "SOPInstanceUID")) == {sop_uid("S1", 0, 1), sop_uid("S1", 0, 3)}
    st, comment, _ = find(qr, ["QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={study_uid('S1')}",
                               "SOPInstanceUID"])
    assert st == 0xA900 and "SeriesInstanceUID" in comment


# ---- limits, cancel, errors ------------------------------------------------------------------
BULK_KEYS = ["QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={study_uid('S5')}",
             f"SeriesInstanceUID={series_uid('S5', 0)}", "SOPInstanceUID"]


def test_more_results_than_the_limit(qr):
    st, comment, rsps = find(qr, BULK_KEYS)
    assert st == 0xA700
    assert "more than 300" in comment
    assert len(rsps) == MAX_RESULTS
    assert len(set(values(rsps, "SOPInstanceUID"))) == MAX_RESULTS
    # just below the limit: everything, success
    st, _, rsps = find(qr, BULK_KEYS[:3] + ["SOPInstanceUID", "InstanceNumber=1\\2\\3"])
    assert st == 0 and len(rsps) == 3


def test_cancel_between_pending_responses(qr):
    # without the cancel this query ends with A700 after MAX_RESULTS responses
    st, _, rsps = find(qr, BULK_KEYS, extra=["--cancel", "1"])
    assert st == 0xFE00, f"{st:04x}"
    assert 1 <= len(rsps) < MAX_RESULTS
    assert "cancelled" in qr.log("pacs-dicomd")
    assert qr.echo()


def test_malformed_identifiers_fail_cleanly(qr):
    st, comment, rsps = find(qr, ["PatientName=*"])
    assert st == 0xA900 and comment == "QueryRetrieveLevel missing" and not rsps
    st, comment, _ = find(qr, ["QueryRetrieveLevel=PATIENT", "PatientName=*"])  # Study Root
    assert st == 0xA900
    st, comment, _ = find(qr, ["QueryRetrieveLevel=FRAME"], model="-P")
    assert st == 0xA900
    assert qr.alive("pacs-dicomd")
    assert qr.echo()
    # the daemon still stores
    src = os.path.join(kp.PYDICOM_DATA, "test_files", "CT_small.dcm")
    rc, res, out = qr.storescu([src])
    assert res.get(src) == "ok", out[-2000:]


def test_registered_aes_only(cluster):
    s = kp.System(cluster, extra_env={"KP_DICOM_FIND_REQUIRE_REGISTERED": "true"})
    try:
        keys = ["QueryRetrieveLevel=STUDY", "StudyInstanceUID"]
        st, comment, _ = find(s, keys, aet="STRANGER")
        assert st == 0x0124 and "not allowed" in comment
        s.sql("INSERT INTO modalities (ae_title, host, port, allow_find) VALUES "
              "('VIEWER', '127.0.0.1', 104, true), ('NOFIND', '127.0.0.1', 105, false)")
        st, _, _ = find(s, keys, aet="VIEWER")
        assert st == 0
        st, _, _ = find(s, keys, aet="NOFIND")
        assert st == 0x0124
        assert s.echo(aet="STRANGER")  # only C-FIND is refused, not the association
    finally:
        s.stop()


# ---- extended negotiation (no DCMTK tool sends it: a raw A-ASSOCIATE-RQ) -----------------------
def _item(t, body):
    import struct
    return struct.pack(">BBH", t, 0, len(body)) + body


def _associate_with_extneg(port, sop_class, info):
    import socket
    import struct
    ts = _item(0x40, b"1.2.840.10008.1.2")
    pc = _item(0x20, bytes([1, 0, 0, 0]) + _item(0x30, sop_class.encode()) + ts)
    uid = sop_class.encode()
    ext = _item(0x56, struct.pack(">H", len(uid)) + uid + bytes(info))
    user = _item(0x50, _item(0x51, struct.pack(">I", 16384)) +
                 _item(0x52, b"1.2.826.0.1.3680043.10.1411.1") + ext)
    body = (struct.pack(">HH", 1, 0) + b"KLINIKA".ljust(16) + b"RAWSCU".ljust(16) + bytes(32) +
            _item(0x10, b"1.2.840.10008.3.1.1.1") + pc + user)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(struct.pack(">BBI", 1, 0, len(body)) + body)
        hdr = b""
        while len(hdr) < 6:
            hdr += s.recv(6 - len(hdr))
        n = struct.unpack(">I", hdr[2:6])[0]
        data = b""
        while len(data) < n:
            data += s.recv(n - len(data))
        s.sendall(struct.pack(">BBI", 7, 0, 4) + bytes(4))  # A-ABORT
    assert hdr[0] == 2, f"not accepted: PDU type {hdr[0]}"
    # walk the items after the fixed part (68 bytes) to the user information's 0x56 sub-item
    p, result = 68, None
    while p + 4 <= len(data):
        t, ln = data[p], struct.unpack(">H", data[p + 2:p + 4])[0]
        if t == 0x21:
            result = data[p + 6]  # presentation context result (0 = acceptance)
        if t == 0x50:
            q = p + 4
            while q + 4 <= p + 4 + ln:
                st, sl = data[q], struct.unpack(">H", data[q + 2:q + 4])[0]
                if st == 0x56:
                    ul = struct.unpack(">H", data[q + 4:q + 6])[0]
                    return result, data[q + 6:q + 6 + ul].decode(), data[q + 6 + ul:q + 4 + sl]
                q += 4 + sl
        p += 4 + ln
    return result, None, None


def test_extended_negotiation_combined_datetime(qr):
    for model in ("1.2.840.10008.5.1.4.1.2.2.1", "1.2.840.10008.5.1.4.1.2.1.1"):
        result, uid, info = _associate_with_extneg(qr.port, model, [1, 1, 1])
        assert result == 0
        # relational queries refused (0), combined date-time matching accepted (1)
        assert uid == model and info == bytes([0, 1])
        result, uid, info = _associate_with_extneg(qr.port, model, [1, 0])
        assert result == 0 and info == bytes([0, 0])
    assert qr.alive("pacs-dicomd") and qr.echo()
