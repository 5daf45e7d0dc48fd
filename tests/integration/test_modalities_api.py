"""The modality registry over REST (/api/modalities, permission system.configure), against the
real gateway and PostgreSQL: create/read/update/delete with their statuses (201, 200, 204, 400,
404, 409), validation as the table's CHECKs and `pacsctl ae add`, a doctor refused (403), the
changes audited as admin.modality, a C-ECHO to a real storescp (ok true) and to a closed port
(ok false), and the same table seen from `pacsctl ae list` and from the API."""
import json
import os
import subprocess
import tempfile

import pytest

import kp

PW = "Modalities-Api-Pass-5"


@pytest.fixture(scope="module")
def gw(cluster):
    s = kp.System(cluster, gateway=True, extra_env={"KP_HTTP_RATE_API_PER_SEC": "100000"})
    try:
        s.add_user("drmod", PW, "doctor", sites=["default"])
        yield s
    finally:
        s.stop()


def api(gw, method, path, body=None, token=None):
    """One request as the test administrator (or as the holder of token); (status, json)."""
    h = {}
    if token:
        h["Authorization"] = "Bearer " + token
    data = None
    if body is not None:
        data = json.dumps(body)
        h["Content-Type"] = "application/json"
    st, hd, b = gw.https(method, path, h, data)
    return st, (json.loads(b) if b else None)


class Storescp:
    """A storescp on a free loopback port (as tests/integration/test_cmove.py starts them)."""

    def __init__(self, env, aet):
        self.aet, self.env = aet, env
        self.dir = tempfile.mkdtemp(prefix="kp-mod-")
        self.port = kp.free_port()
        self.log = open(os.path.join(self.dir, "storescp.log"), "wb")
        self.p = subprocess.Popen(["storescp", "-aet", aet, "-od", self.dir, str(self.port)],
                                  env=env, stdout=self.log, stderr=subprocess.STDOUT)
        kp.wait_for(self._echo, 20, f"storescp {aet}")

    def _echo(self):
        r = subprocess.run(["echoscu", "-aec", self.aet, "127.0.0.1", str(self.port)],
                           capture_output=True, env=self.env, timeout=20)
        return r.returncode == 0

    def stop(self):
        self.p.terminate()
        try:
            self.p.wait(10)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
        self.log.close()


def test_crud_round_trip(gw):
    st, j = api(gw, "POST", "/api/modalities",
                {"ae_title": "CT_ROOM_1", "host": "ct1.example", "port": 104,
                 "description": "CT room 1", "site": "default", "allow_find": False})
    assert st == 201, j
    assert j["ae_title"] == "CT_ROOM_1" and j["host"] == "ct1.example" and j["port"] == 104
    assert j["description"] == "CT room 1" and j["site"] == "default"
    assert j["allow_store"] is True and j["allow_find"] is False
    assert j["allow_retrieve"] is True and j["tls"] is False
    assert j["move_associations"] == 1  # the default: one association per C-MOVE
    assert j["created_at"].endswith("Z")

    st, j = api(gw, "GET", "/api/modalities/CT_ROOM_1")
    assert st == 200 and j["host"] == "ct1.example"
    st, j = api(gw, "GET", "/api/modalities")
    assert st == 200 and "CT_ROOM_1" in [m["ae_title"] for m in j["modalities"]]

    # PUT changes the members sent, keeps the others
    st, j = api(gw, "PUT", "/api/modalities/CT_ROOM_1",
                {"port": 11112, "tls": True, "site": "", "allow_find": True,
                 "move_associations": 4})
    assert st == 200, j
    assert j["port"] == 11112 and j["tls"] is True and j["site"] == "" and j["allow_find"] is True
    assert j["host"] == "ct1.example" and j["description"] == "CT room 1"
    assert j["move_associations"] == 4
    row = gw.sql("SELECT port, tls, site, move_associations FROM modalities "
                 "WHERE ae_title = 'CT_ROOM_1'")
    assert row == [(11112, True, "", 4)]
    # the same AE title in the body is accepted; another one is a rename: refused
    assert api(gw, "PUT", "/api/modalities/CT_ROOM_1", {"ae_title": "CT_ROOM_1"})[0] == 200
    st, j = api(gw, "PUT", "/api/modalities/CT_ROOM_1", {"ae_title": "CT_ROOM_9"})
    assert st == 400 and j["error"]["code"] == "invalid_argument"

    st, j = api(gw, "DELETE", "/api/modalities/CT_ROOM_1")
    assert st == 204
    assert api(gw, "GET", "/api/modalities/CT_ROOM_1")[0] == 404
    assert not gw.sql("SELECT 1 FROM modalities WHERE ae_title = 'CT_ROOM_1'")


def test_duplicate_and_unknown(gw):
    body = {"ae_title": "DUP_AE", "host": "10.0.0.5", "port": 104}
    assert api(gw, "POST", "/api/modalities", body)[0] == 201
    st, j = api(gw, "POST", "/api/modalities", dict(body, host="10.0.0.6"))
    assert st == 409 and j["error"]["code"] == "conflict"
    assert gw.sql("SELECT host FROM modalities WHERE ae_title = 'DUP_AE'") == [("10.0.0.5",)]
    for method, path, b in (("GET", "/api/modalities/NO_SUCH_AE", None),
                            ("PUT", "/api/modalities/NO_SUCH_AE", {"port": 5}),
                            ("DELETE", "/api/modalities/NO_SUCH_AE", None),
                            ("POST", "/api/modalities/NO_SUCH_AE/echo", None)):
        st, j = api(gw, method, path, b)
        assert st == 404 and j["error"]["code"] == "not_found", (method, path, st, j)


@pytest.mark.parametrize("body", [
    {"host": "h", "port": 104},                                  # no AE title
    {"ae_title": "", "host": "h", "port": 104},
    {"ae_title": "A" * 17, "host": "h", "port": 104},            # 17 characters
    {"ae_title": "      ", "host": "h", "port": 104},            # all spaces
    {"ae_title": " LEAD", "host": "h", "port": 104},
    {"ae_title": "TRAIL ", "host": "h", "port": 104},
    {"ae_title": "BACK\\SLASH", "host": "h", "port": 104},
    {"ae_title": "TAB\tAE", "host": "h", "port": 104},
    {"ae_title": "NON_ASCII_\u00c9", "host": "h", "port": 104},
    {"ae_title": 42, "host": "h", "port": 104},
    {"ae_title": "BAD_AE", "port": 104},                         # no host
    {"ae_title": "BAD_AE", "host": "", "port": 104},
    {"ae_title": "BAD_AE", "host": "h" * 254, "port": 104},
    {"ae_title": "BAD_AE", "host": "h"},                         # no port
    {"ae_title": "BAD_AE", "host": "h", "port": 0},
    {"ae_title": "BAD_AE", "host": "h", "port": 65536},
    {"ae_title": "BAD_AE", "host": "h", "port": "104"},
    {"ae_title": "BAD_AE", "host": "h", "port": 104.5},
    {"ae_title": "BAD_AE", "host": "h", "port": 104, "tls": "yes"},
    {"ae_title": "BAD_AE", "host": "h", "port": 104, "allow_store": 1},
    {"ae_title": "BAD_AE", "host": "h", "port": 104, "site": "no-such-site"},
    {"ae_title": "BAD_AE", "host": "h", "port": 104, "description": 7},
    {"ae_title": "BAD_AE", "host": "h", "port": 104, "move_associations": 0},
    {"ae_title": "BAD_AE", "host": "h", "port": 104, "move_associations": 17},
    {"ae_title": "BAD_AE", "host": "h", "port": 104, "move_associations": "4"},
    {"ae_title": "BAD_AE", "host": "h", "port": 104, "move_associations": 2.5},
])
def test_validation(gw, body):
    st, j = api(gw, "POST", "/api/modalities", body)
    assert st == 400, (body, st, j)
    assert j["error"]["code"] == "invalid_argument"
    assert not gw.sql("SELECT 1 FROM modalities WHERE ae_title = 'BAD_AE'")


def test_validation_edges_accepted_and_put_checked(gw):
    # 16 characters with an inner space and the repertoire's punctuation; host of 253 bytes
    for ae, host, port in (("SIXTEEN_CHARS_AE", "h" * 253, 65535), ("A B+C*#", "x", 1)):
        st, j = api(gw, "POST", "/api/modalities", {"ae_title": ae, "host": host, "port": port,
                                                    "move_associations": 16})
        assert st == 201 and j["move_associations"] == 16, (ae, j)
    for b in ({"port": 0}, {"host": ""}, {"site": "nowhere"}, {"tls": None, "allow_find": "no"},
              {"move_associations": 0}, {"move_associations": 17}):
        st, j = api(gw, "PUT", "/api/modalities/SIXTEEN_CHARS_AE", b)
        assert st == 400 and j["error"]["code"] == "invalid_argument", (b, st, j)
    assert gw.sql("SELECT port FROM modalities WHERE ae_title = 'SIXTEEN_CHARS_AE'") == [(65535,)]
    # an AE title with a space and punctuation is addressed percent-encoded in the path
    import urllib.parse
    path = "/api/modalities/" + urllib.parse.quote("A B+C*#", safe="")
    st, j = api(gw, "GET", path)
    assert st == 200 and j["ae_title"] == "A B+C*#", (st, j)
    st, j = api(gw, "PUT", path, {"port": 4242})
    assert st == 200 and j["port"] == 4242, (st, j)
    for bad in ("A%5CB", "A%0AB", "%41%4", "ABCDEFGHIJKLMNOPQ", "A%2FB"):  # \, LF, short, 17
        st, j = api(gw, "GET", "/api/modalities/" + bad)
        assert st == 404, (bad, st, j)
    st, j = api(gw, "DELETE", path)
    assert st in (200, 204), (st, j)
    assert gw.sql("SELECT count(*) FROM modalities WHERE ae_title = 'A B+C*#'") == [(0,)]
    # not JSON
    st, h, b = gw.https("POST", "/api/modalities", {"Content-Type": "application/json"}, "{")
    assert st == 400


def test_doctor_is_refused(gw):
    st, j = gw.login("drmod", PW)
    assert st == 200, j
    tok = j["access_token"]
    for method, path, b in (("GET", "/api/modalities", None),
                            ("POST", "/api/modalities", {"ae_title": "DR_AE", "host": "h",
                                                         "port": 104}),
                            ("GET", "/api/modalities/DUP_AE", None),
                            ("PUT", "/api/modalities/DUP_AE", {"port": 5}),
                            ("DELETE", "/api/modalities/DUP_AE", None),
                            ("POST", "/api/modalities/DUP_AE/echo", None)):
        st, j = api(gw, method, path, b, token=tok)
        assert st == 403 and j["error"]["code"] == "forbidden", (method, path, st)
    assert not gw.sql("SELECT 1 FROM modalities WHERE ae_title = 'DR_AE'")
    assert gw.sql("SELECT port FROM modalities WHERE ae_title = 'DUP_AE'") == [(104,)]


def test_changes_are_audited(gw):
    assert api(gw, "POST", "/api/modalities",
               {"ae_title": "AUDIT_AE", "host": "a.example", "port": 104})[0] == 201
    assert api(gw, "PUT", "/api/modalities/AUDIT_AE", {"port": 105})[0] == 200
    assert api(gw, "GET", "/api/modalities/AUDIT_AE")[0] == 200          # a read: no record
    assert api(gw, "DELETE", "/api/modalities/AUDIT_AE")[0] == 204

    def got():
        rows = gw.sql("SELECT action, actor, client, detail FROM audit_log WHERE action = "
                      "'admin.modality' ORDER BY seq")
        return [r for r in rows if r[3].get("target") == "AUDIT_AE"]
    kp.wait_for(lambda: len(got()) >= 3, 30, "3 admin.modality records", 0.2)
    rows = got()
    assert [r[3]["method"] for r in rows] == ["POST", "PUT", "DELETE"]
    assert all(r[1] == gw.ADMIN and r[2] == "127.0.0.1" for r in rows)
    assert rows[1][3]["path"] == "/api/modalities/AUDIT_AE"


def test_echo_real_storescp_and_closed_port(gw):
    scp = Storescp(gw.env, "ECHO_SCP")
    try:
        assert api(gw, "POST", "/api/modalities",
                   {"ae_title": "ECHO_SCP", "host": "127.0.0.1", "port": scp.port})[0] == 201
        st, j = api(gw, "POST", "/api/modalities/ECHO_SCP/echo")
        assert st == 200 and j["ok"] is True, j
        assert "success" in j["detail"] and str(scp.port) in j["detail"]
    finally:
        scp.stop()
    dead = kp.free_port()
    assert api(gw, "POST", "/api/modalities",
               {"ae_title": "ECHO_DEAD", "host": "127.0.0.1", "port": dead})[0] == 201
    st, j = api(gw, "POST", "/api/modalities/ECHO_DEAD/echo")
    assert st == 200 and j["ok"] is False and "failed" in j["detail"], j
    # TLS flagged but no dicom.tls_ca configured: a clear answer, no attempt
    assert api(gw, "PUT", "/api/modalities/ECHO_DEAD", {"tls": True})[0] == 200
    st, j = api(gw, "POST", "/api/modalities/ECHO_DEAD/echo")
    assert st == 200 and j["ok"] is False and "dicom.tls_ca" in j["detail"], j


def test_same_registry_as_pacsctl(gw):
    assert api(gw, "POST", "/api/modalities",
               {"ae_title": "FROM_API", "host": "api.example", "port": 4242,
                "description": "made over REST"})[0] == 201
    out = gw.pacsctl("ae", "list").stdout
    line = next(l for l in out.splitlines() if l.startswith("FROM_API"))
    assert "api.example" in line and "4242" in line and "made over REST" in line

    gw.pacsctl("ae", "add", "FROM_CLI", "--host", "cli.example", "--port", "2104", "--no-store",
               "--tls", "--site", "default")
    st, j = api(gw, "GET", "/api/modalities/FROM_CLI")
    assert st == 200, j
    assert (j["host"], j["port"], j["allow_store"], j["tls"], j["site"]) == \
        ("cli.example", 2104, False, True, "default")
    # removed through the API, gone for pacsctl too
    assert api(gw, "DELETE", "/api/modalities/FROM_CLI")[0] == 204
    assert "FROM_CLI" not in gw.pacsctl("ae", "list").stdout
