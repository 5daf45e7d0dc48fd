"""GET /api/worklist (the web application's worklist), PUT /api/auth/me (the account language)
and GET /api/system/status (the queue/worker screen).

Synthetic studies are inserted straight into the index tables: 30 in the site `default`, 10 in
`north`, with known names, IDs, accessions, dates and modalities; some get reports in each
status. doc1 is a doctor of `default`, op1 an operator of `default`, the administrator sees
every site."""
import json
import urllib.parse

import pytest

import kp

PW = "Worklist-Api-Pass-7"


def synth(gw, n, site, prefix, start=0):
    """n studies in site, named Prefix<k>^Given, ID P-<prefix>-k, accession A<prefix>k, dates
    2026-01-(k%28+1), modality CT for even k, MR+SR for odd k."""
    gw.sql(
        "INSERT INTO patients (patient_id, patient_name) SELECT 'P-' || %s || '-' || k, "
        "%s || k || '^Given' FROM generate_series(%s, %s) k", (prefix, prefix, start, start + n - 1))
    gw.sql(
        "INSERT INTO studies (patient_pk, study_uid, study_date, study_time, accession_number, "
        "study_description, patient_name, patient_id, patient_birth_date, patient_sex, "
        "modalities, num_series, num_instances, site_id) SELECT p.pk, '1.2.826.0.1.99.' || "
        "%s || '.' || k, to_char(date '2026-01-01' + (k %% 28), 'YYYYMMDD'), '101500', "
        "'A' || %s || k, 'Study ' || k, %s || k || '^Given', 'P-' || %s || '-' || k, "
        "'19800101', CASE WHEN k %% 2 = 0 THEN 'F' ELSE 'M' END, CASE WHEN k %% 2 = 0 THEN "
        "ARRAY['CT'] ELSE ARRAY['MR', 'SR'] END, 2, 40, (SELECT id FROM sites WHERE name = %s) "
        "FROM generate_series(%s, %s) k JOIN patients p ON p.patient_id = 'P-' || %s || '-' || k",
        (len(prefix), prefix, prefix, prefix, site, start, start + n - 1, prefix))


@pytest.fixture(scope="module")
def gw(cluster):
    s = kp.System(cluster, gateway=True)
    try:
        s.sql("INSERT INTO sites (name) VALUES ('north')")
        synth(s, 30, "default", "Alpha")
        synth(s, 10, "north", "Nord")
        s.sql("UPDATE studies SET patient_name = 'Иванов^Иван' WHERE accession_number = 'AAlpha3'")
        s.add_user("doc1", PW, "doctor", sites=["default"])
        s.add_user("op1", PW, "operator", sites=["default"])
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def tok(gw):
    out = {"admin": gw.token}
    for u in ("doc1", "op1"):
        st, j = gw.login(u, PW)
        assert st == 200, j
        out[u] = j["access_token"]
    return out


def get(gw, token, **q):
    st, _, b = gw.https("GET", "/api/worklist?" + urllib.parse.urlencode(q),
                        {"Authorization": "Bearer " + token}, auth=False)
    return st, json.loads(b)


def uid(gw, acc):
    return gw.sql("SELECT study_uid FROM studies WHERE accession_number = %s", (acc,))[0][0]


def report(gw, token, acc, sign=False):
    h = {"Authorization": "Bearer " + token, "Content-Type": "application/json"}
    st, _, b = gw.https("POST", f"/api/studies/{uid(gw, acc)}/reports", h,
                        json.dumps({"sections": {"findings": "ok"}}), auth=False)
    assert st == 201, b
    r = json.loads(b)
    if sign:
        st, _, b = gw.https("POST", f"/api/reports/{r['id']}/sign", h,
                            json.dumps({"lock_version": r["lock_version"]}), auth=False)
        assert st == 200, b
    return r["id"]


def test_site_scope_order_and_paging(gw, tok):
    st, j = get(gw, tok["admin"], limit=500)
    assert st == 200 and j["total"] == 40 and len(j["items"]) == 40
    st, j = get(gw, tok["doc1"], limit=500)
    assert j["total"] == 30 and {i["site"] for i in j["items"]} == {"default"}
    dates = [i["study_date"] for i in j["items"]]
    assert dates == sorted(dates, reverse=True)  # newest first
    st, p1 = get(gw, tok["doc1"], limit=12)
    st, p2 = get(gw, tok["doc1"], limit=12, offset=12)
    st, p3 = get(gw, tok["doc1"], limit=12, offset=24)
    uids = [i["study_uid"] for p in (p1, p2, p3) for i in p["items"]]
    assert len(p1["items"]) == 12 and len(p3["items"]) == 6 and len(set(uids)) == 30
    assert p1["total"] == 30
    it = p1["items"][0]
    for k in ("study_uid", "patient_name", "patient_id", "patient_birth_date", "patient_sex",
              "accession", "study_date", "study_time", "description", "modalities", "series",
              "instances", "site", "report"):
        assert k in it, k
    st, j = get(gw, tok["doc1"], sort="patient_name", limit=500)
    names = [i["patient_name"].lower() for i in j["items"]]
    assert names == sorted(names)


def test_filters(gw, tok):
    a = tok["doc1"]
    assert get(gw, a, name="alpha1")[1]["total"] == 11  # prefix: Alpha1, Alpha10..19
    assert get(gw, a, name="ALPHA2*")[1]["total"] == 11
    assert get(gw, a, name="a*a2?^given")[1]["total"] == 10  # whole name with wildcards
    assert get(gw, a, name="иван")[1]["total"] == 1  # case-insensitive, Cyrillic too
    assert get(gw, a, name="Nord")[1]["total"] == 0  # another site
    assert get(gw, tok["admin"], name="Nord")[1]["total"] == 10
    j = get(gw, a, patient_id="P-Alpha-7")[1]
    assert j["total"] == 1 and j["items"][0]["accession"] == "AAlpha7"
    assert get(gw, a, accession="AAlpha12")[1]["total"] == 1
    assert get(gw, a, accession="AAlpha")[1]["total"] == 0
    # k % 28 + 1 = day: days 1..3 are k = 0, 1, 2, 28, 29
    assert get(gw, a, date_from="2026-01-01", date_to="20260103")[1]["total"] == 5
    assert get(gw, a, date_from="20260127")[1]["total"] == 2  # k = 26, 27
    assert get(gw, a, modality="CT")[1]["total"] == 15
    assert get(gw, a, modality="SR")[1]["total"] == 15
    assert get(gw, a, modality="CT,MR")[1]["total"] == 30
    assert get(gw, a, modality="PT")[1]["total"] == 0
    j = get(gw, a, modality="MR", name="alpha1")[1]
    assert j["total"] == 6 and all("MR" in i["modalities"] for i in j["items"])


def test_report_status(gw, tok):
    d = tok["doc1"]
    draft = report(gw, d, "AAlpha5")
    final = report(gw, d, "AAlpha6", sign=True)
    j = get(gw, d, report_status="draft")[1]
    assert [i["accession"] for i in j["items"]] == ["AAlpha5"]
    rep = j["items"][0]["report"]
    assert rep["id"] == draft and rep["status"] == "draft" and rep["version"] == 1
    assert rep["author"] == "doc1" and rep["updated_at"].endswith("Z")
    j = get(gw, d, report_status="final")[1]
    assert [i["report"]["id"] for i in j["items"]] == [final]
    assert get(gw, d, report_status="none")[1]["total"] == 28
    assert get(gw, d, report_status="amended")[1]["total"] == 0
    # an operator sees the studies but no report fields, and may not filter by them
    st, j = get(gw, tok["op1"], accession="AAlpha5")
    assert st == 200 and j["total"] == 1 and j["items"][0]["report"] is None
    st, j = get(gw, tok["op1"], report_status="draft")
    assert st == 403 and j["error"]["code"] == "forbidden"


@pytest.mark.parametrize("q", [
    {"date_from": "2026-13-01"}, {"date_to": "20260230"}, {"date_from": "yesterday"},
    {"modality": "ct"}, {"modality": "CT,,MR"}, {"report_status": "signed"},
    {"limit": "0"}, {"limit": "501"}, {"offset": "-1"}, {"limit": "x"}, {"sort": "pk"},
    {"name": "%zz"},
])
def test_bad_parameters(gw, tok, q):
    st, j = get(gw, tok["doc1"], **q)
    if q == {"name": "%zz"}:  # a literal %, not a LIKE wildcard: matches nothing
        assert st == 200 and j["total"] == 0
        return
    assert st == 400 and j["error"]["code"] == "invalid_argument", (q, j)


def test_permission(gw, tok):
    st, _, b = gw.https("GET", "/api/worklist", auth=False)
    assert st == 401
    gw.sql("INSERT INTO roles (name, description) VALUES ('nothing', 'no permissions')")
    gw.add_user("nobody1", PW, "nothing", sites=["default"])
    st, j = gw.login("nobody1", PW)
    st, j = get(gw, j["access_token"])
    assert st == 403


def test_account_language(gw, tok):
    h = {"Authorization": "Bearer " + tok["doc1"], "Content-Type": "application/json"}
    st, _, b = gw.https("PUT", "/api/auth/me", h, json.dumps({"language": "ru"}), auth=False)
    assert st == 200 and json.loads(b)["language"] == "ru", b
    st, _, b = gw.https("GET", "/api/auth/me", h, auth=False)
    assert json.loads(b)["language"] == "ru"
    for bad in ({"language": "xx"}, {"language": 3}, {"roles": ["admin"]}, {}):
        st, _, b = gw.https("PUT", "/api/auth/me", h, json.dumps(bad), auth=False)
        assert st == 400, (bad, b)
    assert gw.sql("SELECT language FROM users WHERE username = 'doc1'")[0][0] == "ru"
    assert gw.sql("SELECT array_agg(ur.role) FROM user_roles ur JOIN users u ON u.id = "
                  "ur.user_id WHERE u.username = 'doc1'")[0][0] == ["doctor"]


def test_system_status(gw, tok):
    st, _, b = gw.https("GET", "/api/system/status")
    assert st == 200, b
    j = json.loads(b)
    assert j["bus"]["ok"] is True and isinstance(j["bus"]["queues"], dict)
    names = " ".join(w["name"] for w in j["bus"]["workers"])
    assert "indexer" in names, j
    assert any(x["type"] == "report.pdf" or x["type"] for x in j["jobs"]) or j["jobs"] == []
    for x in j["jobs"]:
        assert set(x) == {"type", "state", "count", "oldest_pending_s"}
    st, _, b = gw.https("GET", "/api/system/status",
                        {"Authorization": "Bearer " + tok["doc1"]}, auth=False)
    assert st == 403
