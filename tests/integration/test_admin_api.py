"""The admin API of pacs-gateway (users, roles, sites), over real HTTPS against the real system.

Covers: create/read/update/delete of users, roles and sites with their status codes (201, 200,
204, 400, 404, 409); a user created through the API logs in (a generated password is returned
once and must be changed first); a role change applies to the next token at once and ends the
user's sessions; a custom role with study.read only may search (QIDO-RS) but not store
(STOW-RS); sites in use cannot be deleted; the guard rails (no self-disable, no self-demotion,
the last active user.manage holder stays, no manager hands out or acts above her own
permissions); input validation; and a doctor gets 403 on every admin route."""
import json
import os
import subprocess

import pydicom
import pytest

import kp

T = os.path.join(kp.PYDICOM_DATA, "test_files")
CT = os.path.join(T, "CT_small.dcm")  # stored through STOW-RS (default site)
MR = os.path.join(T, "MR_small.dcm")  # stored by the calling AE NORTH_CT (site north)
PW = "Admin-Api-Password-0613"
QIDO = "/dicom-web/studies"
STOW_CT = 'multipart/related; type="application/dicom"; boundary=KpAdmin'
STOW_BODY = (b"--KpAdmin\r\nContent-Type: application/dicom\r\n\r\n"
             + open(CT, "rb").read() + b"\r\n--KpAdmin--\r\n")
ADMIN_PREFIXES = ("/api/users", "/api/roles", "/api/permissions", "/api/sites")


@pytest.fixture(scope="module")
def gw(cluster):
    s = kp.System(cluster, gateway=True, extra_env={
        "KP_SITES_MAP": "calling_ae:NORTH_CT=north",
        # this module logs in often: the rate limits are not what it tests
        "KP_HTTP_RATE_LOGIN_PER_MIN": "100000",
        "KP_HTTP_RATE_API_PER_SEC": "100000",
    })
    try:
        yield s
    finally:
        s.stop()


# -- helpers ------------------------------------------------------------------------------------
def api(gw, method, path, body=None, token=None, raw=None, ctype="application/json"):
    """One request as the test administrator (or as the holder of token); (status, json)."""
    h = {}
    if token:
        h["Authorization"] = "Bearer " + token
    data = raw
    if body is not None:
        data = json.dumps(body)
    if data is not None:
        h["Content-Type"] = ctype
    st, hd, b = gw.https(method, path, h, data)
    return st, (json.loads(b) if b else None)


def error(j):
    return j["error"]


def login(gw, user, pw=PW, expect=200):
    st, j = gw.login(user, pw)
    assert st == expect, (user, st, j)
    return j


def token(gw, user, pw=PW):
    return login(gw, user, pw)["access_token"]


def bearer(tok):
    return {"Authorization": "Bearer " + tok}


def qido(gw, tok):
    return gw.https("GET", QIDO, bearer(tok), auth=False)[0]


def stow(gw, tok):
    return gw.https("POST", "/dicom-web/studies", dict(bearer(tok), **{"Content-Type": STOW_CT}),
                    STOW_BODY, auth=False)[0]


def me(gw, tok):
    return gw.https("GET", "/api/auth/me", bearer(tok), auth=False)[0]


def new_user(gw, name, *roles, sites=("default",), **extra):
    body = {"username": name, "roles": list(roles), "sites": list(sites), "password": PW}
    body.update(extra)
    st, j = api(gw, "POST", "/api/users", body)
    assert st == 201, j
    return j


def admin_routes():
    r = subprocess.run([os.path.join(kp.BIN, "pacs-gateway"), "--routes"], capture_output=True,
                       text=True, timeout=30, check=True)
    routes = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
    return [x for x in routes if x["path"].startswith(ADMIN_PREFIXES)]


# -- the routes and who may use them ------------------------------------------------------------
def test_a_doctor_gets_403_on_every_admin_route(gw):
    new_user(gw, "doc1", "doctor")
    doc = token(gw, "doc1")
    assert qido(gw, doc) == 200
    routes = admin_routes()
    assert len(routes) == 19, routes
    perms = {r["permission"] for r in routes}
    assert perms == {"user.manage", "role.manage", "site.manage"}
    for r in routes:
        path = r["path"].replace("{name}", "doc1")
        body = json.dumps({"username": "x", "name": "x", "roles": ["doctor"]})
        hdr = {"Content-Type": "application/json"}
        for who, h in (("doctor", bearer(doc)), ("anonymous", {})):
            st, hd, b = gw.https(r["method"], path, dict(h, **hdr), body, auth=False)
            want = 403 if who == "doctor" else 401
            assert st == want, (who, r, st, b[:200])
            e = json.loads(b)["error"]
            if who == "doctor":
                assert e["code"] == "forbidden" and r["permission"] in e["detail"]
    # nothing changed
    st, j = api(gw, "GET", "/api/users/doc1")
    assert st == 200 and j["roles"] == ["doctor"] and j["state"] == "active"


def test_invalid_names_in_the_path_are_not_found(gw):
    for path in ("/api/users/a%20b", "/api/users/-x", "/api/roles/.hidden", "/api/sites/a;b",
                 "/api/users/" + "a" * 65, "/api/users/x%2Fy/password"):
        st, j = api(gw, "GET" if "password" not in path else "POST", path)
        assert st == 404, (path, j)
    assert api(gw, "GET", "/api/users/nobody-here")[0] == 404
    assert api(gw, "GET", "/api/roles/nothing")[0] == 404
    assert api(gw, "GET", "/api/sites/nowhere")[0] == 404
    assert api(gw, "PATCH", "/api/users/doc1", {})[0] == 405


# -- users --------------------------------------------------------------------------------------
def test_user_with_a_generated_password_must_change_it(gw):
    st, j = api(gw, "POST", "/api/users", {
        "username": "alice", "display_name": "Alice Example", "email": "alice@example.org",
        "language": "de", "roles": ["doctor"], "sites": ["default"]})
    assert st == 201, j
    temp = j.pop("password")
    assert len(temp) >= 20
    assert j["username"] == "alice" and j["display_name"] == "Alice Example"
    assert j["email"] == "alice@example.org" and j["language"] == "de"
    assert j["roles"] == ["doctor"] and j["sites"] == ["default"]
    assert j["must_change_password"] is True and j["state"] == "must_change_password"
    assert j["disabled"] is False and j["locked"] is False and j["mfa_enrolled"] is False
    assert j["last_login_at"] is None and j["created_at"].endswith("Z")
    # shown once: reading the user never shows it again
    st, again = api(gw, "GET", "/api/users/alice")
    assert st == 200 and "password" not in again
    # the temporary password works, but only to change it
    lj = login(gw, "alice", temp)
    assert lj["must_change_password"] is True
    assert qido(gw, lj["access_token"]) == 403
    st, h, b = gw.https("POST", "/api/auth/password", {
        **bearer(lj["access_token"]), "Content-Type": "application/json"},
        json.dumps({"current_password": temp, "new_password": PW}), auth=False)
    assert st == 200, b
    tok = token(gw, "alice")
    assert qido(gw, tok) == 200
    st, j = api(gw, "GET", "/api/users/ALICE")  # names are case-insensitive
    assert st == 200 and j["state"] == "active" and j["last_login_at"]


def test_user_create_with_a_password_and_duplicates(gw):
    j = new_user(gw, "bob", "operator", display_name="Bob")
    assert "password" not in j and j["must_change_password"] is False
    assert login(gw, "bob")["must_change_password"] is False
    # temporary: the given password must be changed at first login
    j = new_user(gw, "carol", "doctor", temporary=True)
    assert j["must_change_password"] is True
    st, j = api(gw, "POST", "/api/users", {"username": "BOB", "roles": ["doctor"]})
    assert st == 409 and error(j)["code"] == "conflict", j
    # the policy applies, with its sentence
    for pw, words in (("short", "too short"), ("xx-dave-password-xx", "user name"),
                      ("1qaz2wsx3edc", "common")):
        st, j = api(gw, "POST", "/api/users", {"username": "dave", "roles": ["doctor"],
                                              "password": pw})
        assert st == 400 and words in error(j)["message"], (pw, j)
    assert api(gw, "GET", "/api/users/dave")[0] == 404


def test_list_search_and_paging(gw):
    for i in range(3):
        new_user(gw, f"pager{i}", "doctor", display_name=f"Paging Person {i}",
                 email=f"p{i}@hospital.example")
    st, j = api(gw, "GET", "/api/users")
    assert st == 200
    names = [u["username"] for u in j["users"]]
    assert names == sorted(names, key=str.lower) and gw.ADMIN in names
    assert j["total"] == len(names) and j["limit"] == 100 and j["offset"] == 0
    admin = [u for u in j["users"] if u["username"] == gw.ADMIN][0]
    assert admin["roles"] == ["admin"] and admin["last_login_at"]
    st, j = api(gw, "GET", "/api/users?q=paging+person")
    assert [u["username"] for u in j["users"]] == ["pager0", "pager1", "pager2"]
    assert j["total"] == 3
    st, j = api(gw, "GET", "/api/users?q=HOSPITAL.example&limit=2&offset=1")
    assert [u["username"] for u in j["users"]] == ["pager1", "pager2"] and j["total"] == 3
    st, j = api(gw, "GET", "/api/users?q=%40hospital&limit=1&offset=2")
    assert [u["username"] for u in j["users"]] == ["pager2"]
    st, j = api(gw, "GET", "/api/users?q=no-such-person")
    assert j["users"] == [] and j["total"] == 0
    for q in ("limit=0", "limit=1001", "limit=x", "offset=-1", "q=%zz"):
        st, j = api(gw, "GET", "/api/users?" + q)
        assert st == 400 and error(j)["code"] == "invalid_argument", (q, j)


def test_update_user_fields(gw):
    new_user(gw, "erin", "doctor")
    tok = token(gw, "erin")
    st, j = api(gw, "PUT", "/api/users/erin", {"display_name": "Erin E.", "email": "e@x.org",
                                              "language": "fr"})
    assert st == 200, j
    assert (j["display_name"], j["email"], j["language"]) == ("Erin E.", "e@x.org", "fr")
    # unchanged roles and sites (a form sending everything back) keep the sessions
    st, j = api(gw, "PUT", "/api/users/erin", {"roles": ["doctor"], "sites": ["default"],
                                              "disabled": False})
    assert st == 200, j
    assert me(gw, tok) == 200
    st, j = api(gw, "PUT", "/api/users/erin", {"username": "erin2"})
    assert st == 400 and "renamed" in error(j)["message"]
    st, j = api(gw, "PUT", "/api/users/erin", {"password": PW})
    assert st == 400
    assert api(gw, "PUT", "/api/users/nobody-here", {"display_name": "x"})[0] == 404


def test_role_change_applies_at_once_and_revokes_sessions(gw):
    new_user(gw, "frank", "doctor")
    old = token(gw, "frank")
    assert qido(gw, old) == 200
    st, j = api(gw, "POST", "/api/roles", {"name": "looker", "description": "search only",
                                          "permissions": ["study.read"]})
    assert st == 201, j
    assert j["permissions"] == ["study.read"] and j["builtin"] is False and j["users"] == 0
    st, j = api(gw, "PUT", "/api/users/frank", {"roles": ["looker"]})
    assert st == 200 and j["roles"] == ["looker"], j
    # the old session ended at once on this gateway
    assert me(gw, old) == 401
    assert qido(gw, old) == 401
    new = login(gw, "frank")
    assert new["user"]["roles"] == ["looker"]
    tok = new["access_token"]
    assert qido(gw, tok) == 200
    assert stow(gw, tok) == 403
    # a role's permissions change: applies to existing tokens at once (reloaded)
    st, j = api(gw, "PUT", "/api/roles/looker", {"permissions": ["study.read", "study.upload"]})
    assert st == 200 and j["permissions"] == ["study.read", "study.upload"], j
    assert stow(gw, tok) == 200
    st, j = api(gw, "PUT", "/api/roles/looker", {"permissions": ["study.read"]})
    assert st == 200
    assert stow(gw, tok) == 403
    # sites change: revokes too
    st, j = api(gw, "POST", "/api/sites", {"name": "east"})
    assert st == 201, j
    st, j = api(gw, "PUT", "/api/users/frank", {"sites": ["default", "east"]})
    assert st == 200 and j["sites"] == ["default", "east"]
    assert me(gw, tok) == 401
    j = login(gw, "frank")
    assert j["user"]["sites"] == ["default", "east"]
    # disabling revokes and refuses logins; enabling lets in again
    tok = j["access_token"]
    st, j = api(gw, "PUT", "/api/users/frank", {"disabled": True})
    assert st == 200 and j["state"] == "disabled" and j["disabled"] is True
    assert me(gw, tok) == 401
    assert "disabled" in error(login(gw, "frank", expect=401))["message"]
    st, j = api(gw, "PUT", "/api/users/frank", {"disabled": False})
    assert st == 200 and j["state"] == "active"
    login(gw, "frank")


def test_password_reset_unlock_reset_mfa_and_delete(gw):
    new_user(gw, "gina", "doctor")
    tok = token(gw, "gina")
    # a reset with a given password: temporary unless told otherwise; sessions end
    other = "Another-Secret-Pw-0877"
    st, j = api(gw, "POST", "/api/users/gina/password", {"password": other})
    assert st == 200 and j == {"username": "gina", "must_change_password": True,
                               "sessions_revoked": 1}, j
    assert me(gw, tok) == 401
    assert login(gw, "gina", other)["must_change_password"] is True
    st, j = api(gw, "POST", "/api/users/gina/password", {"password": PW, "temporary": False})
    assert st == 200 and j["must_change_password"] is False
    assert login(gw, "gina")["must_change_password"] is False
    st, j = api(gw, "POST", "/api/users/gina/password", {"password": "gina-gina-gina-1"})
    assert st == 400 and "user name" in error(j)["message"]
    # a generated one, returned once (no body at all is fine)
    st, j = api(gw, "POST", "/api/users/gina/password")
    assert st == 200 and j["must_change_password"] is True and len(j["password"]) >= 20
    assert login(gw, "gina", j["password"])["must_change_password"] is True
    assert api(gw, "POST", "/api/users/nobody-here/password", {})[0] == 404
    # lockout and unlock
    for _ in range(5):
        gw.login("gina", "Wrong-Password-000")
    st, j = api(gw, "GET", "/api/users/gina")
    assert j["state"] == "locked" and j["locked"] is True and j["locked_until"], j
    st, j = api(gw, "POST", "/api/users/gina/unlock")
    assert st == 200 and j["locked"] is False and j["locked_until"] is None
    assert api(gw, "POST", "/api/users/nobody-here/unlock")[0] == 404
    # second factor reset
    gw.sql("UPDATE users SET totp_secret = 'JBSWY3DPEHPK3PXP' WHERE username = 'gina'")
    assert api(gw, "GET", "/api/users/gina")[1]["mfa_enrolled"] is True
    st, j = api(gw, "POST", "/api/users/gina/reset-mfa")
    assert st == 200 and j["mfa_enrolled"] is False
    # delete: the account, its roles and sessions go
    tok = token(gw, "bob")
    st, j = api(gw, "DELETE", "/api/users/bob")
    assert st == 204 and j is None
    assert api(gw, "GET", "/api/users/bob")[0] == 404
    assert api(gw, "DELETE", "/api/users/bob")[0] == 404
    assert me(gw, tok) == 401
    assert gw.login("bob", PW)[0] == 401


# -- roles --------------------------------------------------------------------------------------
def test_permissions_and_roles(gw):
    st, j = api(gw, "GET", "/api/permissions")
    assert st == 200
    names = [p["name"] for p in j["permissions"]]
    assert len(names) == 18 and "user.manage" in names and all(
        p["description"] for p in j["permissions"])
    st, j = api(gw, "GET", "/api/roles")
    roles = {r["name"]: r for r in j["roles"]}
    assert [r["name"] for r in j["roles"]][:3] == ["admin", "doctor", "operator"]
    assert roles["admin"]["builtin"] is True and sorted(roles["admin"]["permissions"]) == \
        sorted(names)
    assert roles["doctor"]["users"] >= 1
    # create, validate
    st, j = api(gw, "POST", "/api/roles", {"name": "auditor", "permissions": ["audit.read"],
                                          "require_mfa": True})
    assert st == 201 and j["require_mfa"] is True and j["description"] == "", j
    assert api(gw, "POST", "/api/roles", {"name": "auditor", "permissions": []})[0] == 409
    for body, words in (({"name": "x", "permissions": ["study.read", "no.such"]}, "unknown"),
                        ({"name": "x", "permissions": ["Study.Read"]}, "not a valid name"),
                        ({"name": "x", "permissions": "study.read"}, "array"),
                        ({"name": "Bad Name", "permissions": []}, "name is required"),
                        ({"name": "UPPER", "permissions": []}, "name is required"),
                        ({"permissions": []}, "name is required"),
                        ({"name": "x", "require_mfa": "yes"}, "true or false")):
        st, j = api(gw, "POST", "/api/roles", body)
        assert st == 400 and words in error(j)["message"], (body, j)
        if words == "unknown":
            assert error(j)["detail"] == "no.such"
    assert api(gw, "GET", "/api/roles/x")[0] == 404
    # change a custom role
    st, j = api(gw, "PUT", "/api/roles/auditor", {"description": "reads the trail",
                                                 "permissions": ["audit.read", "study.read"],
                                                 "require_mfa": False})
    assert st == 200 and j["description"] == "reads the trail" and j["require_mfa"] is False
    assert j["permissions"] == ["audit.read", "study.read"]
    assert api(gw, "PUT", "/api/roles/auditor", {"name": "auditors"})[0] == 400
    assert api(gw, "PUT", "/api/roles/auditor", {"permissions": ["nope"]})[0] == 400
    assert api(gw, "PUT", "/api/roles/nothing", {"description": "x"})[0] == 404
    # built-in roles: read-only except require_mfa (unchanged values may be sent back)
    doctor = roles["doctor"]
    st, j = api(gw, "PUT", "/api/roles/doctor", {"permissions": doctor["permissions"] +
                                                ["study.delete"]})
    assert st == 409 and "built-in" in error(j)["message"]
    st, j = api(gw, "PUT", "/api/roles/admin", {"permissions": ["study.read"]})
    assert st == 409
    st, j = api(gw, "PUT", "/api/roles/operator", {"description": "changed"})
    assert st == 409
    st, j = api(gw, "PUT", "/api/roles/operator", {"permissions": roles["operator"]["permissions"],
                                                  "description": roles["operator"]["description"],
                                                  "require_mfa": True})
    assert st == 200 and j["require_mfa"] is True, j
    assert api(gw, "PUT", "/api/roles/operator", {"require_mfa": False})[1]["require_mfa"] is False
    # delete: not built-in, not assigned
    assert api(gw, "DELETE", "/api/roles/doctor")[0] == 409
    new_user(gw, "hank", "auditor")
    st, j = api(gw, "DELETE", "/api/roles/auditor")
    assert st == 409 and "assigned" in error(j)["message"], j
    assert api(gw, "PUT", "/api/users/hank", {"roles": ["doctor"]})[0] == 200
    assert api(gw, "DELETE", "/api/roles/auditor")[0] == 204
    assert api(gw, "GET", "/api/roles/auditor")[0] == 404
    assert api(gw, "DELETE", "/api/roles/auditor")[0] == 404


def test_require_mfa_on_a_role_ends_sessions_without_a_factor(gw):
    api(gw, "POST", "/api/roles", {"name": "strict", "permissions": ["study.read"]})
    new_user(gw, "ivan", "strict")
    tok = token(gw, "ivan")
    assert qido(gw, tok) == 200
    st, j = api(gw, "PUT", "/api/roles/strict", {"require_mfa": True})
    assert st == 200
    assert me(gw, tok) == 401
    j = login(gw, "ivan")
    assert j["mfa_enrollment_required"] is True
    assert qido(gw, j["access_token"]) == 403


# -- sites --------------------------------------------------------------------------------------
def test_sites(gw):
    st, j = api(gw, "POST", "/api/sites", {"name": "north", "description": "North wing"})
    assert st == 201 and j == {"name": "north", "description": "North wing", "studies": 0,
                               "users": 0, "created_at": j["created_at"]}, j
    assert api(gw, "POST", "/api/sites", {"name": "north"})[0] == 409
    for name in ("-x", "a b", "x" * 65, "", "caf\u00e9"):
        st, j = api(gw, "POST", "/api/sites", {"name": name})
        assert st == 400, (name, j)
    # a study mapped to the new site (sites.map: calling AE NORTH_CT)
    rc, res, out = gw.storescu([MR], aet="NORTH_CT")
    assert res[MR] == "ok", out
    gw.wait_jobs_settled()
    st, j = api(gw, "GET", "/api/sites/north")
    assert st == 200 and j["studies"] == 1, j
    st, j = api(gw, "DELETE", "/api/sites/north")
    assert st == 409 and "in use" in error(j)["message"] and "1 study" in error(j)["detail"]
    st, j = api(gw, "DELETE", "/api/sites/default")
    assert st == 409 and "default" in error(j)["message"]
    # users refer to a site
    assert api(gw, "POST", "/api/sites", {"name": "spare"})[0] == 201
    new_user(gw, "judy", "doctor", sites=["spare"])
    st, j = api(gw, "DELETE", "/api/sites/spare")
    assert st == 409 and "1 user" in error(j)["detail"], j
    assert api(gw, "PUT", "/api/users/judy", {"sites": []})[1]["sites"] == []
    assert api(gw, "DELETE", "/api/sites/spare")[0] == 204
    assert api(gw, "DELETE", "/api/sites/spare")[0] == 404
    # change the description; no renaming
    st, j = api(gw, "PUT", "/api/sites/north", {"description": "North wing, 2nd floor"})
    assert st == 200 and j["description"] == "North wing, 2nd floor"
    assert api(gw, "PUT", "/api/sites/north", {"name": "south"})[0] == 400
    assert api(gw, "PUT", "/api/sites/nowhere", {"description": "x"})[0] == 404
    st, j = api(gw, "GET", "/api/sites")
    by = {s["name"]: s for s in j["sites"]}
    assert by["default"]["users"] >= 1 and by["north"]["studies"] == 1
    # unknown sites are refused when assigning
    st, j = api(gw, "POST", "/api/users", {"username": "kim", "roles": ["doctor"],
                                          "sites": ["north", "atlantis"]})
    assert st == 400 and error(j)["detail"] == "atlantis", j


# -- guard rails --------------------------------------------------------------------------------
def test_an_admin_cannot_disable_demote_or_delete_herself(gw):
    me_ = gw.ADMIN
    for body in ({"disabled": True}, {"roles": ["doctor"]}, {"roles": []}):
        st, j = api(gw, "PUT", f"/api/users/{me_}", body)
        assert st == 409 and error(j)["code"] == "conflict", (body, j)
    st, j = api(gw, "DELETE", f"/api/users/{me_}")
    assert st == 409
    st, j = api(gw, "GET", f"/api/users/{me_}")
    assert j["roles"] == ["admin"] and j["disabled"] is False
    # adding a role to herself is fine
    st, j = api(gw, "PUT", f"/api/users/{me_}", {"roles": ["admin", "doctor"]})
    assert st == 200 and j["roles"] == ["admin", "doctor"]
    assert api(gw, "PUT", f"/api/users/{me_}", {"roles": ["admin"]})[0] == 200
    assert qido(gw, gw.token) == 200  # her own session is never the one revoked


def test_the_last_user_manager_stays(gw):
    """The caller's own admin role always counts; to reach the last manager, the test makes the
    administrator's account disabled in the database while her token still works. (A change
    that leaves no manager is refused only when there was one before it.)"""
    st, j = api(gw, "POST", "/api/roles", {"name": "usermgr", "permissions": ["user.manage"]})
    assert st == 201
    new_user(gw, "boss", "usermgr")
    # other active holders of user.manage (none but the test admin so far): disable them
    others = gw.sql("SELECT u.username FROM users u JOIN user_roles ur ON ur.user_id = u.id "
                    "JOIN role_permissions rp ON rp.role = ur.role WHERE rp.permission = "
                    "'user.manage' AND NOT u.disabled AND u.username NOT IN (%s, 'boss')",
                    (gw.ADMIN,))
    assert others == []
    gw.sql("UPDATE users SET disabled = true WHERE username = %s", (gw.ADMIN,))
    try:
        for method, path, body in (("PUT", "/api/users/boss", {"disabled": True}),
                                   ("PUT", "/api/users/boss", {"roles": ["doctor"]}),
                                   ("DELETE", "/api/users/boss", None),
                                   ("PUT", "/api/roles/usermgr", {"permissions": ["study.read"]})):
            st, j = api(gw, method, path, body)
            assert st == 409 and "last active user" in error(j)["message"], (method, path, j)
        st, j = api(gw, "GET", "/api/users/boss")
        assert j["roles"] == ["usermgr"] and j["disabled"] is False
        assert api(gw, "GET", "/api/roles/usermgr")[1]["permissions"] == ["user.manage"]
    finally:
        gw.sql("UPDATE users SET disabled = false WHERE username = %s", (gw.ADMIN,))
    # with the administrator active again, boss may go
    assert api(gw, "PUT", "/api/users/boss", {"disabled": True})[0] == 200
    assert api(gw, "DELETE", "/api/users/boss")[0] == 204


def test_a_manager_cannot_hand_out_or_act_above_her_permissions(gw):
    """A user.manage holder without role.manage, study.upload, ... may not give them away
    (to herself or anyone), nor take over an account that holds them."""
    assert api(gw, "POST", "/api/roles", {"name": "deputy-mgr",
                                          "permissions": ["user.manage"]})[0] == 201
    new_user(gw, "deputy", "deputy-mgr", "doctor")
    new_user(gw, "plain-doc", "doctor")
    dep = token(gw, "deputy")
    # what she holds herself she may hand out and manage
    st, j = api(gw, "POST", "/api/users", {"username": "dep-made", "roles": ["doctor"],
                                          "password": PW}, token=dep)
    assert st == 201, j
    st, j = api(gw, "POST", "/api/users/plain-doc/password", {"password": PW,
                                                             "temporary": False}, token=dep)
    assert st == 200, j
    assert api(gw, "PUT", "/api/users/plain-doc", {"display_name": "P"}, token=dep)[0] == 200
    # more she may not
    for method, path, body in (
            ("POST", "/api/users", {"username": "dep-admin", "roles": ["admin"]}),
            ("POST", "/api/users", {"username": "dep-op", "roles": ["operator"]}),
            ("PUT", "/api/users/deputy", {"roles": ["deputy-mgr", "doctor", "admin"]}),
            ("PUT", "/api/users/dep-made", {"roles": ["operator"]}),
            ("PUT", f"/api/users/{gw.ADMIN}", {"display_name": "x"}),
            ("POST", f"/api/users/{gw.ADMIN}/password", {}),
            ("DELETE", f"/api/users/{gw.ADMIN}", None)):
        st, j = api(gw, method, path, body, token=dep)
        assert st == 403 and "do not hold" in error(j)["message"], (method, path, j)
    assert api(gw, "GET", "/api/users/dep-admin")[0] == 404
    assert api(gw, "GET", "/api/users/deputy")[1]["roles"] == ["deputy-mgr", "doctor"]
    assert gw.login(gw.ADMIN, gw.ADMIN_PASSWORD)[0] == 200  # password unchanged
    # the same for roles: a role manager cannot put permissions she lacks into a role
    assert api(gw, "PUT", "/api/users/deputy", {"roles": ["deputy-mgr", "doctor"]})[0] == 200
    api(gw, "PUT", "/api/roles/deputy-mgr", {"permissions": ["user.manage", "role.manage"]})
    dep = token(gw, "deputy")
    st, j = api(gw, "POST", "/api/roles", {"name": "dep-role", "permissions": ["study.read"]},
                token=dep)
    assert st == 201, j
    st, j = api(gw, "POST", "/api/roles", {"name": "dep-role2",
                                          "permissions": ["study.delete"]}, token=dep)
    assert st == 403 and error(j)["detail"] == "study.delete", j
    st, j = api(gw, "PUT", "/api/roles/deputy-mgr", {
        "permissions": ["user.manage", "role.manage", "site.all"]}, token=dep)
    assert st == 403 and error(j)["detail"] == "site.all", j


# -- validation ---------------------------------------------------------------------------------
def test_validation_errors(gw):
    st, j = api(gw, "POST", "/api/users", raw='{"username": "v1", "roles": ["doctor"]}',
                ctype="text/plain")
    assert st == 415, j
    st, j = api(gw, "POST", "/api/users", raw="[1, 2]")
    assert st == 400 and "JSON object" in error(j)["message"]
    st, j = api(gw, "POST", "/api/users", raw="{bad json")
    assert st == 400
    base = {"username": "valid1", "roles": ["doctor"]}
    cases = [
        ({"username": "-bad"}, "username"), ({"username": "a" * 65}, "username"),
        ({"username": "a b"}, "username"), ({"username": 7}, "username"),
        ({"username": None}, "username"),
        ({"language": "xx"}, "language"), ({"language": 1}, "language"),
        ({"roles": "doctor"}, "roles"), ({"roles": [1]}, "roles"), ({"roles": []}, "roles"),
        ({"roles": ["nope"]}, "unknown role"), ({"roles": ["Doctor"]}, "roles"),
        ({"roles": ["doctor"] * 17}, "roles"),
        ({"sites": ["nowhere"]}, "unknown site"), ({"sites": [".."]}, "sites"),
        ({"email": "not-an-address"}, "email"), ({"email": "a@b c"}, "email"),
        ({"display_name": 123}, "display_name"), ({"display_name": "x" * 201}, "display_name"),
        ({"temporary": "yes"}, "temporary"), ({"password": 12345678901234}, "password"),
    ]
    for change, words in cases:
        body = dict(base, **change)
        st, j = api(gw, "POST", "/api/users", body)
        assert st == 400, (change, j)
        e = error(j)
        assert e["code"] == "invalid_argument" and words in e["message"], (change, e)
    assert api(gw, "GET", "/api/users/valid1")[0] == 404
    for change in ({"language": "xx"}, {"roles": ["nope"]}, {"sites": "default"},
                   {"disabled": "no"}, {"email": "@"}):
        st, j = api(gw, "PUT", "/api/users/doc1", change)
        assert st == 400, (change, j)
    assert api(gw, "PUT", "/api/users/doc1", raw="x", ctype="text/plain")[0] == 415
    for body in ({"name": "ok-site", "description": 5}, {"name": "ok-site",
                                                         "description": "x" * 1001}):
        assert api(gw, "POST", "/api/sites", body)[0] == 400
    st, j = api(gw, "GET", "/api/users/doc1")
    assert j["roles"] == ["doctor"] and j["language"] == "en"
