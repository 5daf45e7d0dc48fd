"""Access to patient data leaves audit records: DICOMweb queries, study views (once per user and
study for a while, not once per frame), downloads (whole instances, WADO-URI), uploads (STOW-RS)
and changes through the admin API, each with who, from where, which study and patient."""
import json
import os
import uuid

import pydicom
import pytest

import kp

T = os.path.join(kp.PYDICOM_DATA, "test_files")
CT = os.path.join(T, "CT_small.dcm")
MR = os.path.join(T, "MR_small.dcm")
PW = "Audit-Dicomweb-Pass-8"


@pytest.fixture(scope="module")
def gw(cluster):
    s = kp.System(cluster, gateway=True)
    try:
        s.send_each([CT])
        s.add_user("drwho", PW, "doctor", sites=["default"])
        yield s
    finally:
        s.stop()


def rows(gw, n_min, actor="drwho"):
    def got():
        return gw.sql("SELECT action, actor, client, study_uid, patient_id, detail FROM audit_log "
                      "WHERE actor = %s ORDER BY seq", (actor,))
    kp.wait_for(lambda: len(got()) >= n_min, 30, f"{n_min} audit records of {actor}", 0.2)
    return got()


def test_query_view_download_are_recorded(gw):
    st, j = gw.login("drwho", PW)
    h = {"Authorization": "Bearer " + j["access_token"]}
    ds = pydicom.dcmread(CT)
    inst = (f"/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
            f"/instances/{ds.SOPInstanceUID}")
    assert gw.https("GET", "/dicom-web/studies?PatientName=*", h)[0] == 200
    for suffix in ("/metadata", "/frames/1", "/frames/1", "/rendered"):  # one look at the study
        assert gw.https("GET", inst + suffix, h)[0] == 200
    assert gw.https("GET", inst, h)[0] == 200
    got = rows(gw, 4)  # login, query, view, download
    actions = [r[0] for r in got]
    assert actions == ["auth.login", "study.query", "study.view", "study.download"], actions
    for action, actor, client, study, pid, detail in got[1:]:
        assert client == "127.0.0.1"
    q, view, dl = got[1], got[2], got[3]
    assert q[5]["query"] == "PatientName=*"
    assert view[3] == ds.StudyInstanceUID and view[4] == ds.PatientID
    assert dl[3] == ds.StudyInstanceUID and dl[5]["path"] == inst
    # a refused request (another permission) is not an access: no record
    assert gw.https("POST", "/dicom-web/studies", dict(h, **{"Content-Type": "application/json"}),
                    "{}")[0] == 403
    assert len(rows(gw, 4)) == 4


def test_upload_and_admin_changes_are_recorded(gw):
    bnd = uuid.uuid4().hex
    body = (b"--" + bnd.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" +
            open(MR, "rb").read() + b"\r\n--" + bnd.encode() + b"--\r\n")
    st, h, b = gw.https("POST", "/dicom-web/studies",
                        {"Content-Type": f'multipart/related; type="application/dicom"; boundary={bnd}'},
                        body)
    assert st == 200, b
    st, h, b = gw.https("POST", "/api/sites", {"Content-Type": "application/json"},
                        json.dumps({"name": "east", "description": "East wing"}))
    assert st == 201, b
    kp.wait_for(lambda: any(r[0] == "study.upload" for r in rows(gw, 1, gw.ADMIN)), 30,
                "the upload recorded")
    up = [r for r in rows(gw, 1, gw.ADMIN) if r[0] == "study.upload"]
    assert up and up[0][3] == pydicom.dcmread(MR).StudyInstanceUID
    assert up[0][5]["stored"] == 1 and up[0][5]["failed"] == 0
    kp.wait_for(lambda: any(r[0] == "admin.site" for r in rows(gw, 1, gw.ADMIN)), 30,
                "the admin change recorded")
    r = gw.pacsctl("audit", "verify")
    assert "intact" in r.stdout


def test_dimse_associations_and_queries_are_recorded(gw):
    import subprocess
    assert gw.echo(aet="AUDITSCU")
    assert not gw.echo(aet="AUDITSCU", aec="NOT_US")  # refused: called AE is not ours
    r = subprocess.run(["findscu", "-S", "-aet", "AUDITSCU", "-aec", "KLINIKA",
                        "-k", "QueryRetrieveLevel=STUDY", "-k", "PatientName=*",
                        "-k", "StudyInstanceUID", "127.0.0.1", str(gw.port)],
                       capture_output=True, text=True, timeout=60, env=gw.env)
    assert r.returncode == 0, r.stderr
    got = rows(gw, 4, "AUDITSCU")
    assoc = [g for g in got if g[0] == "dicom.association"]
    assert [g[5].get("reason") for g in assoc][:2] == [None, "called AE title is not ours"]
    assert all(g[2] == "127.0.0.1" for g in assoc)
    find = [g for g in got if g[0] == "dicom.find"]
    assert find and find[0][5]["level"] == "STUDY" and find[0][5]["keys"]["00100010"] == "*"
    assert "intact" in gw.pacsctl("audit", "verify").stdout



def test_pacsctl_user_changes_are_recorded(gw):
    gw.add_user("termuser", PW, "operator")
    gw.pacsctl("user", "disable", "termuser")
    def got():
        return gw.sql("SELECT action, actor, client, detail FROM audit_log WHERE "
                      "detail->>'target' = 'termuser' ORDER BY seq")
    kp.wait_for(lambda: len(got()) >= 2, 30, "the two pacsctl changes recorded", 0.2)
    r = got()
    assert [x[3]["command"] for x in r] == ["add", "disable"]
    assert all(x[0] == "admin.user" and x[1].startswith("pacsctl:") and x[2] == "local" for x in r)
