"""The reports API (docs/reports.md): the life cycle of a report (draft, edits with optimistic
locking, signing, amending, history), templates, site scope and permissions, validation, audit
records, and PDF render requests with the download of a rendered file.

Two studies: CT_small in the site `default`, MR_small moved to the site `north`. doc1 is a doctor
of `default`, doc2 a doctor of `north`, op1 an operator of `default`; the administrator sees every
site. No pacs-reporter needs to run: a finished render is simulated by writing a PDF file under
the storage root and marking its report_pdfs row done, as the worker would."""
import hashlib
import json
import re
import os
import signal

import pydicom
import pytest

import kp

T = os.path.join(kp.PYDICOM_DATA, "test_files")
CT = os.path.join(T, "CT_small.dcm")
MR = os.path.join(T, "MR_small.dcm")
PW = "Reports-Api-Pass-42"
SECTIONS = ("clinical_information", "technique", "findings", "impression", "recommendations")


@pytest.fixture(scope="module")
def gw(cluster):
    s = kp.System(cluster, gateway=True)
    try:
        s.send_each([CT, MR])
        s.sql("INSERT INTO sites (name) VALUES ('north')")
        mr = pydicom.dcmread(MR, stop_before_pixels=True)
        s.sql("UPDATE studies SET site_id = (SELECT id FROM sites WHERE name = 'north') "
              "WHERE study_uid = %s", (mr.StudyInstanceUID,))
        s.add_user("doc1", PW, "doctor", sites=["default"])
        s.add_user("doc2", PW, "doctor", sites=["north"])
        s.add_user("op1", PW, "operator", sites=["default"])
        s.sql("UPDATE users SET display_name = 'Dr. Anna Petrova' WHERE username = 'doc1'")
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def tok(gw):
    out = {}
    for u in ("doc1", "doc2", "op1"):
        st, j = gw.login(u, PW)
        assert st == 200, j
        out[u] = j["access_token"]
    out["admin"] = gw.token
    return out


def call(gw, token, method, path, body=None, raw=None, ctype="application/json"):
    """(status, parsed JSON or raw bytes, headers)."""
    h = {"Authorization": "Bearer " + token}
    data = None
    if body is not None or raw is not None:
        h["Content-Type"] = ctype
        data = raw if raw is not None else json.dumps(body)
    st, hd, b = gw.https(method, path, h, data, auth=False)
    if hd.get("Content-Type", "").startswith("application/json") and b:
        return st, json.loads(b), hd
    return st, b, hd


def uids():
    ct = pydicom.dcmread(CT, stop_before_pixels=True)
    mr = pydicom.dcmread(MR, stop_before_pixels=True)
    return ct, mr


def create(gw, token, study, **body):
    st, j, _ = call(gw, token, "POST", f"/api/studies/{study}/reports", body)
    assert st == 201, j
    return j


def test_life_cycle(gw, tok):
    ct, _ = uids()
    d = tok["doc1"]
    r = create(gw, d, ct.StudyInstanceUID, language="ru",
               sections={"findings": "Очаговых изменений нет. «Щ»", "impression": ""})
    rid = r["id"]
    assert r["status"] == "draft" and r["lock_version"] == 1 and r["language"] == "ru"
    assert r["study_uid"] == ct.StudyInstanceUID and r["created_by"] == "doc1"
    assert r["study"]["patient_id"] == ct.PatientID and r["study"]["site"] == "default"
    cur = r["current"]
    assert cur["version"] == 1 and cur["status"] == "draft" and cur["author"] == "doc1"
    assert cur["author_name"] == "Dr. Anna Petrova"
    assert set(cur["sections"]) == set(SECTIONS)
    assert cur["sections"]["findings"] == "Очаговых изменений нет. «Щ»"
    assert r["draft_version"] == 1 and r["final_version"] is None
    assert [v["version"] for v in r["versions"]] == [1]

    # an edit: only the sections sent change; lock_version moves on
    st, j, _ = call(gw, d, "PUT", f"/api/reports/{rid}",
                    {"lock_version": 1, "sections": {"impression": "**Норма.**\n- пункт"}})
    assert st == 200, j
    assert j["lock_version"] == 2
    assert j["current"]["sections"]["impression"] == "**Норма.**\n- пункт"
    assert j["current"]["sections"]["findings"] == "Очаговых изменений нет. «Щ»"

    # a stale lock_version: 409 with the current one
    st, j, _ = call(gw, d, "PUT", f"/api/reports/{rid}",
                    {"lock_version": 1, "sections": {"findings": "lost update"}})
    assert st == 409, j
    assert j["error"]["code"] == "conflict" and j["error"]["lock_version"] == 2
    st, j, _ = call(gw, d, "POST", f"/api/reports/{rid}/sign", {"lock_version": 1})
    assert st == 409 and j["error"]["lock_version"] == 2
    st, j, _ = call(gw, d, "POST", f"/api/reports/{rid}/sign", {})
    assert st == 400 and j["error"]["code"] == "invalid_argument"

    st, j, _ = call(gw, d, "POST", f"/api/reports/{rid}/sign", {"lock_version": 2})
    assert st == 200, j
    assert j["status"] == "final" and j["lock_version"] == 3
    assert j["final_version"] == 1 and j["draft_version"] is None
    assert j["signed_by"] == "doc1" and j["signed_name"] == "Dr. Anna Petrova" and j["signed_at"]
    assert j["current"]["status"] == "final" and j["current"]["signed_at"]

    # a signed report is never edited in place, signed twice, or deleted
    st, j, _ = call(gw, d, "PUT", f"/api/reports/{rid}",
                    {"lock_version": 3, "sections": {"findings": "changed"}})
    assert st == 409 and "amend" in j["error"]["message"]
    st, j, _ = call(gw, d, "POST", f"/api/reports/{rid}/sign", {"lock_version": 3})
    assert st == 409
    st, j, _ = call(gw, tok["admin"], "DELETE", f"/api/reports/{rid}")
    assert st == 409

    # amend: a new draft version with the signed text, superseding it
    st, j, _ = call(gw, d, "POST", f"/api/reports/{rid}/amend", {"lock_version": 3})
    assert st == 201, j
    assert j["status"] == "draft" and j["lock_version"] == 4
    assert j["current"]["version"] == 2 and j["current"]["supersedes"] == 1
    assert j["current"]["sections"]["findings"] == "Очаговых изменений нет. «Щ»"
    assert j["final_version"] == 1 and j["draft_version"] == 2
    st, _, _ = call(gw, d, "POST", f"/api/reports/{rid}/amend", {})
    assert st == 409  # one amendment at a time
    st, j, _ = call(gw, d, "PUT", f"/api/reports/{rid}",
                    {"lock_version": 4, "sections": {"findings": "Дополнение: киста 5 мм."},
                     "language": "en"})
    assert st == 200 and j["lock_version"] == 5 and j["language"] == "en"
    st, j, _ = call(gw, d, "POST", f"/api/reports/{rid}/sign", {"lock_version": 5})
    assert st == 200, j
    assert j["status"] == "amended" and j["final_version"] == 2
    hist = {v["version"]: v for v in j["versions"]}
    assert hist[1]["status"] == "amended" and hist[2]["status"] == "final"
    assert hist[2]["supersedes"] == 1 and "sections" not in hist[1]

    # the old signed text is kept, unchanged
    st, v1, _ = call(gw, d, "GET", f"/api/reports/{rid}/versions/1")
    assert st == 200 and v1["status"] == "amended" and v1["signed_by"] == "doc1"
    assert v1["sections"]["findings"] == "Очаговых изменений нет. «Щ»" and v1["language"] == "ru"
    st, v2, _ = call(gw, d, "GET", f"/api/reports/{rid}/versions/2")
    assert st == 200 and v2["sections"]["findings"] == "Дополнение: киста 5 мм."
    assert call(gw, d, "GET", f"/api/reports/{rid}/versions/3")[0] == 404
    st, g, _ = call(gw, d, "GET", f"/api/reports/{rid}")
    assert st == 200 and g["lock_version"] == 6 and g["status"] == "amended"

    # the study's reports and the worklist view
    st, j, _ = call(gw, d, "GET", f"/api/studies/{ct.StudyInstanceUID}/reports")
    assert st == 200 and [x["id"] for x in j["reports"]] == [rid]
    assert [v["status"] for v in j["reports"][0]["versions"]] == ["amended", "final"]
    st, j, _ = call(gw, d, "GET", f"/api/reports?study={ct.StudyInstanceUID}")
    assert st == 200 and j["total"] == 1
    item = j["items"][0]
    assert item["id"] == rid and item["status"] == "amended" and item["final_version"] == 2
    assert item["patient_id"] == ct.PatientID


def test_concurrent_saves(gw, tok):
    """Two editors saving from the same lock_version at once: exactly one wins, the other gets
    409 and the text is the winner's."""
    import concurrent.futures
    ct, _ = uids()
    r = create(gw, tok["doc1"], ct.StudyInstanceUID, sections={"findings": "start"})

    def save(i):
        return call(gw, tok["doc1"] if i % 2 else tok["admin"], "PUT", f"/api/reports/{r['id']}",
                    {"lock_version": 1, "sections": {"findings": f"editor {i}"}})

    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        results = list(ex.map(save, range(8)))
    ok = [j for st, j, _ in results if st == 200]
    assert len(ok) == 1 and sorted(st for st, _, _ in results) == [200] + [409] * 7
    st, j, _ = call(gw, tok["doc1"], "GET", f"/api/reports/{r['id']}")
    assert j["lock_version"] == 2
    assert j["current"]["sections"]["findings"] == ok[0]["current"]["sections"]["findings"]


def test_draft_delete(gw, tok):
    ct, _ = uids()
    r = create(gw, tok["doc1"], ct.StudyInstanceUID, sections={"findings": "x"})
    assert r["language"] == "en"  # the author's language
    # a doctor lacks report.delete
    st, j, _ = call(gw, tok["doc1"], "DELETE", f"/api/reports/{r['id']}")
    assert st == 403 and j["error"]["code"] == "forbidden"
    st, j, _ = call(gw, tok["admin"], "DELETE", f"/api/reports/{r['id']}?lock_version=7")
    assert st == 409 and j["error"]["lock_version"] == 1
    st, _, _ = call(gw, tok["admin"], "DELETE", f"/api/reports/{r['id']}?lock_version=1")
    assert st == 204
    assert call(gw, tok["doc1"], "GET", f"/api/reports/{r['id']}")[0] == 404
    assert gw.sql("SELECT count(*) FROM report_versions WHERE report_id = %s",
                  (r["id"],))[0][0] == 0


def test_sign_needs_text(gw, tok):
    ct, _ = uids()
    r = create(gw, tok["doc1"], ct.StudyInstanceUID, sections={"findings": "  \n "})
    st, j, _ = call(gw, tok["doc1"], "POST", f"/api/reports/{r['id']}/sign", {"lock_version": 1})
    assert st == 400 and "empty" in j["error"]["message"]


def test_templates(gw, tok):
    ct, _ = uids()
    a, d = tok["admin"], tok["doc1"]
    body = {"name": "CT Kopf", "language": "de", "modality": "CT", "body_part": "HEAD",
            "sections": {"technique": "Nativ-CT des Schädels, 5 mm.", "impression": "ß œ é ñ"}}
    st, j, _ = call(gw, d, "POST", "/api/report-templates", body)
    assert st == 403 and "system.configure" in j["error"]["detail"]
    st, t, _ = call(gw, a, "POST", "/api/report-templates", body)
    assert st == 201, t
    assert t["modality"] == "CT" and t["sections"]["findings"] == "" and t["created_by"] == gw.ADMIN
    st, j, _ = call(gw, a, "POST", "/api/report-templates", body)
    assert st == 409
    st, any_, _ = call(gw, a, "POST", "/api/report-templates",
                       {"name": "Any", "language": "en"})
    assert st == 201
    st, j, _ = call(gw, d, "GET", "/api/report-templates?modality=CT")
    assert st == 200 and [x["name"] for x in j["templates"]] == ["CT Kopf", "Any"]
    st, j, _ = call(gw, d, "GET", "/api/report-templates?modality=MR")
    assert [x["name"] for x in j["templates"]] == ["Any"]
    st, j, _ = call(gw, d, "GET", "/api/report-templates?language=de")
    assert [x["name"] for x in j["templates"]] == ["CT Kopf"]
    assert call(gw, d, "GET", "/api/report-templates?language=xx")[0] == 400
    assert call(gw, d, "GET", f"/api/report-templates/{t['id']}")[1]["name"] == "CT Kopf"

    # a report from the template: its language and text, then the sections given on top
    r = create(gw, d, ct.StudyInstanceUID, template_id=t["id"],
               sections={"findings": "Keine Blutung."})
    assert r["language"] == "de" and r["template_id"] == t["id"]
    s = r["current"]["sections"]
    assert s["technique"] == "Nativ-CT des Schädels, 5 mm." and s["impression"] == "ß œ é ñ"
    assert s["findings"] == "Keine Blutung."
    st, j, _ = call(gw, d, "POST", f"/api/studies/{ct.StudyInstanceUID}/reports",
                    {"template_id": 999999})
    assert st == 400

    st, j, _ = call(gw, a, "PUT", f"/api/report-templates/{t['id']}",
                    {"name": "CT Schädel", "sections": {"findings": "o.B."}})
    assert st == 200 and j["name"] == "CT Schädel" and j["sections"]["technique"] == ""
    st, j, _ = call(gw, a, "PUT", f"/api/report-templates/{any_['id']}",
                    {"name": "CT Schädel", "language": "de"})
    assert st == 409
    assert call(gw, a, "PUT", "/api/report-templates/999999", {"name": "x"})[0] == 404
    assert call(gw, a, "PUT", f"/api/report-templates/{t['id']}",
                {"modality": "ct"})[0] == 400
    assert call(gw, a, "DELETE", f"/api/report-templates/{t['id']}")[0] == 204
    assert call(gw, a, "DELETE", f"/api/report-templates/{t['id']}")[0] == 404
    # the report made from it keeps its text
    st, j, _ = call(gw, d, "GET", f"/api/reports/{r['id']}")
    assert j["template_id"] is None and j["current"]["sections"]["findings"] == "Keine Blutung."


def test_permissions_and_sites(gw, tok):
    ct, mr = uids()
    d1, d2, op, a = tok["doc1"], tok["doc2"], tok["op1"], tok["admin"]
    r1 = create(gw, d1, ct.StudyInstanceUID, sections={"findings": "default site"})
    r2 = create(gw, d2, mr.StudyInstanceUID, sections={"findings": "north site"})

    # the operator holds no report permission
    for method, path, body in (("GET", f"/api/studies/{ct.StudyInstanceUID}/reports", None),
                               ("POST", f"/api/studies/{ct.StudyInstanceUID}/reports", {}),
                               ("GET", f"/api/reports/{r1['id']}", None),
                               ("GET", "/api/reports", None),
                               ("PUT", f"/api/reports/{r1['id']}", {"lock_version": 1}),
                               ("POST", f"/api/reports/{r1['id']}/sign", {"lock_version": 1}),
                               ("POST", f"/api/reports/{r1['id']}/pdf", None),
                               ("GET", "/api/report-templates", None)):
        st, j, _ = call(gw, op, method, path, body)
        assert st == 403 and j["error"]["code"] == "forbidden", (method, path, st, j)

    # a doctor of another site sees nothing of the other site's study: 404, empty lists
    for method, path, body in (("GET", f"/api/studies/{ct.StudyInstanceUID}/reports", None),
                               ("POST", f"/api/studies/{ct.StudyInstanceUID}/reports", {}),
                               ("GET", f"/api/reports/{r1['id']}", None),
                               ("GET", f"/api/reports/{r1['id']}/versions/1", None),
                               ("PUT", f"/api/reports/{r1['id']}",
                                {"lock_version": 1, "sections": {"findings": "x"}}),
                               ("POST", f"/api/reports/{r1['id']}/sign", {"lock_version": 1}),
                               ("POST", f"/api/reports/{r1['id']}/amend", {}),
                               ("POST", f"/api/reports/{r1['id']}/pdf", None),
                               ("GET", f"/api/reports/{r1['id']}/pdf", None)):
        st, j, _ = call(gw, d2, method, path, body)
        assert st == 404 and j["error"]["code"] == "not_found", (method, path, st, j)
    # the same answer as for things that do not exist at all
    assert call(gw, d2, "GET", "/api/reports/987654321")[0] == 404
    assert call(gw, d2, "GET", "/api/studies/1.2.3.999/reports")[0] == 404
    assert call(gw, d1, "POST", "/api/studies/1.2.3.999/reports", {})[0] == 404
    assert call(gw, d2, "GET", "/api/reports/abc")[0] == 404
    assert call(gw, d2, "GET", "/api/reports/0")[0] == 404
    st, j, _ = call(gw, d2, "GET", f"/api/reports?study={ct.StudyInstanceUID}")
    assert st == 200 and j["total"] == 0 and j["items"] == []
    st, j, _ = call(gw, d2, "GET", "/api/reports")
    assert {x["study_uid"] for x in j["items"]} == {mr.StudyInstanceUID}
    st, j, _ = call(gw, d1, "GET", "/api/reports?limit=1000")
    assert mr.StudyInstanceUID not in {x["study_uid"] for x in j["items"]}
    assert r1["id"] in {x["id"] for x in j["items"]}
    # nothing changed behind the refusals
    assert call(gw, d1, "GET", f"/api/reports/{r1['id']}")[1]["lock_version"] == 1

    # the administrator sees every site; one query answers for a page of the worklist
    st, j, _ = call(gw, a, "GET",
                    f"/api/reports?study={ct.StudyInstanceUID},{mr.StudyInstanceUID}&limit=1000")
    assert st == 200 and {r1["id"], r2["id"]} <= {x["id"] for x in j["items"]}
    assert {x["study_uid"] for x in j["items"]} == {ct.StudyInstanceUID, mr.StudyInstanceUID}
    st, j, _ = call(gw, a, "GET", f"/api/reports?study={mr.StudyInstanceUID}&status=draft")
    assert [x["id"] for x in j["items"]] == [r2["id"]]
    st, j, _ = call(gw, a, "GET", f"/api/reports?study={mr.StudyInstanceUID}&status=final")
    assert j["items"] == []
    st, j, _ = call(gw, a, "GET", "/api/reports?limit=1&offset=1")
    assert st == 200 and len(j["items"]) == 1 and j["total"] >= 2


def test_validation(gw, tok):
    ct, _ = uids()
    d = tok["doc1"]
    base = f"/api/studies/{ct.StudyInstanceUID}/reports"
    bad = [({"sections": {"conclusion": "x"}}, "unknown section"),
           ({"sections": {"findings": 5}}, "findings"),
           ({"sections": {"findings": None}}, "findings"),
           ({"sections": ["findings"]}, "sections"),
           ({"sections": {"findings": "x" * 65537}}, "longer"),
           ({"sections": {"findings": "bell \u0007"}}, "findings"),
           ({"sections": {"findings": "nul \u0000"}}, ""),
           ({"language": "it"}, "language"),
           ({"template_id": "1"}, "template_id"),
           ({"lock_version": 3}, "lock_version")]
    for body, word in bad:
        st, j, _ = call(gw, d, "POST", base, body)
        assert st == 400 and j["error"]["code"] == "invalid_argument", (body, st, j)
        assert word in j["error"]["message"], (body, j)
    # exactly 64 KiB is fine
    r = create(gw, d, ct.StudyInstanceUID, sections={"findings": "я" * 32768})
    assert len(r["current"]["sections"]["findings"]) == 32768
    rid = r["id"]
    st, j, _ = call(gw, d, "POST", base, raw=b'{"sections": {"findings": "\xff\xfe"}}')
    assert st == 400 and j["error"]["code"] == "invalid_argument"
    st, j, _ = call(gw, d, "POST", base, raw=b"not json")
    assert st == 400
    st, j, _ = call(gw, d, "POST", base, raw=b"{}", ctype="text/plain")
    assert st == 415 and j["error"]["code"] == "unsupported"
    st, j, _ = call(gw, d, "PUT", f"/api/reports/{rid}", {"sections": {"findings": "y"}})
    assert st == 400 and "lock_version" in j["error"]["message"]
    st, j, _ = call(gw, d, "PUT", f"/api/reports/{rid}", {"lock_version": "1"})
    assert st == 400
    st, j, _ = call(gw, d, "PUT", f"/api/reports/{rid}", {"lock_version": 1})
    assert st == 400 and "nothing to change" in j["error"]["message"]
    st, j, _ = call(gw, d, "PUT", f"/api/reports/{rid}",
                    {"lock_version": 1, "sections": {"Findings": "y"}})
    assert st == 400
    st, j, _ = call(gw, d, "GET", "/api/studies/1..2/reports")
    assert st == 400
    for q in ("status=signed", "study=1.2.x", "study=1.2,,3", "limit=0", "limit=1001",
              "offset=-1", "study=%ZZ"):
        st, j, _ = call(gw, d, "GET", "/api/reports?" + q)
        assert st == 400 and j["error"]["code"] == "invalid_argument", (q, st, j)
    st, j, _ = call(gw, d, "GET", "/api/reports?study=" + ",".join(["1.2.3"] * 501))
    assert st == 400
    # an empty list of studies (an empty worklist page) matches nothing
    st, j, _ = call(gw, d, "GET", "/api/reports?study=")
    assert st == 200 and j["items"] == [] and j["total"] == 0
    # nothing above changed the report
    assert call(gw, d, "GET", f"/api/reports/{rid}")[1]["lock_version"] == 1


def test_pdf_request_and_download(gw, tok):
    """With pacs-reporter stopped, so that the render stays queued: the request, the pending
    state, then the worker's part simulated (a file under the storage root, the row and its job
    marked done) and the download."""
    ct, _ = uids()
    d = tok["doc1"]
    gw.kill("pacs-reporter#0", signal.SIGTERM)
    r = create(gw, d, ct.StudyInstanceUID, sections={"impression": "Без патологии."})
    rid = r["id"]
    st, j, _ = call(gw, d, "POST", f"/api/reports/{rid}/pdf")
    assert st == 409  # nothing signed yet
    assert call(gw, d, "GET", f"/api/reports/{rid}/pdf")[0] == 404
    st, j, _ = call(gw, d, "POST", f"/api/reports/{rid}/sign", {"lock_version": 1})
    assert st == 200

    st, p, _ = call(gw, d, "POST", f"/api/reports/{rid}/pdf")
    assert st == 202, p
    assert p["state"] == "pending" and p["version"] == 1 and p["report_id"] == rid
    job = gw.sql("SELECT type, payload, state FROM jobs WHERE id = %s", (p["job_id"],))
    # the payload names the render, and carries the request's id (X-Request-Id) for the logs
    assert len(job) == 1 and job[0][0] == "report.pdf" and job[0][2] == "pending", job
    assert job[0][1]["pdf_id"] == p["pdf_id"] and re.fullmatch(r"[0-9a-f]{16}", job[0][1]["rid"])
    assert set(job[0][1]) == {"pdf_id", "rid"}, job
    row = gw.sql("SELECT p.job_id, v.version, p.requested_by, p.state FROM report_pdfs p JOIN "
                 "report_versions v ON v.id = p.version_id WHERE p.id = %s", (p["pdf_id"],))
    assert row == [(p["job_id"], 1, "doc1", "pending")]
    st, again, _ = call(gw, d, "POST", f"/api/reports/{rid}/pdf")
    assert st == 202 and again["pdf_id"] == p["pdf_id"]  # not queued twice
    assert gw.sql("SELECT count(*) FROM jobs WHERE type = 'report.pdf' AND payload->>'pdf_id' "
                  "= %s", (str(p["pdf_id"]),))[0][0] == 1
    assert call(gw, d, "POST", f"/api/reports/{rid}/pdf?version=2")[0] == 404
    st, j, _ = call(gw, d, "GET", f"/api/reports/{rid}/pdf")
    assert st == 202 and j == {"state": "pending", "pdf_id": p["pdf_id"], "version": 1}
    st, j, _ = call(gw, d, "GET", f"/api/report-pdfs/{p['pdf_id']}")
    assert st == 200 and j["state"] == "pending" and j["job_state"] == "pending"
    assert j["report_id"] == rid and j["version"] == 1 and j["requested_by"] == "doc1"
    assert call(gw, tok["doc2"], "GET", f"/api/report-pdfs/{p['pdf_id']}")[0] == 404

    # the worker's part, simulated
    pdf = (b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n"
           b"2 0 obj<</Type/Pages/Kids[]/Count 0>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n")
    rel = f"reports/test/{p['pdf_id']}.pdf"
    path = os.path.join(gw.env["KP_STORAGE_ROOT"], rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(pdf)
    gw.sql("WITH x AS (UPDATE report_pdfs SET state = 'done', path = %s, size = %s, sha256 = %s, "
           "updated_at = now() WHERE id = %s) UPDATE jobs SET state = 'done' WHERE id = %s",
           (rel, len(pdf), hashlib.sha256(pdf).hexdigest(), p["pdf_id"], p["job_id"]))
    st, body, h = call(gw, d, "GET", f"/api/reports/{rid}/pdf")
    assert st == 200
    assert h["Content-Type"] == "application/pdf"
    assert h["Content-Disposition"] == f'attachment; filename="report-{rid}-v1.pdf"'
    assert body == pdf
    st, j, _ = call(gw, d, "GET", f"/api/report-pdfs/{p['pdf_id']}")
    assert j["state"] == "done" and j["size"] == len(pdf)
    assert call(gw, d, "GET", f"/api/reports/{rid}/pdf?version=1")[1] == pdf
    assert call(gw, tok["op1"], "GET", f"/api/reports/{rid}/pdf")[0] == 403
    assert call(gw, tok["doc2"], "GET", f"/api/reports/{rid}/pdf")[0] == 404

    # a path that leaves the storage root is never served
    gw.sql("UPDATE report_pdfs SET path = '../../etc/passwd' WHERE id = %s", (p["pdf_id"],))
    st, j, _ = call(gw, d, "GET", f"/api/reports/{rid}/pdf")
    assert st == 503 and j["error"]["code"] == "storage_error"
    gw.sql("UPDATE report_pdfs SET path = %s WHERE id = %s", (rel, p["pdf_id"]))

    # a render that failed: its state says why; the newest finished one is still served
    st, p2, _ = call(gw, d, "POST", f"/api/reports/{rid}/pdf")
    assert st == 202 and p2["pdf_id"] != p["pdf_id"]
    gw.sql("WITH x AS (UPDATE report_pdfs SET state = 'failed', error = 'font missing' WHERE "
           "id = %s) UPDATE jobs SET state = 'failed' WHERE id = %s",
           (p2["pdf_id"], p2["job_id"]))
    st, j, _ = call(gw, d, "GET", f"/api/report-pdfs/{p2['pdf_id']}")
    assert j["state"] == "failed" and j["error"] == "font missing"
    st, body, _ = call(gw, d, "GET", f"/api/reports/{rid}/pdf")
    assert st == 200 and body == pdf

    # an amendment in progress does not change what is served: the final version's PDF
    st, j, _ = call(gw, d, "POST", f"/api/reports/{rid}/amend", {})
    assert st == 201
    assert call(gw, d, "GET", f"/api/reports/{rid}/pdf")[1] == pdf
    st, j, _ = call(gw, d, "POST", f"/api/reports/{rid}/pdf?version=2")
    assert st == 409  # a draft is not rendered


def test_pdf_rendered_by_the_reporter(gw, tok):
    """End to end with the real pacs-reporter: the job published by the request is rendered and
    the download is the stored file."""
    ct, _ = uids()
    d = tok["doc1"]
    if not gw.alive("pacs-reporter#0"):
        gw.start("pacs-reporter#0", "pacs-reporter")
    r = create(gw, d, ct.StudyInstanceUID, language="fr",
               sections={"findings": "Pas d'anomalie. «œ»", "impression": "Normal."})
    assert call(gw, d, "POST", f"/api/reports/{r['id']}/sign", {"lock_version": 1})[0] == 200
    st, p, _ = call(gw, d, "POST", f"/api/reports/{r['id']}/pdf")
    assert st == 202, p

    def state():
        j = call(gw, d, "GET", f"/api/report-pdfs/{p['pdf_id']}")[1]
        return j if j["state"] != "pending" else None

    j = kp.wait_for(state, 60, "pacs-reporter to render the PDF", 0.2)
    assert j["state"] == "done", j
    st, body, h = call(gw, d, "GET", f"/api/reports/{r['id']}/pdf")
    assert st == 200 and h["Content-Type"] == "application/pdf" and body.startswith(b"%PDF")
    (rel, sha), = gw.sql("SELECT path, sha256 FROM report_pdfs WHERE id = %s", (p["pdf_id"],))
    with open(os.path.join(gw.env["KP_STORAGE_ROOT"], rel), "rb") as f:
        assert f.read() == body
    assert hashlib.sha256(body).hexdigest() == sha == j["sha256"]
    # the gateway published the job itself: the outbox sweep never had to claim it
    assert gw.sql("SELECT state, attempts FROM jobs WHERE id = %s", (p["job_id"],)) == [("done", 0)]


def test_audit_records(gw, tok):
    ct, _ = uids()
    d = tok["doc1"]
    r = create(gw, d, ct.StudyInstanceUID, sections={"findings": "audit me"})
    rid = r["id"]
    assert call(gw, d, "PUT", f"/api/reports/{rid}",
                {"lock_version": 1, "sections": {"impression": "ok"}})[0] == 200
    assert call(gw, d, "POST", f"/api/reports/{rid}/sign", {"lock_version": 2})[0] == 200
    assert call(gw, d, "POST", f"/api/reports/{rid}/amend", {})[0] == 201
    assert call(gw, d, "GET", f"/api/reports/{rid}")[0] == 200
    assert call(gw, d, "POST", f"/api/reports/{rid}/pdf")[0] == 202
    x = create(gw, d, ct.StudyInstanceUID, sections={"findings": "to delete"})
    assert call(gw, tok["admin"], "DELETE", f"/api/reports/{x['id']}")[0] == 204
    want = {"report.create", "report.update", "report.sign", "report.amend", "report.view",
            "report.export", "report.delete"}

    def got():
        rows = gw.sql("SELECT action, actor, study_uid, patient_id, detail, client FROM audit_log "
                      "WHERE action LIKE 'report.%%' AND (detail->>'report_id')::bigint "
                      "IN (%s, %s)", (rid, x["id"]))
        return rows if want <= {a for a, *_ in rows} else None

    rows = kp.wait_for(got, 30, "the report audit records")
    for action, actor, study, pid, detail, client in rows:
        assert study == ct.StudyInstanceUID and pid == ct.PatientID, action
        assert client == "127.0.0.1"
        assert actor == (gw.ADMIN if action == "report.delete" else "doc1"), action
    by = {a: det for a, _, _, _, det, _ in rows}
    assert by["report.update"]["sections"] == ["impression"]
    assert "audit me" not in json.dumps([det for *_, det, _ in rows])  # no report text
    assert by["report.amend"]["supersedes"] == 1 and by["report.amend"]["version"] == 2
    assert by["report.export"]["step"] == "request"
    # a refused change leaves no record
    assert call(gw, tok["op1"], "POST", f"/api/reports/{rid}/sign", {"lock_version": 1})[0] == 403
    assert not gw.sql("SELECT 1 FROM audit_log WHERE actor = 'op1' AND action LIKE 'report.%%'")
