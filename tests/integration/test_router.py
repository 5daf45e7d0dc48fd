"""pacs-router: auto-routing (issue 6, item 2; docs/routing.md).

One system A (dicomd, indexer, gateway and TWO routers, so concurrent claims are exercised all
along) routes to real DCMTK storescp processes (bit-preserving, a unique file name per received
instance, so a duplicate delivery shows as a second file) and, over STOW-RS, to a second system
B running our own gateway (bearer token from B's login; A verifies B's self-signed certificate
with router.ca_file). Each test uses its own PatientID in its rule's conditions, so the rules of
the other tests never match its instances."""
import base64
import http.server
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

import kp
from test_modalities_api import api  # (status, json) as the test administrator

ROOT = "1.2.826.0.1.3680043.10.1411.88"
PW = "Router-Api-Pass-7"
CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"


class Dest:
    """A storescp on a free loopback port: bit-preserving, unique file names."""

    def __init__(self, env, aet, port=None, syntax="+xa"):
        self.aet = aet
        self.dir = tempfile.mkdtemp(prefix="kp-route-")
        self.out = os.path.join(self.dir, "in")
        os.makedirs(self.out)
        self.port = port or kp.free_port()
        self.env = env
        self.log = open(os.path.join(self.dir, "storescp.log"), "wb")
        self.p = subprocess.Popen(["storescp", "-aet", aet, "-od", self.out, syntax, "+B", "+uf",
                                   str(self.port)], env=env, stdout=self.log,
                                  stderr=subprocess.STDOUT)
        kp.wait_for(self._echo, 20, f"storescp {aet}")

    def _echo(self):
        r = subprocess.run(["echoscu", "-aec", self.aet, "127.0.0.1", str(self.port)],
                           capture_output=True, env=self.env, timeout=20)
        return r.returncode == 0

    def received(self):
        """[SOPInstanceUID] of every file received, one entry per file (duplicates repeat)."""
        return [str(pydicom.dcmread(os.path.join(self.out, f), stop_before_pixels=True)
                    .SOPInstanceUID) for f in sorted(os.listdir(self.out))
                if not f.startswith(".")]

    def path_of(self, sop):
        for f in os.listdir(self.out):
            p = os.path.join(self.out, f)
            if str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) == sop:
                return p
        return None

    def stop(self):
        if self.p.poll() is None:
            self.p.terminate()
            self.p.wait(timeout=20)
        self.log.close()

    def remove(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def ds_bytes(path):
    """The data set of a Part 10 file without preamble and meta header."""
    with open(path, "rb") as f:
        raw = f.read()
    assert raw[128:132] == b"DICM", path
    meta_len = int.from_bytes(raw[140:144], "little")
    return raw[144 + meta_len:]


def make(d, tag, n, pid, modality="CT", desc="", accession="A1", series=1):
    """n instances of study ROOT.<tag> (series .series), PatientID pid; returns the paths and
    their SOP Instance UIDs."""
    paths, sops = [], []
    for k in range(1, n + 1):
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.SOPClassUID = CT if modality == "CT" else MR
        ds.SOPInstanceUID = f"{ROOT}.{tag}.{series}.{k}"
        ds.StudyInstanceUID = f"{ROOT}.{tag}"
        ds.SeriesInstanceUID = f"{ROOT}.{tag}.{series}"
        ds.PatientName = "ROUTE^TEST"
        ds.PatientID = pid
        ds.StudyDate, ds.StudyTime = "20240101", "120000"
        if accession is not None:
            ds.AccessionNumber = accession
        ds.StudyDescription = desc
        ds.Modality = modality
        ds.SeriesNumber = series
        ds.InstanceNumber = k
        ds.Rows = ds.Columns = 8
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        ds.PixelRepresentation = 0
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.PixelData = bytes([k % 256]) * 128
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.is_little_endian, ds.is_implicit_VR = True, False
        p = os.path.join(d, f"{tag}-{series}-{k}.dcm")
        ds.save_as(p, write_like_original=False)
        paths.append(p)
        sops.append(ds.SOPInstanceUID)
    return paths, sops


@pytest.fixture(scope="module")
def sys_b(cluster):
    s = kp.System(cluster, gateway=True)
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def a(cluster, sys_b):
    env = {"KP_ROUTER_SCAN_INTERVAL": "1", "KP_ROUTER_BACKOFF_BASE": "1",
           "KP_ROUTER_BACKOFF_MAX": "4", "KP_ROUTER_TIMEOUT": "5",
           "KP_ROUTER_CA_FILE": os.path.join(sys_b.dir, "var", "tls", "server.crt")}
    s = kp.System(cluster, gateway=True, routers=2, extra_env=env)
    s.dests = []
    try:
        s.add_user("drroute", PW, "doctor", sites=["default"])
        s.tmp = tempfile.mkdtemp(prefix="kp-route-data-")
        yield s
    finally:
        for d in s.dests:
            d.remove()
        shutil.rmtree(s.tmp, ignore_errors=True)
        s.stop()




def dest(a, aet, port=None, register=True, syntax="+xa"):
    d = Dest(a.env, aet, port, syntax)
    a.dests.append(d)
    if register:
        a.pacsctl("ae", "add", aet, "--host", "127.0.0.1", "--port", str(d.port))
    return d


def add_rule(a, **rule):
    st, j = api(a, "POST", "/api/routes", rule)
    assert st == 201, j
    return j


def send(a, files, aet="MODALITY"):
    rc, res, out = a.storescu(files, aet=aet)
    assert all(res.get(f) == "ok" for f in files), out[-2000:]


def deliveries(a, rule_id):
    st, j = api(a, "GET", f"/api/routes/deliveries?rule={rule_id}&limit=1000")
    assert st == 200, j
    return j["items"]


def wait_states(a, rule_id, n, state="delivered", timeout=60):
    def ok():
        items = deliveries(a, rule_id)
        return items if len(items) == n and all(i["state"] == state for i in items) else None
    return kp.wait_for(ok, timeout, f"{n} deliveries of rule {rule_id} {state}", 0.3)


def stored_path(a, sop):
    rel = a.sql("SELECT path FROM instances WHERE sop_uid = %s", (sop,))[0][0]
    return os.path.join(a.env["KP_STORAGE_ROOT"], rel)


def settle(a, seconds=3):
    """Lets a few scan and send rounds pass (to see that nothing more happens)."""
    time.sleep(seconds)


# ---- conditions ----------------------------------------------------------------------------

def test_conditions_match_exactly_the_intended_instances(a):
    d1 = dest(a, "ROUTE_D1")
    r1 = add_rule(a, name="ct-from-x", conditions=[
        {"attribute": "PatientID", "op": "equals", "value": "RT-COND"},
        {"attribute": "Modality", "op": "equals", "value": "CT"},
        {"attribute": "CallingAE", "op": "equals", "value": "CT_X"},
        {"attribute": "CalledAE", "op": "wildcard", "value": "KLIN*"}],
        destinations=[{"type": "dicom", "ae": "ROUTE_D1"}])
    r2 = add_rule(a, name="regex-desc", conditions=[
        {"attribute": "(0010,0020)", "op": "equals", "value": "RT-REGEX"},
        {"attribute": "StudyDescription", "op": "regex", "value": "^HEAD.*CONTRAST$"}],
        destinations=[{"type": "dicom", "ae": "ROUTE_D1"}])
    r3 = add_rule(a, name="no-accession", conditions=[
        {"attribute": "00100020", "op": "equals", "value": "RT-ABSENT"},
        {"attribute": "AccessionNumber", "op": "absent"}],
        destinations=[{"type": "dicom", "ae": "ROUTE_D1"}])
    t = a.tmp
    ct_x, ct_x_sops = make(t, "10", 2, "RT-COND")
    ct_y, _ = make(t, "11", 1, "RT-COND")
    mr_x, _ = make(t, "12", 1, "RT-COND", modality="MR")
    head, head_sops = make(t, "13", 1, "RT-REGEX", desc="HEAD WITH CONTRAST")
    nohead, _ = make(t, "14", 1, "RT-REGEX", desc="HEAD WITH CONTRAST, LATE")
    noacc, noacc_sops = make(t, "15", 1, "RT-ABSENT", accession=None)
    acc, _ = make(t, "16", 1, "RT-ABSENT", accession="X9")
    send(a, ct_x + mr_x, aet="CT_X")
    send(a, ct_y, aet="CT_Y")
    send(a, head + nohead + noacc + acc)
    expect = set(ct_x_sops + head_sops + noacc_sops)
    wait_states(a, r1["id"], 2)
    wait_states(a, r2["id"], 1)
    wait_states(a, r3["id"], 1)
    a.wait_indexed(8)
    settle(a)
    got = d1.received()
    assert sorted(got) == sorted(expect)  # exactly these, each once
    assert len(deliveries(a, r1["id"])) == 2 and len(deliveries(a, r3["id"])) == 1
    for sop in expect:  # bit for bit what we stored (same syntax: no transcoding)
        assert ds_bytes(d1.path_of(sop)) == ds_bytes(stored_path(a, sop))
    # the index records both AE titles of the receiving association
    assert a.sql("SELECT calling_ae, called_ae FROM instances WHERE sop_uid = %s",
                 (ct_x_sops[0],)) == [("CT_X", "KLINIKA")]
    d = deliveries(a, r1["id"])[0]
    assert d["destination"] == "ROUTE_D1" and d["rule_name"] == "ct-from-x"
    assert d["delivered_at"] and d["attempts"] == 1 and d["last_error"] is None


def test_stow_to_a_second_gateway(a, sys_b):
    url = f"https://127.0.0.1:{sys_b.https_port}/dicom-web/studies"
    r = add_rule(a, name="to-b", conditions=[
        {"attribute": "PatientID", "op": "equals", "value": "RT-STOW"}],
        destinations=[{"type": "stow", "url": url,
                       "auth": {"type": "bearer", "token": sys_b.token}}])
    bad = add_rule(a, name="to-b-bad-token", conditions=[
        {"attribute": "PatientID", "op": "equals", "value": "RT-STOW"}],
        destinations=[{"type": "stow", "url": url,
                       "auth": {"type": "bearer", "token": "not-a-token"}}], max_attempts=5)
    files, sops = make(a.tmp, "20", 3, "RT-STOW")
    send(a, files)
    wait_states(a, r["id"], 3)
    sys_b.wait_indexed(3)
    for sop in sops:
        rel = sys_b.sql("SELECT path FROM instances WHERE sop_uid = %s", (sop,))[0][0]
        with open(os.path.join(sys_b.env["KP_STORAGE_ROOT"], rel), "rb") as f:
            theirs = f.read()
        with open(stored_path(a, sop), "rb") as f:
            assert f.read() == theirs
    # a refusal (401) is not retried: dead at the first attempt, with the reason
    items = wait_states(a, bad["id"], 3, "dead")
    assert all(i["attempts"] == 1 and "HTTP 401" in i["last_error"] for i in items), items
    settle(a, 2)
    assert sys_b.count("instances") == 3  # each sent once


def test_transcodes_for_a_destination_that_accepts_only_uncompressed(a):
    """A JPEG-LS instance (stored as received) to a peer accepting only Implicit VR Little
    Endian: transcoded (the C-MOVE code path), pixels identical to DCMTK's own decoding."""
    src = os.path.join(kp.PYDICOM_DATA, "test_files", "MR_small_jpeg_ls_lossless.dcm")
    if not os.path.exists(src):
        pytest.skip("pydicom test file missing")
    d = dest(a, "ROUTE_IMPL", syntax="+xi")
    r = add_rule(a, name="to-implicit", conditions=[
        {"attribute": "PatientID", "op": "equals", "value": "RT-JLS"}],
        destinations=[{"type": "dicom", "ae": "ROUTE_IMPL"}])
    ds = pydicom.dcmread(src)
    ds.PatientID = "RT-JLS"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{ROOT}.70.1.1"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = f"{ROOT}.70", f"{ROOT}.70.1"
    path = os.path.join(a.tmp, "jls.dcm")
    ds.save_as(path, write_like_original=True)
    rc, res, out = a.storescu([path], extra=kp.storescu_flags(path))
    assert res.get(path) == "ok", out[-2000:]
    wait_states(a, r["id"], 1)
    got = d.path_of(f"{ROOT}.70.1.1")
    assert str(pydicom.dcmread(got).file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2"
    ref = os.path.join(a.tmp, "jls-decoded.dcm")
    assert subprocess.run(["dcmdjpls", stored_path(a, f"{ROOT}.70.1.1"), ref]).returncode == 0
    assert pydicom.dcmread(got).PixelData == pydicom.dcmread(ref).PixelData


class StowStub:
    """A plain-HTTP STOW-RS endpoint answering from a script of statuses (the last repeats),
    recording each request's Authorization header and multipart parts; with failed_sop, a 200
    lists the instance in a FailedSOPSequence (as a server that refused it answers)."""

    def __init__(self, statuses, failed_sop=False):
        self.statuses, self.requests = list(statuses), []
        stub = self

        class H(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                ctype = self.headers["Content-Type"]
                boundary = ctype.split("boundary=")[1].strip('"').encode()
                parts = [p.split(b"\r\n\r\n", 1)[1][:-2]
                         for p in body.split(b"--" + boundary)[1:-1]]
                stub.requests.append((self.headers.get("Authorization"), parts))
                st = stub.statuses.pop(0) if len(stub.statuses) > 1 else stub.statuses[0]
                out = b"{}" if not failed_sop else json.dumps(
                    {"00081198": {"vr": "SQ", "Value": [{"00081197": {"vr": "US",
                                                                       "Value": [272]}}]}}
                ).encode()
                self.send_response(st)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *a):
                pass

        self.srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.srv.server_address[1]}/dicom-web/studies"
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()

    def stop(self):
        self.srv.shutdown()
        self.srv.server_close()


def test_stow_basic_auth_5xx_retried_failed_sop_is_dead(a):
    ok = StowStub([503, 200])
    refuse = StowStub([200], failed_sop=True)
    try:
        auth = {"type": "basic", "username": "router", "password": "pa:ss"}
        r1 = add_rule(a, name="stub-ok", conditions=[
            {"attribute": "PatientID", "op": "equals", "value": "RT-STUB"}],
            destinations=[{"type": "stow", "url": ok.url, "auth": auth}])
        r2 = add_rule(a, name="stub-refuse", conditions=[
            {"attribute": "PatientID", "op": "equals", "value": "RT-STUB"}],
            destinations=[{"type": "stow", "url": refuse.url}])
        files, sops = make(a.tmp, "80", 1, "RT-STUB")
        send(a, files)
        items = wait_states(a, r1["id"], 1)
        assert items[0]["attempts"] == 2  # the 503 was retried
        want = "Basic " + base64.b64encode(b"router:pa:ss").decode()
        assert [h for h, _ in ok.requests] == [want, want]
        with open(stored_path(a, sops[0]), "rb") as f:
            assert ok.requests[-1][1] == [f.read()]  # the stored file, as one part
        items = wait_states(a, r2["id"], 1, "dead")
        assert items[0]["attempts"] == 1
        assert "refused" in items[0]["last_error"] and "272" in items[0]["last_error"], items
        assert refuse.requests[0][0] is None  # auth none: no header
    finally:
        ok.stop()
        refuse.stop()


# ---- the stable-study trigger --------------------------------------------------------------

def test_study_trigger_fires_once_per_study(a):
    d2 = dest(a, "ROUTE_D2")
    r = add_rule(a, name="stable-study", trigger="study", stable_seconds=2, conditions=[
        {"attribute": "PatientID", "op": "equals", "value": "RT-STUDY"}],
        destinations=[{"type": "dicom", "ae": "ROUTE_D2"}])
    s1, s1_sops = make(a.tmp, "30", 2, "RT-STUDY")
    s1b, s1b_sops = make(a.tmp, "30", 2, "RT-STUDY", series=2)
    s2, s2_sops = make(a.tmp, "31", 1, "RT-STUDY")
    send(a, s1)
    time.sleep(1)  # the study is still growing: not stable yet
    assert not [x for x in deliveries(a, r["id"])]
    send(a, s1b + s2)
    items = wait_states(a, r["id"], 2)
    assert all(i["sop_uid"] is None for i in items)
    assert sorted(i["study_uid"] for i in items) == [f"{ROOT}.30", f"{ROOT}.31"]
    settle(a, 4)
    assert len(deliveries(a, r["id"])) == 2  # once per study
    assert sorted(d2.received()) == sorted(s1_sops + s1b_sops + s2_sops)


# ---- retries, dead letter, manual retry ----------------------------------------------------

def test_down_destination_backs_off_goes_dead_then_manual_retry_delivers(a):
    port = kp.free_port()
    a.pacsctl("ae", "add", "ROUTE_DOWN", "--host", "127.0.0.1", "--port", str(port))
    r = add_rule(a, name="to-down", max_attempts=3, conditions=[
        {"attribute": "PatientID", "op": "equals", "value": "RT-DOWN"}],
        destinations=[{"type": "dicom", "ae": "ROUTE_DOWN"}])
    files, sops = make(a.tmp, "40", 1, "RT-DOWN")
    send(a, files)
    seen = {}  # attempts -> the wait the router scheduled after that failure
    end = time.time() + 60
    while time.time() < end:
        row = a.sql("SELECT state, attempts, extract(epoch FROM next_attempt_at - updated_at) "
                    "FROM route_deliveries WHERE rule_id = %s", (r["id"],))
        if row:
            state, att, wait = row[0]
            if state == "pending" and att:
                seen[att] = float(wait)
            if state == "dead":
                break
        time.sleep(0.05)
    items = deliveries(a, r["id"])
    assert len(items) == 1 and items[0]["state"] == "dead", items
    assert items[0]["attempts"] == 3 and items[0]["last_error"], items
    # exponential backoff: 1 s after the first failure, 2 s after the second
    assert 1 in seen and 2 in seen, seen
    assert abs(seen[1] - 1) < 0.5 and abs(seen[2] - 2) < 0.5, seen
    # the destination comes up; an administrator retries; it is delivered, identical
    d = dest(a, "ROUTE_DOWN", port=port, register=False)
    st, j = api(a, "POST", f"/api/routes/deliveries/{items[0]['id']}/retry")
    assert st == 200 and j["state"] == "pending" and j["attempts"] == 0, j
    wait_states(a, r["id"], 1)
    assert d.received() == sops
    assert ds_bytes(d.path_of(sops[0])) == ds_bytes(stored_path(a, sops[0]))
    # a delivered one is never sent again
    st, j = api(a, "POST", f"/api/routes/deliveries/{items[0]['id']}/retry")
    assert st == 409, j
    settle(a, 2)
    assert d.received() == sops


def test_router_down_loses_nothing(a):
    d3 = dest(a, "ROUTE_D3")
    r = add_rule(a, name="while-down", conditions=[
        {"attribute": "PatientID", "op": "equals", "value": "RT-RESTART"}],
        destinations=[{"type": "dicom", "ae": "ROUTE_D3"}])
    for name in ("pacs-router#0", "pacs-router#1"):
        a.kill(name)
    try:
        files, sops = make(a.tmp, "50", 4, "RT-RESTART")
        send(a, files)
        kp.wait_for(lambda: a.sql("SELECT count(*) FROM instances WHERE sop_uid LIKE %s",
                                  (f"{ROOT}.50.%",))[0][0] == 4, 60, "indexed")
        assert deliveries(a, r["id"]) == []
    finally:
        a.start("pacs-router#0", "pacs-router")
        a.start("pacs-router#1", "pacs-router")
    wait_states(a, r["id"], 4)
    settle(a, 2)
    assert sorted(d3.received()) == sorted(sops)


# ---- API -----------------------------------------------------------------------------------

def test_api_validation(a):
    dest(a, "ROUTE_V")
    ok = {"name": "v", "destinations": [{"type": "dicom", "ae": "ROUTE_V"}]}
    cases = [
        (dict(ok, conditions=[{"attribute": "Modality", "op": "regex", "value": "(["}]), "regex"),
        (dict(ok, conditions=[{"attribute": "Modality", "op": "like", "value": "CT"}]), ".op"),
        (dict(ok, conditions=[{"attribute": "NoSuchKeyword", "op": "present"}]), "attribute"),
        (dict(ok, destinations=[{"type": "dicom", "ae": "NOT_REGISTERED"}]), "ae"),
        (dict(ok, destinations=[{"type": "stow", "url": "ftp://x/y"}]), "url"),
        (dict(ok, destinations=[]), "destinations"),
        (dict(ok, trigger="sometimes"), "trigger"),
        (dict(ok, time_window={"from": "25:00", "to": "08:00"}), "time_window"),
        (dict(ok, destinations=[{"type": "stow", "url": "https://h/s",
                                 "auth": {"type": "bearer"}}]), "token"),
        ({"destinations": ok["destinations"]}, "name"),
    ]
    for body, field in cases:
        st, j = api(a, "POST", "/api/routes", body)
        assert st == 400 and field in j["error"]["message"], (body, st, j)
    assert not a.sql("SELECT 1 FROM route_rules WHERE name = 'v'")
    # secrets are stored, never returned; a PUT that sends back what GET showed keeps them
    r = add_rule(a, name="secret", conditions=[],
                 time_window={"from": "08:00", "to": "18:00", "days": [1, 2, 3, 4, 5]},
                 destinations=[{"type": "stow", "url": "https://peer.example/dicom-web/studies",
                                "auth": {"type": "basic", "username": "u", "password": "S3CRET"}}],
                 enabled=False)
    assert "S3CRET" not in json.dumps(r)
    assert r["destinations"][0]["auth"] == {"type": "basic", "set": True, "username": "u"}
    st, j = api(a, "GET", "/api/routes")
    assert st == 200 and "S3CRET" not in json.dumps(j) and any(x["id"] == r["id"]
                                                                for x in j["items"])
    st, j = api(a, "PUT", f"/api/routes/{r['id']}",
                {"description": "changed", "destinations": r["destinations"]})
    assert st == 200 and j["description"] == "changed", j
    assert a.sql("SELECT destinations->0->'auth'->>'password' FROM route_rules WHERE id = %s",
                 (r["id"],)) == [("S3CRET",)]
    st, j = api(a, "POST", "/api/routes", dict(ok, name="secret"))
    assert st == 409, j
    st, j = api(a, "GET", f"/api/routes/{r['id']}")
    assert st == 200 and j["time_window"]["days"] == [1, 2, 3, 4, 5] and j["enabled"] is False
    st, _ = api(a, "DELETE", f"/api/routes/{r['id']}")
    assert st == 204
    st, _ = api(a, "GET", f"/api/routes/{r['id']}")
    assert st == 404
    st, j = api(a, "GET", "/api/routes/deliveries?state=bogus")
    assert st == 400
    st, j = api(a, "GET", "/api/routes/deliveries?limit=1")
    assert st == 200 and set(j) == {"items", "total"}
    # changes are audited as admin.route
    kp.wait_for(lambda: a.sql("SELECT count(*) FROM audit_log WHERE action = 'admin.route'")
                [0][0] >= 3, 30, "admin.route audit records")


def test_doctor_is_refused(a):
    st, j = a.login("drroute", PW)
    assert st == 200, j
    tok = j["access_token"]
    for method, path, b in (("GET", "/api/routes", None),
                            ("POST", "/api/routes", {"name": "dr"}),
                            ("GET", "/api/routes/deliveries", None),
                            ("POST", "/api/routes/deliveries/1/retry", None),
                            ("DELETE", "/api/routes/1", None)):
        st, j = api(a, method, path, b, token=tok)
        assert st == 403 and j["error"]["code"] == "forbidden", (method, path, st)


def test_pacsctl_route(a):
    dest(a, "ROUTE_CTL")
    rule = {"name": "ctl", "conditions": [{"attribute": "PatientID", "op": "equals",
                                           "value": "RT-CTL"}],
            "destinations": [{"type": "dicom", "ae": "ROUTE_CTL"}], "max_attempts": 2}
    path = os.path.join(a.tmp, "rule.json")
    with open(path, "w") as f:
        json.dump(rule, f)
    out = a.pacsctl("route", "add", "--json", path).stdout
    rid = int(out.split()[1])
    assert "ctl" in a.pacsctl("route", "list").stdout
    bad = dict(rule, name="ctl2", conditions=[{"attribute": "Modality", "op": "regex",
                                               "value": "("}])
    with open(path, "w") as f:
        json.dump(bad, f)
    r = a.pacsctl("route", "add", "--json", path, check=False)
    assert r.returncode == 1 and "regex" in r.stderr
    files, sops = make(a.tmp, "60", 1, "RT-CTL")
    send(a, files)
    items = wait_states(a, rid, 1)
    out = a.pacsctl("route", "deliveries", "--state", "delivered", "--rule", str(rid)).stdout
    assert sops[0] in out
    r = a.pacsctl("route", "retry", str(items[0]["id"]), check=False)
    assert r.returncode == 1 and "delivered" in r.stderr
    a.sql("UPDATE route_deliveries SET state = 'dead' WHERE id = %s", (items[0]["id"],))
    dead = a.sql("SELECT count(*) FROM route_deliveries WHERE state = 'dead'")[0][0]
    assert dead >= 1
    assert f"{dead} dead" in a.pacsctl("route", "retry", "--dead").stdout
    wait_states(a, rid, 1)
    a.pacsctl("route", "remove", str(rid))
    assert not a.sql("SELECT 1 FROM route_deliveries WHERE rule_id = %s", (rid,))
