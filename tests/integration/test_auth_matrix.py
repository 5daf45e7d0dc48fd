"""Every route of the gateway against every kind of caller.

The route table comes from `pacs-gateway --routes` (method, path, permission), the roles'
permissions from the role_permissions table, so a route added later is checked too. Callers:
anonymous, the administrator, a doctor, an operator and a custom role `viewer` (study.read only).
Expected: a public route never answers 401/403 (whoever asks, with or without a token); any
other route answers 401 without a token, 403 (code forbidden) to a role lacking the route's
permission, and neither 401 nor 403 to a role holding it (`authenticated`: any valid token)."""
import json
import os
import subprocess
import time

import pydicom
import pytest

import kp

T = os.path.join(kp.PYDICOM_DATA, "test_files")
CT = os.path.join(T, "CT_small.dcm")
PW = "Matrix-Password-0915"
USERS = {"admin": None, "doctor": "doctor1", "operator": "operator1", "viewer": "viewer1"}
STOW_CT = 'multipart/related; type="application/dicom"; boundary=KpMatrix'
STOW_BODY = b"--KpMatrix\r\nContent-Type: application/dicom\r\n\r\nnot dicom\r\n--KpMatrix--\r\n"


def gateway_routes():
    r = subprocess.run([os.path.join(kp.BIN, "pacs-gateway"), "--routes"], capture_output=True,
                       text=True, timeout=30, check=True)
    routes = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
    assert routes, r.stdout
    return routes


@pytest.fixture(scope="module")
def gw(cluster):
    s = kp.System(cluster, gateway=True, start=False, extra_env={"KP_HTTP_AUTH_RELOAD": "2"})
    try:
        # the custom role exists before the gateway loads its role snapshot
        s.sql("INSERT INTO roles (name, description) VALUES ('viewer', 'look only')")
        s.sql("INSERT INTO role_permissions VALUES ('viewer', 'study.read')")
        s.start_all()
        s.send_each([CT])
        s.add_user("doctor1", PW, "doctor", sites=("default",))
        s.add_user("operator1", PW, "operator", sites=("default",))
        s.add_user("viewer1", PW, "viewer", sites=("default",))
        yield s
    finally:
        s.stop()


def login(gw, who):
    user, pw = (gw.ADMIN, gw.ADMIN_PASSWORD) if USERS[who] is None else (USERS[who], PW)
    st, j = gw.login(user, pw)
    assert st == 200, (who, j)
    return j


def concrete(route):
    """The route's path with real values, and a body for POST."""
    ds = pydicom.dcmread(CT, stop_before_pixels=True)
    path = (route["path"].replace("{study}", ds.StudyInstanceUID)
            .replace("{series}", ds.SeriesInstanceUID)
            .replace("{instance}", ds.SOPInstanceUID)
            .replace("{frames}", "1").replace("{tagpath...}", "7FE00010")
            .replace("{file...}", "worklist")
            .replace("{id}", "999999999").replace("{n}", "1").replace("{pdf_id}", "999999999")
            .replace("{name}", "nobody-here").replace("{ae}", "NO%20SUCH%20AE"))  # admin API: no such user/role/site (404)
    assert "{" not in path, f"no value for a parameter of {route['path']}"
    if path == "/wado":
        path += (f"?requestType=WADO&studyUID={ds.StudyInstanceUID}"
                 f"&seriesUID={ds.SeriesInstanceUID}&objectUID={ds.SOPInstanceUID}"
                 "&contentType=application%2Fdicom")
    return path


def send(gw, route, token, fresh):
    """One request of route as the holder of token (None: anonymous). fresh() gives a new
    login's JSON (for the refresh route)."""
    path = concrete(route)
    headers = {}
    body = None
    if route["method"] == "POST":
        if path.startswith("/dicom-web/"):
            headers["Content-Type"], body = STOW_CT, STOW_BODY  # a bad instance: 400
        elif path == "/api/auth/login":
            headers["Content-Type"] = "application/json"
            body = json.dumps({"username": "viewer1", "password": PW})
        elif path == "/api/auth/refresh":
            headers["Content-Type"] = "application/json"
            body = json.dumps({"refresh_token": fresh()["refresh_token"]})
        else:
            body = b""  # password, mfa/confirm, mfa/disable: 400; mfa/setup ignores it
    if token:
        headers["Authorization"] = "Bearer " + token
    return gw.https(route["method"], path, headers, body, auth=False)


def test_routes_against_roles(gw):
    routes = gateway_routes()
    perms = {}
    for role, perm in gw.sql("SELECT role, permission FROM role_permissions"):
        perms.setdefault(role, set()).add(perm)
    assert perms["viewer"] == {"study.read"}
    known = {p for (p,) in gw.sql("SELECT name FROM permissions")} | {"public", "authenticated"}
    bad = [r for r in routes if r["permission"] not in known]
    assert not bad, f"routes with a permission no role can hold: {bad}"

    tokens = {who: login(gw, who)["access_token"] for who in USERS}
    tokens["anonymous"] = None

    def fresh():
        return login(gw, "admin")

    problems, seen = [], 0
    last = [r for r in routes if r["path"] == "/api/auth/logout"]
    for route in [r for r in routes if r not in last] + last:
        perm = route["permission"]
        for who, token in tokens.items():
            if route in last and token:
                token = login(gw, who)["access_token"]  # a session of its own to end
            st, h, b = send(gw, route, token, fresh)
            seen += 1
            what = f"{route['method']} {route['path']} ({perm}) as {who}: {st} {b[:160]!r}"
            if perm == "public":
                if st in (401, 403):
                    problems.append("public route refused: " + what)
            elif who == "anonymous":
                if st != 401:
                    problems.append("expected 401: " + what)
                elif not h.get("WWW-Authenticate", "").startswith("Bearer"):
                    problems.append("401 without WWW-Authenticate: " + what)
            elif perm == "authenticated" or perm in perms.get(who, set()):
                if st in (401, 403) or st >= 500:
                    problems.append("expected access: " + what)
            else:
                if st != 403:
                    problems.append("expected 403: " + what)
                else:
                    e = json.loads(b)["error"]
                    if e["code"] != "forbidden" or perm not in e.get("detail", ""):
                        problems.append("403 without the permission named: " + what)
    assert seen == len(routes) * len(tokens)
    assert not problems, "\n".join(problems)
    # the tokens of the matrix still work (nothing above ended their sessions)
    for who in USERS:
        assert gw.https("GET", "/dicom-web/studies", {"Authorization": "Bearer " + tokens[who]},
                        auth=False)[0] == 200, who


def test_bodies_are_what_the_handlers_see(gw):
    """The matrix above only proves access; these show the requests reach their handlers."""
    doc = login(gw, "doctor")["access_token"]
    ds = pydicom.dcmread(CT, stop_before_pixels=True)
    st, h, b = gw.https("GET", f"/dicom-web/studies/{ds.StudyInstanceUID}/series/"
                        f"{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}",
                        {"Authorization": "Bearer " + doc,
                         "Accept": "multipart/related; type=\"application/dicom\""}, auth=False)
    assert st == 200, b[:300]
    assert ds.SOPInstanceUID.encode() in b
    op = login(gw, "operator")["access_token"]
    st, h, b = gw.https("POST", "/dicom-web/studies", {"Authorization": "Bearer " + op,
                                                       "Content-Type": STOW_CT},
                        STOW_BODY, auth=False)
    assert st in (400, 409, 415) or st == 200, b[:300]


def test_role_changes_apply_without_a_new_login(gw):
    """role_permissions is re-read every http.auth_reload seconds (2 here)."""
    tok = login(gw, "viewer")["access_token"]
    ds = pydicom.dcmread(CT, stop_before_pixels=True)
    path = (f"/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
            f"/instances/{ds.SOPInstanceUID}")

    def status():
        return gw.https("GET", path, {"Authorization": "Bearer " + tok,
                                      "Accept": "multipart/related; type=\"application/dicom\""},
                        auth=False)[0]

    assert status() == 403
    gw.sql("INSERT INTO role_permissions VALUES ('viewer', 'study.download')")
    try:
        kp.wait_for(lambda: status() == 200, 10, "the viewer role to gain study.download", 0.3)
    finally:
        gw.sql("DELETE FROM role_permissions WHERE role = 'viewer' AND "
               "permission = 'study.download'")
    kp.wait_for(lambda: status() == 403, 10, "the viewer role to lose study.download", 0.3)
