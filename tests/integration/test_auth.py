"""Authentication and sessions of pacs-gateway, over real HTTPS against the real system.

Covers: what answers without a token (401 + WWW-Authenticate, the viewer's redirect to the
sign-in page, the public pages and bundles); login (API tokens and browser cookies), lockout,
the password policy (pacsctl and the API), the forced password change, refresh-token rotation
and reuse detection, logout, forged and tampered access tokens (signed here with the gateway's
own HS256 key, see lib/kp_jwt.c), CSRF defences for cookie sessions, and the TOTP second factor
with recovery codes (the codes computed here per RFC 6238)."""
import base64
import hashlib
import hmac
import json
import os
import struct
import time

import pytest

import kp

T = os.path.join(kp.PYDICOM_DATA, "test_files")
QIDO = "/dicom-web/studies"
GOOD_PW = "Correct-Horse-Battery-7"


@pytest.fixture(scope="module")
def gw(cluster):
    s = kp.System(cluster, gateway=True)
    try:
        s.send_each([os.path.join(T, "CT_small.dcm")])
        yield s
    finally:
        s.stop()


# -- helpers ------------------------------------------------------------------------------------
def req(gw, method, path, token=None, cookie=None, headers=None, body=None):
    """One request with exactly the credentials given (never the test administrator's)."""
    h = dict(headers or {})
    if token is not None:
        h["Authorization"] = "Bearer " + token
    if cookie is not None:
        h["Cookie"] = cookie
    return gw.https(method, path, h, body, auth=False)


def post_json(gw, path, obj, token=None, cookie=None, headers=None):
    h = {"Content-Type": "application/json", **(headers or {})}
    st, hd, b = req(gw, "POST", path, token, cookie, h, json.dumps(obj))
    return st, hd, (json.loads(b) if b else {})


def error_of(body):
    j = json.loads(body) if isinstance(body, (bytes, str)) else body
    return j["error"]


def login_ok(gw, user, pw, **extra):
    st, j = gw.login(user, pw, **extra)
    assert st == 200, j
    return j


def qido_status(gw, token):
    return req(gw, "GET", QIDO, token)[0]


def new_user(gw, name, *roles, password=GOOD_PW, temporary=False):
    gw.add_user(name, password, *(roles or ("doctor",)), sites=("default",), temporary=temporary)
    return name


def set_cookies(headers):
    """{name: (value, [attributes])} of every Set-Cookie header."""
    out = {}
    for line in headers.get_all("Set-Cookie") or []:
        parts = [p.strip() for p in line.split(";")]
        name, _, value = parts[0].partition("=")
        out[name] = (value, parts[1:])
    return out


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_json(obj):
    return b64url(json.dumps(obj, separators=(",", ":")).encode())


def unb64url(seg):
    return base64.urlsafe_b64decode(seg + "=" * (-len(seg) % 4))


def jwt_parts(token):
    h, p, s = token.split(".")
    return json.loads(unb64url(h)), json.loads(unb64url(p)), s


def jwt_key(gw):
    """The HS256 secret: the key file holds base64 text (whitespace ignored) of the bytes."""
    with open(os.path.join(gw.dir, "var", "auth", "jwt.key")) as f:
        text = "".join(f.read().split())
    key = base64.b64decode(text, validate=True)
    assert len(key) >= 32
    return key


def forge(key, payload, header=None, alg="HS256"):
    header = header or {"alg": "HS256", "typ": "JWT", "kid": "k1"}
    signing_input = b64url_json(header) + "." + b64url_json(payload)
    digest = {"HS256": hashlib.sha256, "HS512": hashlib.sha512}[alg]
    sig = hmac.new(key, signing_input.encode(), digest).digest()
    return signing_input + "." + b64url(sig)


def totp(secret_b32, step, digits=6):
    """RFC 6238 / 4226: HMAC-SHA1 over the 30-second step counter."""
    s = secret_b32.strip().replace(" ", "").upper()
    key = base64.b32decode(s + "=" * (-len(s) % 8))
    h = hmac.new(key, struct.pack(">Q", step), hashlib.sha1).digest()
    o = h[-1] & 15
    return "%0*d" % (digits, (struct.unpack(">I", h[o:o + 4])[0] & 0x7FFFFFFF) % 10 ** digits)


# -- 1. without credentials -----------------------------------------------------------------------
def test_dicomweb_routes_need_a_token(gw):
    uid = "1.2.826.0.1.3680043.10.1411.1"
    for method, path in [("GET", "/dicom-web/studies"), ("GET", "/dicom-web/series"),
                         ("GET", "/dicom-web/instances"),
                         ("GET", f"/dicom-web/studies/{uid}"),
                         ("GET", f"/dicom-web/studies/{uid}/metadata"),
                         ("GET", f"/dicom-web/studies/{uid}/series/{uid}/instances/{uid}/frames/1"),
                         ("POST", "/dicom-web/studies"),
                         ("GET", f"/wado?requestType=WADO&studyUID={uid}&seriesUID={uid}"
                                 f"&objectUID={uid}"),
                         ("GET", "/api/auth/me")]:
        st, h, b = req(gw, method, path)
        assert st == 401, (method, path, st, b)
        assert h.get("WWW-Authenticate", "").startswith("Bearer"), (path, dict(h))
        assert h.get("Content-Type", "").startswith("application/json")
        e = error_of(b)
        assert e["code"] == "unauthenticated", (path, e)
        assert e["message"]
    # the same route answers with a token (the 401 above is about the token, not the route)
    assert req(gw, "GET", QIDO, gw.token)[0] == 200


def test_viewer_page_redirects_to_sign_in(gw):
    st, h, _ = req(gw, "GET", "/")
    assert st == 302
    assert h["Location"] in ("/app/login?next=%2F", "/app/login?next=/")
    assert "no-store" in h.get("Cache-Control", "")
    # deeper viewer pages come back to where they were, query included (percent-encoded)
    st, h, _ = req(gw, "GET", "/viewer?StudyInstanceUIDs=1.2.3")
    assert st == 302
    assert h["Location"].startswith("/app/login?next=")
    nxt = h["Location"][len("/app/login?next="):]
    from urllib.parse import unquote
    assert unquote(nxt) == "/viewer?StudyInstanceUIDs=1.2.3"
    assert "?" not in nxt and "&" not in nxt.replace("%26", "")
    # an invalid token is no session either
    assert req(gw, "GET", "/", token="not.a.token")[0] == 302
    # with a valid bearer token or access cookie the page itself is served
    assert req(gw, "GET", "/", gw.token)[0] == 200
    assert req(gw, "GET", "/", cookie="__Host-kp_access=" + gw.token)[0] == 200


def test_sign_in_page_and_bundles_are_public(gw):
    for path in ("/app/login", "/app/login.js", "/app-config.js"):
        st, h, b = req(gw, "GET", path)
        assert st == 200, (path, st, b[:300])
        assert b, path
    st, h, b = req(gw, "GET", "/app/login.js")
    assert "javascript" in h.get("Content-Type", ""), dict(h)
    # one of the viewer's bundles, found in its build directory
    dist = os.path.join(kp.REPO, "build", "ohif", "dist")
    bundle = sorted(f for f in os.listdir(dist) if f.endswith(".bundle.js") or
                    (f.endswith(".js") and ".bundle." in f))[0]
    assert req(gw, "GET", "/" + bundle)[0] == 200
    # a bad token does not spoil a public route
    assert req(gw, "GET", "/app/login", token="garbage")[0] == 200


# -- 2. login -------------------------------------------------------------------------------------
def test_login_refusals_look_the_same(gw):
    new_user(gw, "login1")
    st1, j1 = gw.login("login1", "Wrong-password-123")
    st2, j2 = gw.login("nosuchuser", "Wrong-password-123")
    assert st1 == st2 == 401
    assert j1 == j2, (j1, j2)
    assert j1["error"]["code"] == "unauthenticated"
    assert "access_token" not in j1
    # no body fields at all: 400, not a crash
    st, h, j = post_json(gw, "/api/auth/login", {"username": "login1"})
    assert st == 400, j


def test_login_returns_tokens(gw):
    new_user(gw, "login2", "doctor")
    j = login_ok(gw, "LOGIN2", GOOD_PW)  # user names are case-insensitive
    assert j["token_type"] == "Bearer"
    assert j["expires_in"] == 3600  # KP_AUTH_ACCESS_TTL of the tests
    assert j["access_token"].count(".") == 2
    assert len(j["refresh_token"]) >= 32
    assert j["user"]["username"] == "login2"
    assert j["user"]["roles"] == ["doctor"]
    assert j["user"]["sites"] == ["default"]
    assert j["must_change_password"] is False
    head, claims, _ = jwt_parts(j["access_token"])
    assert head["alg"] == "HS256" and head["kid"] == "k1"
    assert claims["sub"] == "login2" and claims["roles"] == ["doctor"]
    assert claims["iss"] == claims["aud"] == "klinika-pacs"
    assert qido_status(gw, j["access_token"]) == 200
    st, h, b = req(gw, "GET", "/api/auth/me", j["access_token"])
    assert st == 200
    me = json.loads(b)
    assert me["username"] == "login2" and me["roles"] == ["doctor"]
    assert "study.read" in me["permissions"] and "user.manage" not in me["permissions"]


def test_login_with_cookies(gw):
    new_user(gw, "login3")
    st, h, j = post_json(gw, "/api/auth/login",
                         {"username": "login3", "password": GOOD_PW, "session": "cookie"})
    assert st == 200, j
    assert "access_token" not in j and "refresh_token" not in j
    assert j["user"]["username"] == "login3"
    c = set_cookies(h)
    assert set(c) == {"__Host-kp_access", "__Host-kp_refresh", "__Host-kp_csrf"}, c
    for name in ("__Host-kp_access", "__Host-kp_refresh"):
        value, attrs = c[name]
        assert value, name
        for a in ("Path=/", "Secure", "SameSite=Strict", "HttpOnly"):
            assert a in attrs, (name, attrs)
        assert not any(a.lower().startswith("domain=") for a in attrs), attrs  # __Host- rule
    value, attrs = c["__Host-kp_csrf"]
    assert len(value) >= 16
    for a in ("Path=/", "Secure", "SameSite=Strict"):
        assert a in attrs, attrs
    assert "HttpOnly" not in attrs  # the page's script reads it for X-CSRF-Token
    assert "Max-Age=3600" in c["__Host-kp_access"][1]
    # the access cookie is a working credential on its own
    assert req(gw, "GET", QIDO, cookie="__Host-kp_access=" + c["__Host-kp_access"][0])[0] == 200


# -- 3. lockout -----------------------------------------------------------------------------------
def test_lockout_and_unlock(gw):
    new_user(gw, "lock1")
    # failures are counted per account and a success resets the count
    for _ in range(4):
        assert gw.login("lock1", "Wrong-password-123")[0] == 401
    login_ok(gw, "lock1", GOOD_PW)
    for i in range(5):
        st, j = gw.login("lock1", "Wrong-password-123")
        assert st == 401 and j["error"]["code"] == "unauthenticated", (i, j)
    st, j = gw.login("lock1", GOOD_PW)
    assert st == 401, j
    assert j["error"]["code"] == "account_locked", j
    assert "minute" in j["error"]["message"], j
    assert "access_token" not in j
    # a locked account answers the same with a wrong password (no oracle while locked)
    st, j = gw.login("lock1", "Wrong-password-123")
    assert st == 401 and j["error"]["code"] == "account_locked"
    # other accounts are not affected
    login_ok(gw, gw.ADMIN, gw.ADMIN_PASSWORD)
    gw.pacsctl("user", "unlock", "lock1")
    j = login_ok(gw, "lock1", GOOD_PW)
    assert qido_status(gw, j["access_token"]) == 200


# -- 4. password policy ---------------------------------------------------------------------------
def common_password():
    with open(os.path.join(kp.REPO, "config", "common-passwords.txt")) as f:
        for line in f:
            w = line.strip()
            if len(w) >= 12 and not w.startswith("#") and w.isascii():
                return w
    pytest.fail("no common password of 12+ characters in config/common-passwords.txt")


def pacsctl_add(gw, name, password):
    path = os.path.join(gw.dir, f"pw-{name}")
    with open(path, "w") as f:
        f.write(password)
    try:
        return gw.pacsctl("user", "add", name, "--role", "doctor", "--password-file", path,
                          check=False)
    finally:
        os.unlink(path)


def test_password_policy_in_pacsctl(gw):
    common = common_password()
    for name, pw, why in [("policy1", "Sh0rt-pw", "too short"),
                          ("policyuser", "My-policyuser-Secret-9", "user name"),
                          ("policy3", common, "common")]:
        r = pacsctl_add(gw, name, pw)
        assert r.returncode != 0, (name, pw, r.stdout)
        assert why in r.stderr, r.stderr
        assert not gw.sql("SELECT 1 FROM users WHERE username = %s", (name,))
    # the common list is compared case-insensitively
    r = pacsctl_add(gw, "policy4", common.upper())
    assert r.returncode != 0 and "common" in r.stderr, r.stderr
    r = pacsctl_add(gw, "policy5", GOOD_PW)
    assert r.returncode == 0, r.stderr
    login_ok(gw, "policy5", GOOD_PW)


def test_password_policy_in_the_api(gw):
    new_user(gw, "policy6")
    tok = login_ok(gw, "policy6", GOOD_PW)["access_token"]
    common = common_password()
    for new, sentence in [("Sh0rt-pw", "The password is too short."),
                          (common, "The password is one of the most common passwords."),
                          ("x-POLICY6-long-enough", "The password must not contain the user name."),
                          (GOOD_PW, "differ")]:
        st, h, j = post_json(gw, "/api/auth/password",
                             {"current_password": GOOD_PW, "new_password": new}, tok)
        assert st == 400, (new, j)
        assert j["error"]["code"] == "invalid_argument"
        assert sentence in j["error"]["message"], (new, j)
    st, h, j = post_json(gw, "/api/auth/password",
                         {"current_password": "Not-the-password-1",
                          "new_password": "Another-Good-pw-77"}, tok)
    assert st == 401, j
    # nothing changed
    login_ok(gw, "policy6", GOOD_PW)
    assert gw.login("policy6", "Another-Good-pw-77")[0] == 401


# -- 5. forced password change --------------------------------------------------------------------
def test_temporary_password_must_be_changed(gw):
    temp, new = "Temporary-Pw-0451", "Brand-new-Secret-0452"
    new_user(gw, "forced1", "doctor", password=temp, temporary=True)
    j = login_ok(gw, "forced1", temp)
    assert j["must_change_password"] is True
    assert j["user"]["roles"] == ["doctor"]  # the account's roles, for the page ...
    tok, refresh = j["access_token"], j["refresh_token"]
    assert jwt_parts(tok)[1]["roles"] == []  # ... but the token carries none
    st, h, b = req(gw, "GET", QIDO, tok)
    assert st == 403, b
    assert error_of(b)["code"] == "forbidden"
    st, h, b = req(gw, "GET", "/api/auth/me", tok)
    assert st == 200, b
    me = json.loads(b)
    assert me["must_change_password"] is True and me["permissions"] == []
    # a second session of the same account (ended by the change)
    other = login_ok(gw, "forced1", temp)["access_token"]
    assert req(gw, "GET", "/api/auth/me", other)[0] == 200
    st, h, j2 = post_json(gw, "/api/auth/password",
                          {"current_password": temp, "new_password": new}, tok)
    assert st == 200, j2
    # the same token stays restricted until refreshed
    assert qido_status(gw, tok) == 403
    st, h, r = post_json(gw, "/api/auth/refresh", {"refresh_token": refresh})
    assert st == 200, r
    assert r["must_change_password"] is False
    assert jwt_parts(r["access_token"])[1]["roles"] == ["doctor"]
    assert qido_status(gw, r["access_token"]) == 200
    assert gw.login("forced1", temp)[0] == 401
    j = login_ok(gw, "forced1", new)
    assert j["must_change_password"] is False
    assert qido_status(gw, j["access_token"]) == 200
    # the other session ended (liveness is cached for a few seconds at most)
    kp.wait_for(lambda: req(gw, "GET", "/api/auth/me", other)[0] == 401, 8,
                "the other session of forced1 to end after the password change")


# -- 6. refresh rotation, reuse, logout -----------------------------------------------------------
def refresh(gw, token):
    return post_json(gw, "/api/auth/refresh", {"refresh_token": token})


def test_refresh_rotates_and_reuse_revokes_the_session(gw):
    new_user(gw, "refresh1")
    j = login_ok(gw, "refresh1", GOOD_PW)
    a1, r1 = j["access_token"], j["refresh_token"]
    st, h, j2 = refresh(gw, r1)
    assert st == 200, j2
    a2, r2 = j2["access_token"], j2["refresh_token"]
    assert r2 != r1 and a2 != a1
    assert jwt_parts(a2)[1]["jti"].split(".")[0] == jwt_parts(a1)[1]["jti"].split(".")[0]
    assert qido_status(gw, a2) == 200
    st, h, j3 = refresh(gw, r2)  # the newest one works once
    assert st == 200, j3
    a3, r3 = j3["access_token"], j3["refresh_token"]
    assert qido_status(gw, a3) == 200
    # r1 again: someone replayed a stolen token
    st, h, e = refresh(gw, r1)
    assert st == 401, e
    assert e["error"]["code"] == "unauthenticated"
    assert "already used" in e["error"]["message"], e
    assert h.get("WWW-Authenticate", "").startswith("Bearer")
    # the whole session ends at once, on this gateway (no cache delay)
    for t in (a3, a2, a1):
        st, h, b = req(gw, "GET", QIDO, t)
        assert st == 401, b
        assert error_of(b)["code"] == "unauthenticated"
    st, h, e = refresh(gw, r3)
    assert st == 401, e
    why = gw.sql("SELECT revoked_why FROM sessions s JOIN users u ON u.id = s.user_id "
                 "WHERE u.username = 'refresh1'")
    assert why == [("refresh token reused",)], why
    # a fresh login is unaffected
    assert qido_status(gw, login_ok(gw, "refresh1", GOOD_PW)["access_token"]) == 200


def test_refresh_refusals(gw):
    st, h, e = refresh(gw, "x" * 43)
    assert st == 401 and e["error"]["code"] == "unauthenticated", e
    st, h, b = req(gw, "POST", "/api/auth/refresh")
    assert st == 401, b
    st, h, b = req(gw, "POST", "/api/auth/refresh", headers={"Content-Type": "application/json"},
                   body="[1]")
    assert st == 400, b


def test_logout_ends_the_session(gw):
    new_user(gw, "logout1")
    j = login_ok(gw, "logout1", GOOD_PW)
    keep = login_ok(gw, "logout1", GOOD_PW)["access_token"]  # another session
    tok = j["access_token"]
    assert qido_status(gw, tok) == 200
    st, h, b = req(gw, "POST", "/api/auth/logout", tok)
    assert st == 204, b
    assert b == b""
    c = set_cookies(h)
    assert c.get("__Host-kp_access", ("x",))[0] == "", c  # cookies cleared
    assert qido_status(gw, tok) == 401
    assert req(gw, "GET", "/api/auth/me", tok)[0] == 401
    st, h, e = refresh(gw, j["refresh_token"])
    assert st == 401, e
    assert qido_status(gw, keep) == 200  # only that session
    assert req(gw, "POST", "/api/auth/logout")[0] == 401


# -- 7. forged and tampered tokens ----------------------------------------------------------------
@pytest.fixture(scope="module")
def doctor_token(gw):
    new_user(gw, "forge1", "doctor")
    return login_ok(gw, "forge1", GOOD_PW)["access_token"]


def assert_refused(gw, token, what):
    st, h, b = req(gw, "GET", QIDO, token)
    assert st == 401, (what, st, b[:300])
    assert error_of(b)["code"] == "unauthenticated", what
    assert h.get("WWW-Authenticate", "").startswith("Bearer"), what


def test_forged_token_with_the_real_key_is_accepted(gw, doctor_token):
    """Proves the forging below is right: the same recipe with valid claims passes."""
    key = jwt_key(gw)
    head, claims, _ = jwt_parts(doctor_token)
    now = int(time.time())
    claims.update(iat=now, nbf=now, exp=now + 300)
    tok = forge(key, claims)
    assert tok != doctor_token
    assert qido_status(gw, tok) == 200
    # and the roles are whatever the (correctly signed) token says
    claims["roles"] = ["operator"]
    st, h, b = req(gw, "POST", "/dicom-web/studies", forge(key, claims),
                   headers={"Content-Type": "application/dicom"}, body=b"not dicom")
    assert st not in (401, 403), b
    claims["roles"] = []
    assert qido_status(gw, forge(key, claims)) == 403


def test_malformed_and_unsigned_tokens(gw, doctor_token):
    head, claims, sig = jwt_parts(doctor_token)
    for what, tok in [
            ("garbage", "garbage"),
            ("three garbage parts", "abc.def.ghi"),
            ("empty signature", doctor_token.rsplit(".", 1)[0] + "."),
            ("two parts", doctor_token.rsplit(".", 1)[0]),
            ("four parts", doctor_token + ".AAAA"),
            ("alg none", b64url_json({"alg": "none", "typ": "JWT"}) + "." + b64url_json(claims)
             + "."),
            ("alg none with kid", b64url_json({"alg": "none", "typ": "JWT", "kid": "k1"}) + "."
             + b64url_json(claims) + "."),
            ("alg none, old signature", b64url_json({"alg": "none", "typ": "JWT", "kid": "k1"})
             + "." + b64url_json(claims) + "." + sig),
            ("signature of another token", doctor_token.rsplit(".", 1)[0] + "."
             + gw.token.rsplit(".", 1)[1])]:
        assert_refused(gw, tok, what)
    assert qido_status(gw, doctor_token) == 200


def test_tampered_payload_is_refused(gw, doctor_token):
    head, claims, sig = jwt_parts(doctor_token)
    h64 = doctor_token.split(".")[0]
    for change in ({"roles": ["admin"]}, {"sub": gw.ADMIN}, {"exp": claims["exp"] + 86400},
                   {"sites": ["default", "other"]}):
        c = dict(claims, **change)
        assert_refused(gw, h64 + "." + b64url_json(c) + "." + sig, f"tampered {change}")
    # the signature alone is the check: the same claims re-encoded (other key order) still fail
    reordered = dict(reversed(list(claims.items())))
    assert b64url_json(reordered) != doctor_token.split(".")[1]
    assert_refused(gw, h64 + "." + b64url_json(reordered) + "." + sig, "re-encoded payload")


def test_forged_tokens_with_bad_claims_are_refused(gw, doctor_token):
    key = jwt_key(gw)
    _, claims, _ = jwt_parts(doctor_token)
    now = int(time.time())
    good = dict(claims, iat=now, nbf=now, exp=now + 300)
    assert qido_status(gw, forge(key, good)) == 200
    cases = [
        ("expired", dict(good, iat=now - 900, nbf=now - 900, exp=now - 120)),
        ("not yet valid", dict(good, nbf=now + 600, exp=now + 900)),
        ("issued in the future", dict(good, iat=now + 600, exp=now + 900)),
        ("wrong audience", dict(good, aud="someone-else")),
        ("audience list without us", dict(good, aud=["someone-else", "other"])),
        ("wrong issuer", dict(good, iss="evil")),
        ("no exp", {k: v for k, v in good.items() if k != "exp"}),
        ("no iss", {k: v for k, v in good.items() if k != "iss"}),
        ("no aud", {k: v for k, v in good.items() if k != "aud"}),
        ("no sub", {k: v for k, v in good.items() if k != "sub"}),
        ("no jti", {k: v for k, v in good.items() if k != "jti"}),
        ("jti without a session", dict(good, jti="nosession")),
        ("string exp", dict(good, exp=str(now + 300))),
        ("roles not strings", dict(good, roles=[1])),
    ]
    for what, c in cases:
        assert_refused(gw, forge(key, c), what)
    # header problems, valid claims
    for what, header, alg, k in [
            ("unknown kid", {"alg": "HS256", "typ": "JWT", "kid": "k2"}, "HS256", key),
            ("no kid", {"alg": "HS256", "typ": "JWT"}, "HS256", key),
            ("HS512", {"alg": "HS512", "typ": "JWT", "kid": "k1"}, "HS512", key),
            ("other key", None, "HS256", os.urandom(32)),
            ("key text instead of its bytes", None, "HS256",
             open(os.path.join(gw.dir, "var", "auth", "jwt.key"), "rb").read().strip()),
            ("crit header", {"alg": "HS256", "typ": "JWT", "kid": "k1", "crit": ["exp"]},
             "HS256", key)]:
        assert_refused(gw, forge(k, good, header, alg), what)
    # a well-formed token of a session that does not exist: signature fine, session not alive
    st, h, b = req(gw, "GET", QIDO, forge(key, dict(good, jti="AAAAAAAAAAAAAAAAAAAAAA.x")))
    assert st == 401, b


# -- 8. CSRF with cookie sessions -----------------------------------------------------------------
def cookie_login(gw, user, pw):
    st, h, j = post_json(gw, "/api/auth/login", {"username": user, "password": pw,
                                                  "session": "cookie"})
    assert st == 200, j
    c = {k: v[0] for k, v in set_cookies(h).items()}
    return c, "; ".join(f"{k}={v}" for k, v in c.items())


def test_csrf_defences_for_cookies(gw):
    c, cookie = cookie_login(gw, gw.ADMIN, gw.ADMIN_PASSWORD)
    csrf = c["__Host-kp_csrf"]
    assert req(gw, "GET", QIDO, cookie=cookie)[0] == 200  # reading needs no CSRF proof
    stow = {"Content-Type": "multipart/related; type=\"application/dicom\"; boundary=XyZ"}
    body = b"--XyZ\r\nContent-Type: application/dicom\r\n\r\nnot dicom\r\n--XyZ--\r\n"

    def post(extra):
        return req(gw, "POST", "/dicom-web/studies", cookie=cookie, headers={**stow, **extra},
                   body=body)

    st, h, b = post({})
    assert st == 403, b
    e = error_of(b)
    assert e["code"] == "forbidden"
    assert "cross-site" in (e["message"] + " " + e.get("detail", "")), e
    st, h, b = post({"X-CSRF-Token": csrf})
    assert st not in (401, 403), b
    st, h, b = post({"Origin": f"https://127.0.0.1:{gw.https_port}"})
    assert st not in (401, 403), b
    for bad in ({"Origin": "https://evil.example"},
                {"Origin": f"http://127.0.0.1:{gw.https_port}"},
                {"Origin": f"https://127.0.0.1:{gw.https_port}.evil.example"},
                {"Origin": "null"},
                {"X-CSRF-Token": csrf[:-1] + ("A" if csrf[-1] != "A" else "B")},
                {"X-CSRF-Token": ""},
                {"X-CSRF-Token": csrf, "Cookie": cookie.replace(csrf, "x" * len(csrf))}):
        hdrs = {**stow, **bad}
        ck = hdrs.pop("Cookie", cookie)
        st, h, b = req(gw, "POST", "/dicom-web/studies", cookie=ck, headers=hdrs, body=body)
        assert st == 403, (bad, st, b)
    # a bearer token is not a cookie: no CSRF proof needed
    st, h, b = req(gw, "POST", "/dicom-web/studies", gw.token, headers=stow, body=body)
    assert st not in (401, 403), b
    # refresh from the cookie is guarded too, and answers with new cookies
    st, h, b = req(gw, "POST", "/api/auth/refresh", cookie=cookie)
    assert st == 403, b
    st, h, b = req(gw, "POST", "/api/auth/refresh", cookie=cookie, headers={"X-CSRF-Token": csrf})
    assert st == 200, b
    assert "access_token" not in json.loads(b)
    c2 = {k: v[0] for k, v in set_cookies(h).items()}
    assert c2["__Host-kp_refresh"] and c2["__Host-kp_refresh"] != c["__Host-kp_refresh"]
    cookie2 = "; ".join(f"{k}={v}" for k, v in c2.items())
    assert req(gw, "GET", QIDO, cookie=cookie2)[0] == 200
    # logout with cookies needs the proof as well
    assert req(gw, "POST", "/api/auth/logout", cookie=cookie2)[0] == 403
    st, h, b = req(gw, "POST", "/api/auth/logout", cookie=cookie2,
                   headers={"X-CSRF-Token": c2["__Host-kp_csrf"]})
    assert st == 204, b
    assert req(gw, "GET", QIDO, cookie=cookie2)[0] == 401


# -- 9. second factor -----------------------------------------------------------------------------
def test_totp_enrolment_and_login(gw):
    new_user(gw, "mfa1", "doctor")
    tok = login_ok(gw, "mfa1", GOOD_PW)["access_token"]
    st, h, s = post_json(gw, "/api/auth/mfa/setup", {}, tok)
    assert st == 200, s
    secret = s["secret"]
    assert s["otpauth_uri"].startswith("otpauth://totp/"), s
    assert f"secret={secret}" in s["otpauth_uri"]
    base64.b32decode(secret + "=" * (-len(secret) % 8))  # valid base32
    # not enrolled until confirmed: login still needs no code
    login_ok(gw, "mfa1", GOOD_PW)
    step = int(time.time()) // 30
    near = {totp(secret, step + d) for d in range(-2, 4)}
    wrong = next(c for c in ("%06d" % n for n in range(1000000)) if c not in near)
    st, h, j = post_json(gw, "/api/auth/mfa/confirm", {"code": wrong}, tok)
    assert st == 400, j  # a wrong code does not enrol
    st, h, j = post_json(gw, "/api/auth/mfa/confirm", {"code": totp(secret, step)}, tok)
    assert st == 200, j
    codes = j["recovery_codes"]
    assert len(codes) == 10 and len(set(codes)) == 10
    # From here on the gateway's clock must stay within steps step..step+1 (at least 30 s).
    st, j = gw.login("mfa1", GOOD_PW)
    assert st == 401 and j["error"]["code"] == "mfa_required", j
    # the code used to confirm is spent
    st, j = gw.login("mfa1", GOOD_PW, totp=totp(secret, step))
    assert st == 401 and j["error"]["code"] == "mfa_required", j
    assert "already used" in j["error"]["message"], j
    # the next step's code (within the allowed drift) works once
    code = totp(secret, step + 1)
    j = login_ok(gw, "mfa1", GOOD_PW, totp=code)
    assert qido_status(gw, j["access_token"]) == 200
    st, j = gw.login("mfa1", GOOD_PW, totp=code)
    assert st == 401 and j["error"]["code"] == "mfa_required", j
    assert "already used" in j["error"]["message"], j
    st, j = gw.login("mfa1", GOOD_PW, totp=wrong)
    assert st == 401 and j["error"]["code"] == "mfa_required", j
    assert "wrong" in j["error"]["message"], j
    # a right code with a wrong password is just a wrong password
    st, j = gw.login("mfa1", "Wrong-password-123", totp=totp(secret, step + 2))
    assert st == 401 and j["error"]["code"] == "unauthenticated", j
    # recovery codes: each once (typed loosely: upper case)
    j = login_ok(gw, "mfa1", GOOD_PW, recovery_code=codes[3].upper())
    assert qido_status(gw, j["access_token"]) == 200
    st, j = gw.login("mfa1", GOOD_PW, recovery_code=codes[3])
    assert st == 401 and j["error"]["code"] == "mfa_required", j
    st, j = gw.login("mfa1", GOOD_PW, recovery_code="abcd-efgh-jkmn-pqrs")
    assert st == 401 and j["error"]["code"] == "mfa_required", j
    st, h, me = req(gw, "GET", "/api/auth/me", tok)
    assert json.loads(me)["mfa_enrolled"] is True
    assert [x == "" for (x,) in gw.sql("SELECT unnest(recovery_codes) FROM users WHERE "
                                       "username = 'mfa1'")] == [i == 3 for i in range(10)]


def enrol(gw, name):
    """A doctor with a confirmed second factor: (secret, step of the confirming code, codes)."""
    new_user(gw, name, "doctor")
    tok = login_ok(gw, name, GOOD_PW)["access_token"]
    st, h, s = post_json(gw, "/api/auth/mfa/setup", {}, tok)
    assert st == 200, s
    step = int(time.time()) // 30
    st, h, j = post_json(gw, "/api/auth/mfa/confirm", {"code": totp(s["secret"], step)}, tok)
    assert st == 200, j
    return s["secret"], step, j["recovery_codes"]


def test_every_recovery_code_works_once(gw):
    secret, step, codes = enrol(gw, "mfa3")
    for i in (0, 1, 9, 5):
        j = login_ok(gw, "mfa3", GOOD_PW, recovery_code=codes[i])
        assert qido_status(gw, j["access_token"]) == 200
        st, j = gw.login("mfa3", GOOD_PW, recovery_code=codes[i])
        assert st == 401 and j["error"]["code"] == "mfa_required", (i, j)
        gw.pacsctl("user", "unlock", "mfa3")  # the refusals above count towards lockout


def test_wrong_codes_count_towards_lockout(gw):
    secret, step, _ = enrol(gw, "mfa2")
    valid = {totp(secret, step + d) for d in range(-2, 4)}
    wrong = [c for c in ("%06d" % n for n in range(0, 1000000, 7919)) if c not in valid][:5]
    for c in wrong:
        st, j = gw.login("mfa2", GOOD_PW, totp=c)
        assert st == 401 and j["error"]["code"] == "mfa_required", j
    st, j = gw.login("mfa2", GOOD_PW, totp=totp(secret, step + 1))
    assert st == 401 and j["error"]["code"] == "account_locked", j
    gw.pacsctl("user", "unlock", "mfa2")
    login_ok(gw, "mfa2", GOOD_PW, totp=totp(secret, step + 1))


# -- revoked sessions and the sign-in path --------------------------------------------------------
def test_a_revoked_session_does_not_block_signing_in_again(gw):
    new_user(gw, "stale1", "doctor")
    c, cookie = cookie_login(gw, "stale1", GOOD_PW)
    # the session is revoked elsewhere (here: its refresh token replayed; also a password
    # change in another session, or an administrator) ...
    r = c["__Host-kp_refresh"]
    assert refresh(gw, r)[0] == 200
    assert refresh(gw, r)[0] == 401
    assert req(gw, "GET", QIDO, cookie=cookie)[0] == 401
    # ... and the browser, still holding the access cookie, comes back to sign in
    st, h, b = req(gw, "GET", "/app/login", cookie=cookie)
    assert st == 200, b
    st, h, b = req(gw, "POST", "/api/auth/login", cookie=cookie,
                   headers={"Content-Type": "application/json",
                            "Origin": f"https://127.0.0.1:{gw.https_port}"},
                   body=json.dumps({"username": "stale1", "password": GOOD_PW,
                                    "session": "cookie"}))
    assert st == 200, b


def test_a_cross_site_login_form_is_refused(gw):
    """A page of another site cannot sign the browser into an account (login CSRF): a
    cross-origin POST is refused, and the login only takes application/json."""
    body = json.dumps({"username": gw.ADMIN, "password": gw.ADMIN_PASSWORD, "session": "cookie"})
    st, h, b = gw.https("POST", "/api/auth/login", {"Content-Type": "application/json",
                                                    "Origin": "https://evil.example"}, body,
                        auth=False)
    assert st == 403 and not h.get_all("Set-Cookie"), b
    st, h, b = gw.https("POST", "/api/auth/login", {"Content-Type": "text/plain"}, body,
                        auth=False)
    assert st == 415 and not h.get_all("Set-Cookie"), b
    st, h, b = gw.https("POST", "/api/auth/login", {"Content-Type": "application/json",
                                                    "Origin": f"https://127.0.0.1:{gw.https_port}"},
                        body, auth=False)
    assert st == 200, b


def test_replacing_a_second_factor_needs_the_password(gw):
    secret, step, codes = enrol(gw, "mfa5")
    j = login_ok(gw, "mfa5", GOOD_PW, recovery_code=codes[0])
    tok = j["access_token"]
    st, h, b = gw.https("POST", "/api/auth/mfa/setup", {"Authorization": "Bearer " + tok})
    assert st == 401, b
    st, h, b = gw.https("POST", "/api/auth/mfa/setup", {"Authorization": "Bearer " + tok,
                                                        "Content-Type": "application/json"},
                        json.dumps({"password": "not the password 123"}))
    assert st == 401, b
    st, h, b = gw.https("POST", "/api/auth/mfa/setup", {"Authorization": "Bearer " + tok,
                                                        "Content-Type": "application/json"},
                        json.dumps({"password": GOOD_PW}))
    assert st == 200 and json.loads(b)["replaces_existing"] is True, b
