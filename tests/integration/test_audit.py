"""The tamper-evident audit trail: gateway auth events -> outbox -> pacs-auditor -> audit_log.

Covers: a scripted session (login, failed logins, refresh-token reuse, logout) recorded in
order with actor, action, outcome and client; the hash chain recomputed here from the
definition in schema/0004_audit.sql (so the documented serialisation is the real one);
`pacsctl audit verify` and `audit list`; GET /api/audit filters and its permission; the
append-only trigger; kill -9 of pacs-auditor during a burst (no loss, no duplicate); two
auditors at once; and tampering (an UPDATE or a DELETE with the trigger disabled, as a
superuser could) found by verify."""
import hashlib
import json
import re
import signal
import threading
import time

import psycopg2
import pytest

import kp

PW = "Audit-Trail-Password-42"
GENESIS = "0" * 64


@pytest.fixture(scope="module")
def gw(cluster):
    s = kp.System(cluster, gateway=True)
    try:
        s.add_user("alice", PW, "doctor", sites=("default",))
        yield s
    finally:
        s.stop()


# -- helpers ------------------------------------------------------------------------------------
def rows(gw, where="TRUE", args=None):
    return gw.sql(
        "SELECT seq, event_id, to_char(at AT TIME ZONE 'UTC', "
        "'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), actor, action, outcome, client, patient_id, "
        f"study_uid, detail, prev_hash, hash FROM audit_log WHERE {where} ORDER BY seq", args)


def count(gw, where="TRUE", args=None):
    return gw.sql(f"SELECT count(*) FROM audit_log WHERE {where}", args)[0][0]


def wait_count(gw, n, where="TRUE", args=None, timeout=60):
    return kp.wait_for(lambda: count(gw, where, args) >= n, timeout,
                       f"{n} audit records where {where}", 0.1)


def settled(gw, timeout=60):
    kp.wait_for(lambda: gw.sql("SELECT count(*) FROM jobs WHERE type = 'audit' AND "
                               "state = 'pending'")[0][0] == 0, timeout,
                "every audit job appended", 0.2)


def post(gw, path, obj, token=None):
    h = {"Content-Type": "application/json"}
    if token:
        h["Authorization"] = "Bearer " + token
    st, _, b = gw.https("POST", path, h, json.dumps(obj), auth=False)
    return st, (json.loads(b) if b else {})


def api(gw, query, token=None):
    h = {"Authorization": "Bearer " + token} if token else None
    st, _, b = gw.https("GET", "/api/audit" + query, h, auth=token is None)
    return st, json.loads(b) if b else {}


def expected_hash(r):
    """The documented definition, independently of the C code."""
    seq, event_id, at, actor, action, outcome, client, pid, study, detail, prev, _ = r
    canon = json.dumps([seq, event_id, at, actor, action, outcome, client, pid, study, detail,
                        prev], separators=(",", ":"), sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()


def verify(gw):
    r = gw.pacsctl("audit", "verify", check=False)
    return r.returncode, r.stdout + r.stderr


def superuser_sql(gw, *statements):
    """Runs statements in one transaction with every trigger of audit_log disabled (what a
    superuser can do; the hash chain must show it)."""
    c = psycopg2.connect(gw.dsn)
    try:
        cur = c.cursor()
        cur.execute("ALTER TABLE audit_log DISABLE TRIGGER ALL")
        for s, a in statements:
            cur.execute(s, a)
        cur.execute("ALTER TABLE audit_log ENABLE TRIGGER ALL")
        c.commit()
    finally:
        c.close()


# -- the scripted session -----------------------------------------------------------------------
def test_session_is_recorded_in_order(gw):
    wait_count(gw, 1, "actor = %s AND action = 'auth.login'", (gw.ADMIN,))  # login_admin
    # records of the set-up (pacsctl user add, dicomd associations) go through the outbox
    # sweep: let them land first, so that only the session's records follow base
    settled(gw)
    base = count(gw)
    steps = []

    def step(expect_new, fn):
        n = count(gw)
        out = fn()
        wait_count(gw, n + expect_new)  # one step at a time: the order is the session's order
        return out

    st, s1 = step(1, lambda: gw.login("alice", PW))
    assert st == 200
    steps.append(("alice", "auth.login", "success"))
    st, _ = step(1, lambda: gw.login("alice", "wrong-password-123"))
    assert st == 401
    steps.append(("alice", "auth.login_failed", "failure"))
    st, _ = step(1, lambda: gw.login("nobody", "whatever-password-1"))
    assert st == 401
    steps.append(("nobody", "auth.login_failed", "failure"))
    st, _ = post(gw, "/api/auth/refresh", {"refresh_token": s1["refresh_token"]})
    assert st == 200  # rotation: not an audit event
    st, _ = step(1, lambda: post(gw, "/api/auth/refresh", {"refresh_token": s1["refresh_token"]}))
    assert st == 401  # the same token again: reuse, the session is revoked
    steps.append(("alice", "auth.refresh_reuse", "failure"))
    st, s2 = step(1, lambda: gw.login("alice", PW))
    assert st == 200
    steps.append(("alice", "auth.login", "success"))
    st, _ = step(1, lambda: post(gw, "/api/auth/logout", {}, token=s2["access_token"]))
    assert st == 204
    steps.append(("alice", "auth.logout", "success"))

    settled(gw)
    got = rows(gw, "seq > %s", (base,))
    assert [(r[3], r[4], r[5]) for r in got] == steps
    assert all(r[6] == "127.0.0.1" for r in got), [r[6] for r in got]
    details = [r[9] for r in got]
    assert details[1] == {"reason": "wrong password"}
    assert details[2] == {"reason": "unknown user"}
    assert set(details[3]) == {"session"} and set(details[0]) == {"session"}
    assert details[3]["session"] == details[0]["session"]  # the revoked session is the first one
    ats = [r[2] for r in got]
    assert ats == sorted(ats)
    # each event_id is its outbox job, done
    ids = [int(r[1]) for r in got]
    assert gw.sql("SELECT count(*) FROM jobs WHERE id = ANY(%s) AND type = 'audit' AND "
                  "state = 'done'", (ids,))[0][0] == len(ids)
    # published by the gateway at once (attempts 0), except the reuse event, emitted inside the
    # revoking transaction and so left to the outbox sweep (attempts 1)
    attempts = dict(gw.sql("SELECT id, attempts FROM jobs WHERE id = ANY(%s)", (ids,)))
    assert [attempts[i] for i in ids] == [0, 0, 0, 1, 0, 0], attempts


def test_chain_matches_documented_definition(gw):
    settled(gw)
    all_rows = rows(gw)
    assert all_rows and all_rows[0][0] == 1 and all_rows[0][10] == GENESIS
    prev = GENESIS
    for i, r in enumerate(all_rows):
        assert r[0] == i + 1
        assert r[10] == prev
        assert r[11] == expected_hash(r), r
        prev = r[11]
    rc, out = verify(gw)
    assert rc == 0, out
    assert f"audit chain intact: {len(all_rows)} records" in out
    assert f"head: seq {len(all_rows)} hash {prev}" in out


def test_pacsctl_audit_list(gw):
    r = gw.pacsctl("audit", "list", "--user", "alice", "--action", "auth.login_failed")
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 2 and "auth.login_failed" in lines[1] and "wrong password" in lines[1]
    r = gw.pacsctl("audit", "list", "--limit", "2")
    assert len(r.stdout.strip().splitlines()) == 3
    assert gw.pacsctl("audit", "bogus", check=False).returncode == 2


# -- GET /api/audit -----------------------------------------------------------------------------
def test_api_filters(gw):
    settled(gw)
    st, j = api(gw, "?action=auth.login_failed")
    assert st == 200, j
    assert j["total"] == count(gw, "action = 'auth.login_failed'") >= 2
    assert {i["action"] for i in j["items"]} == {"auth.login_failed"}
    st, j = api(gw, "?user=ALICE")  # user names ignore case
    assert st == 200
    seqs = [i["seq"] for i in j["items"]]
    assert seqs == sorted(seqs, reverse=True) and len(seqs) == j["total"] == count(
        gw, "actor = 'alice'")
    assert {i["actor"] for i in j["items"]} == {"alice"}
    first = j["items"][-1]
    assert first["action"] == "auth.login" and first["client"] == "127.0.0.1"
    assert len(first["hash"]) == 64 and first["at"].endswith("Z")
    st, j = api(gw, "?user=alice&action=auth.logout")
    assert st == 200 and j["total"] == 1 and j["items"][0]["outcome"] == "success"
    st, j = api(gw, "?limit=2&offset=1")
    assert st == 200 and len(j["items"]) == 2 and j["total"] == count(gw)
    assert j["items"][0]["seq"] == count(gw) - 1
    st, j = api(gw, "?from=2000-01-01T00:00:00Z&to=2000-01-02")
    assert st == 200 and j == {"total": 0, "items": []}
    st, j = api(gw, "?from=2000-01-01&to=2999-12-31T23:59:59.5%2B02:00")
    assert st == 200 and j["total"] == count(gw)
    for bad in ("?from=yesterday", "?to=2026-02-31", "?limit=1001", "?limit=0", "?offset=-1",
                "?user=%zz"):
        assert api(gw, bad)[0] == 400, bad


def test_api_needs_audit_read(gw):
    st, s = gw.login("alice", PW)
    assert st == 200
    st, j = api(gw, "", token=s["access_token"])  # a doctor
    assert st == 403 and j["error"]["code"] == "forbidden"
    assert gw.https("GET", "/api/audit", auth=False)[0] == 401


# -- append-only --------------------------------------------------------------------------------
@pytest.mark.parametrize("statement", [
    "UPDATE audit_log SET actor = 'mallory' WHERE seq = 1",
    "DELETE FROM audit_log WHERE seq = 1",
    "TRUNCATE audit_log",
])
def test_trigger_refuses_changes(gw, statement):
    settled(gw)
    before = rows(gw, "seq = 1")
    total = count(gw)
    assert len(before) == 1
    with pytest.raises(psycopg2.Error) as e:
        gw.sql(statement)
    assert "append-only" in str(e.value)
    # Whoever wrote record 1 (the set-up's pacsctl, a dicomd association...), it is unchanged.
    assert rows(gw, "seq = 1") == before
    assert count(gw) >= total


@pytest.mark.parametrize("statement", [
    "UPDATE audit_log SET actor = 'mallory' WHERE seq = 1",
    "DELETE FROM audit_log WHERE seq = 1",
    "TRUNCATE audit_log",
    "ALTER TABLE audit_log DISABLE TRIGGER audit_log_no_change",
    "DROP TRIGGER audit_log_no_change ON audit_log",
])
def test_services_role_may_not_change_audit_records(gw, statement):
    """The daemons connect as db.app_role (klinika_app), which pacsctl migrate granted every
    privilege except changing audit records: the database refuses by privilege, before any
    trigger, and the role cannot remove the triggers either."""
    settled(gw)
    assert f"user={kp.APP_ROLE}" in gw.env["KP_DB_CONNINFO"]
    before = rows(gw, "seq = 1")
    c = psycopg2.connect(gw.env["KP_DB_CONNINFO"])
    try:
        cur = c.cursor()
        cur.execute("SELECT current_user, count(*) FROM audit_log GROUP BY 1")
        assert cur.fetchone()[0] == kp.APP_ROLE  # it reads the trail (verification does)
        with pytest.raises(psycopg2.Error) as e:
            cur.execute(statement)
        assert "permission denied" in str(e.value) or "must be owner" in str(e.value), e.value
        c.rollback()
        # everything else the services need it has, e.g. the index and the outbox
        cur.execute("UPDATE jobs SET updated_at = updated_at WHERE false")
        cur.execute("TRUNCATE storage_orphans")
        c.rollback()
    finally:
        c.close()
    assert rows(gw, "seq = 1") == before


# -- durability -----------------------------------------------------------------------------------
def test_kill_auditor_during_burst(gw):
    n = 200
    errors = []

    def burst():
        try:
            for i in range(n):
                st, _ = gw.login("burst", f"not-the-password-{i}")
                if st != 401:
                    errors.append(st)
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    t = threading.Thread(target=burst)
    t.start()
    wait_count(gw, 20, "actor = 'burst'")
    gw.kill("pacs-auditor#0")  # SIGKILL, mid-stream
    time.sleep(1.5)
    gw.start("pacs-auditor#0", "pacs-auditor")
    t.join(timeout=300)
    assert not errors, errors[:5]
    wait_count(gw, n, "actor = 'burst'", timeout=90)
    settled(gw)
    time.sleep(2)  # a straggler duplicate would have arrived by now
    assert count(gw, "actor = 'burst'") == n
    jobs = gw.sql("SELECT id FROM jobs WHERE type = 'audit' AND payload->>'actor' = 'burst' "
                  "ORDER BY id")
    recs = gw.sql("SELECT event_id::bigint FROM audit_log WHERE actor = 'burst' ORDER BY 1")
    assert len(jobs) == n and [j[0] for j in jobs] == [r[0] for r in recs]
    rc, out = verify(gw)
    assert rc == 0, out


def test_two_auditors(gw):
    gw.start("pacs-auditor#1", "pacs-auditor")
    try:
        before = count(gw)
        for k in range(4):  # batches the sweep publishes at once: both auditors get some
            gw.sql("INSERT INTO jobs (type, payload, lease_until) SELECT 'audit', "
                   "jsonb_build_object('at', to_char(now() AT TIME ZONE 'UTC', "
                   "'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), 'actor', 'AE_' || g, 'action', "
                   "'dicom.move', 'outcome', 'success', 'client', '10.0.0.' || g, "
                   "'study_uid', '1.2.3.' || g, 'patient_id', 'P' || g, 'detail', "
                   "jsonb_build_object('n', g, 'dest', 'STORE\u00e9')), now() "
                   "FROM generate_series(%s, %s) g", (k * 100 + 1, k * 100 + 100))
            time.sleep(0.3)
        # and events from the gateway at the same time
        for i in range(20):
            assert gw.login("twice", f"wrong-{i}")[0] == 401
        wait_count(gw, before + 420, timeout=90)
        settled(gw)
        time.sleep(2)
        assert count(gw) == before + 420
        assert gw.sql("SELECT count(DISTINCT event_id) = count(*) FROM audit_log")[0][0]
        r = rows(gw, "action = 'dicom.move' AND actor = 'AE_7'")
        assert len(r) == 1 and r[0][7] == "P7" and r[0][8] == "1.2.3.7"
        assert r[0][9] == {"n": 7, "dest": "STORE\u00e9"} and r[0][11] == expected_hash(r[0])
        rc, out = verify(gw)
        assert rc == 0, out
        gw.kill("pacs-auditor#1", signal.SIGTERM)
        m = re.search(r"stopping after (\d+) audit records appended", gw.log("pacs-auditor#1"))
        assert m and int(m.group(1)) > 0  # the second auditor did take part
    finally:
        gw.kill("pacs-auditor#1")


# -- tampering ------------------------------------------------------------------------------------
def test_verify_finds_a_changed_record(gw):
    settled(gw)
    target = rows(gw, "actor = 'nobody' AND action = 'auth.login_failed'")[0]
    seq, detail = target[0], target[9]
    superuser_sql(gw, ("UPDATE audit_log SET detail = %s WHERE seq = %s",
                       (json.dumps({"reason": "nothing to see"}), seq)))
    rc, out = verify(gw)
    assert rc == 1, out
    assert f"BROKEN at seq {seq}: hash mismatch" in out, out
    # put it back: the chain is intact again (only the content mattered)
    superuser_sql(gw, ("UPDATE audit_log SET detail = %s WHERE seq = %s",
                       (json.dumps(detail), seq)))
    rc, out = verify(gw)
    assert rc == 0, out
    # a rewritten hash does not help: the next record still points at the old one
    superuser_sql(gw, ("UPDATE audit_log SET actor = 'mallory' WHERE seq = %s", (seq,)))
    r = rows(gw, "seq = %s", (seq,))[0]
    superuser_sql(gw, ("UPDATE audit_log SET hash = %s WHERE seq = %s", (expected_hash(r), seq)))
    rc, out = verify(gw)
    assert rc == 1 and f"BROKEN at seq {seq + 1}: prev_hash mismatch" in out, out
    superuser_sql(gw, ("UPDATE audit_log SET actor = 'nobody', hash = %s WHERE seq = %s",
                       (target[11], seq)))
    assert verify(gw)[0] == 0


def test_verify_finds_a_deleted_record(gw):
    settled(gw)
    total = count(gw)
    mid = total // 2
    superuser_sql(gw, ("DELETE FROM audit_log WHERE seq = %s", (mid,)))
    rc, out = verify(gw)
    assert rc == 1, out
    assert f"BROKEN at seq {mid + 1}: gap in seq (expected {mid}" in out, out
