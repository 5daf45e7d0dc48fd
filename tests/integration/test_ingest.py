"""Ingest of real-world files: every file of pydicom's test_files/ and charset_files/ is sent with
DCMTK's storescu; each one DCMTK can parse must be acknowledged and indexed with the values
dcmdump reports; files the server cannot accept get a DIMSE failure status, never a crash."""
import collections
import concurrent.futures
import json
import os
import subprocess

import pytest

import datasets
import kp

TAGS = {"00100010", "0020000D", "0020000E", "00080018", "00080060", "00080020", "00080016"}


candidate_files = datasets.pydicom_files


def pn_norm(v):
    """Person name in a comparable form: trailing empty components and groups dropped
    (DICOM allows 'A^B^^^' for 'A^B', and DCMTK's JSON writer drops them)."""
    out = []
    for name in v.split("\\"):
        groups = [g.rstrip("^") for g in name.split("=")]
        while groups and not groups[-1]:
            groups.pop()
        out.append("=".join(groups))
    return "\\".join(out)


def pn_json_to_dicom(v):
    """DICOM JSON person name object back to the DICOM string form (groups joined by '=')."""
    if isinstance(v, str):
        return v
    groups = [v.get("Alphabetic", ""), v.get("Ideographic", ""), v.get("Phonetic", "")]
    while groups and not groups[-1]:
        groups.pop()
    return "=".join(groups)


@pytest.fixture(scope="module")
def sent(system):
    """Sends every candidate file (files sharing a SOP Instance UID in order, on one worker)."""
    info = {}
    for f in candidate_files():
        rc, vals = kp.dcmdump_values(f, TAGS)
        info[f] = (rc, vals)
    groups = collections.defaultdict(list)
    for f, (rc, vals) in info.items():
        groups[vals.get("00080018") or f].append(f)

    def send_group(files):
        out = []
        for f in files:
            rc, res, text = system.storescu([f], extra=kp.storescu_flags(f))
            out.append((f, res.get(f, "not sent"), text))
        return out

    results = {}
    with concurrent.futures.ThreadPoolExecutor(4) as ex:
        for group in ex.map(send_group, groups.values()):
            for f, status, text in group:
                results[f] = (status, text)
    return info, groups, results


def test_parsable_files_are_acknowledged(system, sent):
    info, groups, results = sent
    ok = [f for f, (st, _) in results.items() if st == "ok"]
    assert len(ok) >= 60, f"only {len(ok)} files acknowledged"
    # Every file dcmdump reads with the three UIDs and a SOP class must have been accepted when
    # storescu could send it (storescu itself refuses some files: no SOP Instance UID, a
    # truncated data set); a refusal by the server shows as a Store Response with a failure.
    refused, client_side = [], []
    for f, (rc, vals) in info.items():
        complete = rc == 0 and all(vals.get(t) for t in ("0020000D", "0020000E", "00080018",
                                                         "00080016"))
        status, text = results[f]
        if status == "ok":
            continue
        if "Received Store Response" in text:
            if complete:
                refused.append((os.path.basename(f), status))
        else:
            client_side.append(os.path.basename(f))
    print(f"\n{len(ok)} acknowledged; storescu could not send {len(client_side)}: {client_side}")
    assert not refused, f"parsable files refused by the server: {refused}"
    assert system.alive("pacs-dicomd")


def test_indexed_values_equal_dcmdump(system, sent):
    info, groups, results = sent
    system.wait_jobs_settled(120)
    checked = 0
    mismatches = []
    for sop, files in groups.items():
        acked = [f for f in files if results[f][0] == "ok"]
        if not acked:
            continue
        f = acked[-1]  # with the default policy the last different copy wins
        vals = info[f][1]
        rows = system.sql(
            "SELECT i.sop_uid, se.series_uid, st.study_uid, i.metadata::text, se.modality, "
            "st.study_date, i.path FROM instances i JOIN series se ON se.pk = i.series_pk "
            "JOIN studies st ON st.pk = se.study_pk WHERE i.sop_uid = %s", (vals["00080018"],))
        if len(rows) != 1:
            mismatches.append((os.path.basename(f), f"{len(rows)} rows"))
            continue
        sop_uid, series_uid, study_uid, meta, modality, study_date, path = rows[0]
        meta = json.loads(meta)
        got = {"00080018": sop_uid, "0020000E": series_uid, "0020000D": study_uid}
        for t in ("00080060", "00080020"):
            if t in meta and meta[t].get("Value"):
                got[t] = meta[t]["Value"][0]
            elif t in vals:
                got[t] = ""
        if "00100010" in meta:
            got["00100010"] = "\\".join(pn_json_to_dicom(v) for v in meta["00100010"].get("Value", []))
        want = dict(vals)
        if "00100010" in want:
            want["00100010"] = pn_norm(want["00100010"])
            got["00100010"] = pn_norm(got.get("00100010", ""))
        for t in ("00080018", "0020000E", "0020000D", "00080060", "00080020", "00100010"):
            if t in want and want[t] != got.get(t, ""):
                mismatches.append((os.path.basename(f), t, want[t], got.get(t)))
        # the study's PatientName column, when every file of that study carries one name
        names = {info[g][1].get("00100010") for g2 in groups.values() for g in g2
                 if results[g][0] == "ok" and info[g][1].get("0020000D") == study_uid}
        if len(names) == 1 and "00100010" in vals:
            col = system.sql("SELECT patient_name FROM studies WHERE study_uid = %s", (study_uid,))[0][0]
            if col != vals["00100010"]:
                mismatches.append((os.path.basename(f), "studies.patient_name", vals["00100010"], col))
        checked += 1
    assert not mismatches, mismatches
    assert checked >= 40  # distinct SOP Instance UIDs (many test files share one)
    # the per-series/per-study index columns agree with the instance metadata
    bad = system.sql(
        "SELECT count(*) FROM instances i JOIN series se ON se.pk = i.series_pk "
        "WHERE coalesce(i.metadata->'0020000E'->'Value'->>0, '') <> se.series_uid")[0][0]
    assert bad == 0


def test_utf8_names_from_other_charsets(system, sent):
    """Cyrillic, Greek, Latin-1 and UTF-8 names are stored as UTF-8."""
    names = [r[0] for r in system.sql("SELECT patient_name FROM studies WHERE patient_name IS NOT NULL")]
    joined = " ".join(names)
    assert any("\u0400" <= ch <= "\u04ff" for ch in joined), "no Cyrillic name indexed"
    assert any("\u0370" <= ch <= "\u03ff" for ch in joined), "no Greek name indexed"
    assert any(ch in "äöüßéèàçñÄÖÜÉ" for ch in joined), "no Latin-1 accented name indexed"
    # fuzzy column is folded (lower case, accents removed)
    folded = system.sql("SELECT patient_name_fold FROM studies WHERE patient_name LIKE '%%Buc%%'")
    for (f,) in folded:
        assert f == f.lower()


def test_aggregates_are_consistent(system, sent):
    system.wait_jobs_settled(60)
    bad = system.sql(
        "SELECT st.study_uid FROM studies st WHERE st.num_instances <> (SELECT count(*) FROM "
        "instances i JOIN series se ON se.pk = i.series_pk WHERE se.study_pk = st.pk) OR "
        "st.num_series <> (SELECT count(*) FROM series WHERE study_pk = st.pk) OR "
        "st.modalities <> (SELECT coalesce(array_agg(DISTINCT modality ORDER BY modality) FILTER "
        "(WHERE modality <> ''), '{}') FROM series WHERE study_pk = st.pk)")
    assert bad == []
    assert system.count("studies") > 10


def test_duplicates_and_files_intact(system, sent):
    info, groups, results = sent
    # every acknowledged instance's stored file holds the same dataset as what was sent
    rows = system.sql("SELECT sop_uid, path, file_sha256, file_size FROM instances")
    root = system.env["KP_STORAGE_ROOT"]
    for sop, path, sha, size in rows:
        full = os.path.join(root, path)
        assert os.path.getsize(full) == size
        out = subprocess.run(["sha256sum", full], capture_output=True, text=True).stdout.split()[0]
        assert out == sha
    # identical content sent again is a no-op: no new row, same file
    f = next(f for f, (st, _) in results.items() if st == "ok" and "CT_small" in f)
    before = system.count("instances")
    rc, res, _ = system.storescu([f])
    assert res[f] == "ok"
    system.wait_jobs_settled(30)
    assert system.count("instances") == before


def test_garbage_and_incomplete_datasets_fail_cleanly(system, tmp_path):
    """A dataset without Study/Series UIDs cannot be indexed: DIMSE failure, daemon alive."""
    import pydicom
    src = os.path.join(kp.PYDICOM_DATA, "test_files", "CT_small.dcm")
    ds = pydicom.dcmread(src)
    del ds.StudyInstanceUID
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.10.1411.99.1"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    bad = str(tmp_path / "no-study-uid.dcm")
    ds.save_as(bad)
    rc, res, text = system.storescu([bad])
    assert res.get(bad) not in (None, "ok", "unacknowledged"), text
    assert system.echo()
    assert system.sql("SELECT count(*) FROM instances WHERE sop_uid = %s", (ds.SOPInstanceUID,))[0][0] == 0


def test_calling_ae_allow_list(cluster):
    s = kp.System(cluster, extra_env={"KP_DICOM_ALLOWED_AES": "CT1, MR2"}, start=False)
    try:
        s.start("pacs-busd")
        s.start("pacs-dicomd")
        kp.wait_for(lambda: s.echo(aet="CT1"), 20, "dicomd up")
        assert s.echo(aet="MR2")
        assert not s.echo(aet="INTRUDER")
        assert not s.echo(aet="CT1", aec="WRONGAE")
        assert s.alive("pacs-dicomd")
        assert "calling AE not in dicom.allowed_aes" in s.log("pacs-dicomd")
    finally:
        s.stop()


SNAPSHOT = """
SELECT p.patient_id, p.issuer, p.patient_name, p.birth_date, p.sex, p.num_studies,
       st.study_uid, st.study_date, st.study_time, st.accession_number, st.study_id,
       st.study_description, st.referring_physician, st.patient_name, st.patient_name_fold,
       st.patient_id, st.patient_birth_date, st.patient_sex, st.specific_charset, st.modalities,
       st.sop_classes, st.num_series, st.num_instances,
       se.series_uid, se.modality, se.series_number, se.series_description, se.series_date,
       se.body_part, se.num_instances,
       i.sop_uid, i.sop_class_uid, i.instance_number, i.transfer_syntax_uid, i.rows, i.columns,
       i.bits_allocated, i.number_of_frames, i.path, i.file_size, i.file_sha256, i.pixel_offset,
       i.pixel_length, i.charset_fallback, i.calling_ae, i.metadata::text
FROM instances i JOIN series se ON se.pk = i.series_pk JOIN studies st ON st.pk = se.study_pk
JOIN patients p ON p.pk = st.patient_pk ORDER BY i.sop_uid
"""


def test_reindex_reproduces_the_same_rows(system, sent):
    """`pacsctl reindex --wipe` rebuilds the index from storage alone: every row is the same."""
    system.wait_jobs_settled(60)
    before = system.sql(SNAPSHOT)
    assert len(before) >= 40
    system.kill("pacs-indexer#0")  # nothing else writes meanwhile
    r = system.pacsctl("reindex", "--wipe")
    assert f"reindexed {len(before)} files" in r.stdout, r.stdout + r.stderr
    after = system.sql(SNAPSHOT)
    assert system.count("instances") == len(before)
    diffs = [(a[30], [(i, x, y) for i, (x, y) in enumerate(zip(a, b)) if x != y])
             for a, b in zip(before, after) if a != b]
    assert not diffs, diffs[:3]
    system.start("pacs-indexer#0", "pacs-indexer")


def test_undeclared_latin1_name_is_kept(system, tmp_path):
    """A name in Latin-1 without a SpecificCharacterSet (common in the field) is indexed as the
    same characters in UTF-8, not dropped or replaced."""
    import pydicom
    src = os.path.join(kp.PYDICOM_DATA, "test_files", "CT_small.dcm")
    ds = pydicom.dcmread(src)
    if "SpecificCharacterSet" in ds:
        del ds.SpecificCharacterSet
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.10.1411.99.2"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.10.1411.99.3"
    ds.PatientName = "x"
    out = str(tmp_path / "latin1.dcm")
    ds.save_as(out)
    raw = open(out, "rb").read()
    patched = raw.replace(b"PN\x02\x00x ", b"PN\x02\x00\xe9 ")  # the value 'x ' -> 0xE9
    assert patched != raw
    open(out, "wb").write(patched)
    rc, res, text = system.storescu([out])
    assert res[out] == "ok", text
    system.wait_jobs_settled(30)
    name = system.sql("SELECT patient_name FROM studies WHERE study_uid = %s", (ds.StudyInstanceUID,))[0][0]
    assert name == "\u00e9"
