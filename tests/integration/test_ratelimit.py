"""Rate limits: login attempts per client address and per account, /api requests per address and
per account (token buckets); 429 with Retry-After and a JSON body; DICOMweb is not limited."""
import json

import pytest

import kp

PW = "Rate-Limit-Password-9"


@pytest.fixture(scope="module")
def gw(cluster):
    s = kp.System(cluster, gateway=True, extra_env={"KP_HTTP_RATE_LOGIN_PER_MIN": "5",
                                                    "KP_HTTP_RATE_API_PER_SEC": "3"})
    try:
        s.add_user("alice", PW, "doctor")
        yield s
    finally:
        s.stop()


def test_logins_are_limited(gw):
    # the test administrator logged in once at start: 4 attempts left in the burst of 5
    statuses = [gw.login("alice", "wrong password 123")[0] for _ in range(4)]
    assert statuses == [401] * 4
    st, h, b = gw.https("POST", "/api/auth/login", {"Content-Type": "application/json"},
                        json.dumps({"username": "alice", "password": PW}), auth=False)
    assert st == 429, b
    assert int(h["Retry-After"]) >= 1
    assert json.loads(b)["error"]["code"] == "rate_limited"
    # the limit is not a lockout: the account itself is not locked
    assert gw.sql("SELECT locked_until FROM users WHERE username = 'alice'")[0][0] is None


def test_api_is_limited_but_dicomweb_is_not(gw):
    h = {"Authorization": "Bearer " + gw.token}
    got = [gw.https("GET", "/api/auth/me", h)[0] for _ in range(15)]
    assert 200 in got and 429 in got, got
    # DICOMweb requests of the same account are not limited
    assert all(gw.https("GET", "/dicom-web/studies?limit=1", h)[0] == 200 for _ in range(15))
