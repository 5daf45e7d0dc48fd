"""STOW-RS: POST /dicom-web/studies[/{study}] with multipart/related; type="application/dicom".

What was posted is checked where it lands: the stored files (byte for byte), the index (QIDO-RS,
the instances table), the outbox (`index` jobs recorded with ae "STOW-RS"), and WADO-RS. The
system runs with http.max_body_mb = 1 so the body limit can be tried too."""
import concurrent.futures
import json
import os
import shutil
import socket
import ssl
import tempfile

import pydicom
import pytest

import datasets
import kp
from dicomweb import (dcm_from_bytes, dcmtk_convert, error_code, multipart_strict, native_frames,
                      stored_bytes, stored_path, url)

T = os.path.join(kp.PYDICOM_DATA, "test_files")
ROOT = "1.2.826.0.1.3680043.10.1411.93"
BOUNDARY = "KlinikaTestBoundary-5c1e8a"
STOW_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'


def study(name, series):
    return dict(name=name, pid=name.split("^")[0], birth="19800101", sex="M", date="20240301",
                time="080000", acc=name[:8], desc="stow", ref="Ref^Doc", series=series)


# S1: two series (posted whole); S2 the "other study"; S3 posted twice; S10..S13 concurrently.
SYN = datasets.Studies(ROOT, {
    "S1": study("Stow^One", [("CT", 1, "a", [1, 2, 3]), ("CT", 2, "b", [1, 2])]),
    "S2": study("Stow^Two", [("MR", 1, "a", [1, 2])]),
    "S3": study("Stow^Three", [("MR", 1, "a", [1, 2, 3])]),
    "S4": study("Stow^Four", [("CT", 1, "a", [1, 2])]),
    **{f"S{k}": study(f"Stow^Conc{k}", [("CT", 1, "a", list(range(1, 11)))])
       for k in range(10, 14)},
})


@pytest.fixture(scope="module")
def files():
    d = tempfile.mkdtemp(prefix="kp-stow-")
    paths = SYN.write(d)
    by_key = {}
    for p in paths:
        k = os.path.basename(p).split("-")[0]
        by_key.setdefault(k, []).append(p)
    yield by_key
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def gw(cluster):
    s = kp.System(cluster, gateway=True, extra_env={"KP_HTTP_MAX_BODY_MB": "1"})
    try:
        yield s
    finally:
        s.stop()


def read(p):
    with open(p, "rb") as f:
        return f.read()


def multipart(parts, boundary=BOUNDARY, close=True):
    out = b""
    for ctype, data in parts:
        out += f"--{boundary}\r\n".encode()
        if ctype:
            out += f"Content-Type: {ctype}\r\n".encode()
        out += b"\r\n" + data + b"\r\n"
    if close:
        out += f"--{boundary}--\r\n".encode()
    return out


def stow(gw, body, path="/dicom-web/studies", ctype=STOW_TYPE, timeout=60):
    st, h, raw = gw.https("POST", path, {"Content-Type": ctype,
                                         "Accept": "application/dicom+json"}, body, timeout=timeout)
    return st, h, raw


def seq(doc, tag):
    return doc.get(tag, {}).get("Value", [])


def uid_of(item, tag):
    return item[tag]["Value"][0]


def count_sops(gw, sops):
    return gw.sql("SELECT count(*) FROM instances WHERE sop_uid = ANY(%s)", (list(sops),))[0][0]


def test_stow_stores_indexes_and_records_jobs(gw, files):
    paths = files["S1"]
    posted = {pydicom.dcmread(p).SOPInstanceUID: read(p) for p in paths}
    st, h, raw = stow(gw, multipart([("application/dicom", read(p)) for p in paths]))
    assert st == 200, raw[:500]
    assert h["Content-Type"].startswith("application/dicom+json")
    doc = json.loads(raw)
    assert "00081198" not in doc
    refs = seq(doc, "00081199")
    assert len(refs) == len(paths) == 5
    for item, p in zip(refs, paths):
        ds = pydicom.dcmread(p)
        assert uid_of(item, "00081150") == ds.SOPClassUID
        assert uid_of(item, "00081155") == ds.SOPInstanceUID
        assert item["00081150"]["vr"] == "UI" and item["00081190"]["vr"] == "UR"
        assert uid_of(item, "00081190") == (
            f"https://127.0.0.1:{gw.https_port}/dicom-web/studies/{ds.StudyInstanceUID}/series/"
            f"{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}")
    gw.wait_jobs_settled()
    gw.wait_indexed(len(paths))
    # searchable
    study = SYN.study_uid("S1")
    st, h, body = gw.https("GET", f"/dicom-web/studies/{study}/instances")
    assert st == 200
    assert sorted(uid_of(x, "00080018") for x in json.loads(body)) == sorted(posted)
    st, h, body = gw.https("GET", "/dicom-web/studies?PatientName=Stow%5EOne")
    assert st == 200 and [uid_of(x, "0020000D") for x in json.loads(body)] == [study]
    # stored and retrieved byte for byte as posted
    for sop, data in posted.items():
        assert stored_bytes(gw, sop) == data
    st, h, body = gw.https("GET", f"/dicom-web/studies/{study}",
                           {"Accept": 'multipart/related; type="application/dicom"'})
    assert st == 200
    got = {dcm_from_bytes(d).SOPInstanceUID: d for _, d in multipart_strict(h["Content-Type"], body)}
    assert got == posted
    # one index job per instance, recorded as coming from STOW-RS
    jobs = [p for (p,) in gw.sql("SELECT payload FROM jobs WHERE type = 'index'")]
    jobs = [j if isinstance(j, dict) else json.loads(j) for j in jobs]
    for sop in posted:
        mine = [j for j in jobs if j["sop"] == sop]
        assert len(mine) == 1, (sop, mine)
        assert mine[0]["ae"] == "STOW-RS"
        assert mine[0]["size"] == len(posted[sop])


def test_stow_to_a_study_refuses_other_studies(gw, files):
    s2 = files["S2"]
    other = files["S4"][0]
    before = gw.count("instances")
    # only a part of another study: nothing stored, 409
    st, h, raw = stow(gw, multipart([("application/dicom", read(other))]),
                      path=f"/dicom-web/studies/{SYN.study_uid('S2')}")
    assert st == 409, raw[:500]
    doc = json.loads(raw)
    assert "00081199" not in doc
    failed = seq(doc, "00081198")
    assert len(failed) == 1
    assert uid_of(failed[0], "00081155") == pydicom.dcmread(other).SOPInstanceUID
    assert failed[0]["00081197"]["vr"] == "US"
    assert isinstance(failed[0]["00081197"]["Value"][0], int)
    # one matching and one not: 202, each in its sequence
    st, h, raw = stow(gw, multipart([("application/dicom", read(s2[0])),
                                     ("application/dicom", read(other))]),
                      path=f"/dicom-web/studies/{SYN.study_uid('S2')}")
    assert st == 202, raw[:500]
    doc = json.loads(raw)
    assert [uid_of(x, "00081155") for x in seq(doc, "00081199")] == [pydicom.dcmread(s2[0]).SOPInstanceUID]
    assert [uid_of(x, "00081155") for x in seq(doc, "00081198")] == [pydicom.dcmread(other).SOPInstanceUID]
    assert uid_of(doc, "00081190").endswith(f"/dicom-web/studies/{SYN.study_uid('S2')}")
    gw.wait_jobs_settled()
    gw.wait_indexed(before + 1)
    assert gw.count("instances") == before + 1
    assert count_sops(gw, [pydicom.dcmread(other).SOPInstanceUID]) == 0
    assert not gw.sql("SELECT 1 FROM jobs WHERE payload->>'sop' = %s",
                      (pydicom.dcmread(other).SOPInstanceUID,))


def test_stow_bad_parts_fail_alone(gw, files):
    good = files["S2"][1]
    before = gw.count("instances")
    junk = os.urandom(4000)
    st, h, raw = stow(gw, multipart([("text/plain", read(good)), ("application/dicom", read(good)),
                                     ("application/dicom", junk)]))
    assert st == 202, raw[:500]
    doc = json.loads(raw)
    assert [uid_of(x, "00081155") for x in seq(doc, "00081199")] == [pydicom.dcmread(good).SOPInstanceUID]
    failed = seq(doc, "00081198")
    assert len(failed) == 2
    assert all(f["00081197"]["vr"] == "US" and f["00081197"]["Value"][0] > 0 for f in failed)
    assert "Warning" in h
    # only bad parts: nothing stored
    st, h, raw = stow(gw, multipart([("text/plain", b"hello"), ("application/dicom", junk)]))
    assert st == 409, raw[:300]
    assert len(seq(json.loads(raw), "00081198")) == 2
    gw.wait_jobs_settled()
    gw.wait_indexed(before + 1)
    assert gw.count("instances") == before + 1


def test_stow_malformed_requests(gw, files):
    data = [read(p) for p in files["S4"]]
    before = gw.count("instances")
    full = multipart([("application/dicom", d) for d in data])
    cut = full[:len(full) - len(data[-1]) // 2 - 20]  # in the middle of the last part
    st, h, raw = stow(gw, cut)
    assert st == 400, raw[:300]
    assert h["Content-Type"] == "application/json" and error_code(raw) == "invalid_argument"
    # every part but the close delimiter: still refused whole
    st, h, raw = stow(gw, multipart([("application/dicom", d) for d in data], close=False))
    assert st == 400, raw[:300]
    for ctype, status in (("application/json", 415), ("application/dicom", 415),
                          (f'multipart/related; type="application/dicom+json"; boundary={BOUNDARY}', 415),
                          ('multipart/related; type="application/dicom"', 400)):
        st, h, raw = stow(gw, full, ctype=ctype)
        assert st == status, (ctype, st, raw[:300])
        assert h["Content-Type"] == "application/json"
    st, h, raw = stow(gw, b"")
    assert st == 400 and error_code(raw) == "invalid_argument"
    # a body with another boundary than announced
    st, h, raw = stow(gw, multipart([("application/dicom", data[0])], boundary="OtherBoundary"))
    assert st == 400, raw[:300]
    gw.wait_jobs_settled()
    assert gw.count("instances") == before
    assert count_sops(gw, [pydicom.dcmread(p).SOPInstanceUID for p in files["S4"]]) == 0
    # the parts written to temporary files before the refusal are gone
    assert os.listdir(os.path.join(gw.env["KP_STORAGE_ROOT"], ".tmp")) == []


def test_stow_body_over_the_limit(gw, files):
    big = pydicom.dcmread(files["S4"][0])
    big.PixelData = bytes(2 * 1024 * 1024)
    big.Rows, big.Columns = 1024, 1024
    with tempfile.NamedTemporaryFile(suffix=".dcm") as f:
        big.save_as(f.name, write_like_original=False)
        body = multipart([("application/dicom", read(f.name))])
    assert len(body) > 2 * 1024 * 1024
    # H2O may answer (and close) as soon as the headers announce too much, while the client is
    # still sending: so the headers go first and the answer is read before and after the body.
    head = (f"POST /dicom-web/studies HTTP/1.1\r\nHost: 127.0.0.1:{gw.https_port}\r\n"
            f"Content-Type: {STOW_TYPE}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    ctx = ssl._create_unverified_context()
    answer = b""
    with socket.create_connection(("127.0.0.1", gw.https_port), timeout=30) as raw_sock:
        with ctx.wrap_socket(raw_sock) as t:
            t.sendall(head)
            t.settimeout(2)
            try:
                answer = t.recv(65536)
            except (socket.timeout, ssl.SSLError, OSError):
                answer = b""
            if not answer:
                t.settimeout(30)
                try:
                    t.sendall(body)
                except OSError:
                    pass  # closed while we were sending: the answer may still be readable
                try:
                    while b"\r\n\r\n" not in answer:
                        chunk = t.recv(65536)
                        if not chunk:
                            break
                        answer += chunk
                except OSError:
                    pass
    assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
    assert gw.https_ok()
    gw.wait_jobs_settled()
    assert count_sops(gw, [big.SOPInstanceUID]) == 0


def test_stow_same_instance_twice(gw, files):
    paths = files["S3"]
    body = multipart([("application/dicom", read(p)) for p in paths])
    sops = [pydicom.dcmread(p).SOPInstanceUID for p in paths]
    st, h, raw = stow(gw, body)
    assert st == 200, raw[:300]
    gw.wait_jobs_settled()
    gw.wait_indexed(1)
    wait = kp.wait_for(lambda: count_sops(gw, sops) == 3, 60, "S3 indexed")
    assert wait
    stat1 = {s: os.stat(stored_path(gw, s)) for s in sops}
    st, h, raw = stow(gw, body)
    assert st == 200, raw[:300]
    assert len(seq(json.loads(raw), "00081199")) == 3
    gw.wait_jobs_settled()
    assert count_sops(gw, sops) == 3
    for s, p in zip(sops, paths):
        assert stored_bytes(gw, s) == read(p)
        st2 = os.stat(stored_path(gw, s))
        assert (st2.st_ino, st2.st_mtime_ns) == (stat1[s].st_ino, stat1[s].st_mtime_ns)


def test_stow_after_c_store(gw):
    f = os.path.join(T, "CT_small.dcm")
    rc, res, out = gw.storescu([f])
    assert res[f] == "ok", out
    gw.wait_jobs_settled()
    sop = pydicom.dcmread(f).SOPInstanceUID
    kp.wait_for(lambda: count_sops(gw, [sop]) == 1, 60, "CT indexed")
    path = stored_path(gw, sop)
    stored = read(path)
    before = os.stat(path)
    # the very bytes the archive stored from C-STORE, posted again: identical, nothing rewritten
    st, h, raw = stow(gw, multipart([("application/dicom", stored)]))
    assert st == 200, raw[:300]
    gw.wait_jobs_settled()
    assert count_sops(gw, [sop]) == 1
    after = os.stat(path)
    assert read(path) == stored
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    # the source file (another meta header): replaced per the default policy, still one row
    st, h, raw = stow(gw, multipart([("application/dicom", read(f))]))
    assert st == 200, raw[:300]
    gw.wait_jobs_settled()
    assert count_sops(gw, [sop]) == 1
    assert stored_bytes(gw, sop) == read(f)
    aes = sorted(p["ae"] for (p,) in gw.sql(
        "SELECT payload FROM jobs WHERE payload->>'sop' = %s", (sop,)))
    assert aes == ["MODALITY", "STOW-RS", "STOW-RS"], aes


def test_stow_concurrent_posts(gw, files):
    keys = [f"S{k}" for k in range(10, 14)]
    before = gw.count("instances")

    def post(k):
        return stow(gw, multipart([("application/dicom", read(p)) for p in files[k]]))

    with concurrent.futures.ThreadPoolExecutor(4) as ex:
        results = list(ex.map(post, keys))
    for k, (st, h, raw) in zip(keys, results):
        assert st == 200, (k, raw[:300])
        assert len(seq(json.loads(raw), "00081199")) == 10
    gw.wait_jobs_settled()
    gw.wait_indexed(before + 40)
    sops = [pydicom.dcmread(p).SOPInstanceUID for k in keys for p in files[k]]
    assert count_sops(gw, sops) == 40
    for k in keys:
        st, h, body = gw.https("GET", f"/dicom-web/studies/{SYN.study_uid(k)}/instances")
        assert st == 200 and len(json.loads(body)) == 10
    assert gw.https_ok()


# Files storescu would convert (it proposes Explicit VR Little Endian), posted as they are.
AS_POSTED = {"be8": "ExplVR_BigEnd.dcm", "be16": "MR_small_bigendian.dcm",
             "be32mf": "rtdose_expb.dcm", "deflated": "image_dfl.dcm"}
OCTET = 'multipart/related; type="application/octet-stream"'


@pytest.fixture(scope="module")
def as_posted(gw):
    paths = [os.path.join(T, f) for f in AS_POSTED.values()]
    st, h, raw = stow(gw, multipart([("application/dicom", read(p)) for p in paths]))
    assert st == 200, raw[:300]
    gw.wait_jobs_settled()
    sops = [pydicom.dcmread(p).SOPInstanceUID for p in paths]
    kp.wait_for(lambda: count_sops(gw, sops) == len(sops), 60, "as-posted files indexed")
    return paths


@pytest.mark.parametrize("key", ["be8", "be16", "be32mf", "deflated"])
def test_stow_keeps_the_posted_syntax(gw, as_posted, key):
    """Stored in the posted transfer syntax (byte for byte); bulk data and transcoding give what
    DCMTK's dcmconv +te (to Explicit VR Little Endian) gives."""
    f = os.path.join(T, AS_POSTED[key])
    ds = pydicom.dcmread(f)
    assert stored_bytes(gw, ds.SOPInstanceUID) == read(f)
    ref = dcmtk_convert("dcmconv", f, "+te")
    st, h, body = gw.https("GET", url(ds), {"Accept": 'multipart/related; type="application/dicom"'})
    assert st == 200
    (hdrs, data), = multipart_strict(h["Content-Type"], body)
    assert data == read(f)
    assert hdrs["content-type"] == f"application/dicom; transfer-syntax={ds.file_meta.TransferSyntaxUID}"
    st, h, body = gw.https("GET", url(ds), {
        "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.1'})
    assert st == 200
    out = dcm_from_bytes(multipart_strict(h["Content-Type"], body)[0][1])
    assert str(out.file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2.1"
    assert out.PixelData == ref.PixelData
    st, h, body = gw.https("GET", url(ds, "/bulkdata/7FE00010"))
    assert st == 200 and body == ref.PixelData
    st, h, body = gw.https("GET", url(ds, "/bulkdata/7FE00010"), {"Range": "bytes=3-10"})
    assert st == 206 and body == ref.PixelData[3:11]


@pytest.mark.parametrize("key", ["be8", "be16", "be32mf", "deflated"])
def test_stow_posted_syntax_frames_decoded(gw, as_posted, key):
    """Frames of those files asked as uncompressed octet-stream: DCMTK's little-endian frames."""
    f = os.path.join(T, AS_POSTED[key])
    ds = pydicom.dcmread(f)
    frames = native_frames(dcmtk_convert("dcmconv", f, "+te"))
    for n in sorted({1, len(frames)}):
        st, h, body = gw.https("GET", url(ds, f"/frames/{n}"), {"Accept": OCTET})
        assert st == 200, (key, n, body[:300])
        (hdrs, data), = multipart_strict(h["Content-Type"], body)
        assert hdrs["content-type"] == "application/octet-stream; transfer-syntax=1.2.840.10008.1.2.1"
        assert data == frames[n - 1], (key, n)
