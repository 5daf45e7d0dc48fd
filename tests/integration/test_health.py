"""GET /healthz and GET /readyz of pacs-gateway: public, JSON, no patient data; /readyz turns
unready (503 + Retry-After, the failing check named) when PostgreSQL is stopped or pacs-busd is
killed, and ready again once they are back, while /healthz and the static pages keep answering.
Runs on a private PostgreSQL cluster, since it stops it."""
import json
import os
import re
import subprocess

import pytest

import kp


@pytest.fixture(scope="module")
def own():
    c = kp.Cluster()
    s = None
    try:
        s = kp.System(c, gateway=True)
        yield c, s
    finally:
        if s:
            s.stop()
        c.stop()


def get(s, path):
    st, h, b = s.https("GET", path, auth=False)
    return st, {k.lower(): v for k, v in h.items()}, json.loads(b) if b else None


def test_healthz(own):
    _, s = own
    st, h, j = get(s, "/api/openapi.json")  # public, the API's own description
    assert st == 200 and j["openapi"].startswith("3.0") and "/api/auth/login" in j["paths"]
    st, h, j = get(s, "/healthz")
    assert st == 200 and h["content-type"].startswith("application/json")
    assert j["status"] == "ok" and j["process"] == "pacs-gateway" and j["uptime_s"] >= 0


def test_ready_when_everything_answers(own):
    _, s = own
    kp.wait_for(lambda: get(s, "/readyz")[0] == 200, 30, "the gateway to be ready")
    st, h, j = get(s, "/readyz")
    assert j["ready"] is True
    c = j["checks"]
    assert set(c) == {"database", "schema", "bus", "storage"}
    assert all(v["ok"] for v in c.values()), c
    assert c["schema"]["version"] == c["schema"]["expected"]
    assert c["storage"]["free_bytes"] > 0 and c["storage"]["total_bytes"] >= c["storage"]["free_bytes"]
    assert c["bus"]["workers"] >= 2  # the indexer and the auditor
    assert "retry-after" not in h
    # public: a token is not needed, and a bad one is ignored rather than refused
    st, _, _ = s.https("GET", "/readyz", {"Authorization": "Bearer nonsense"}, auth=False)
    assert st == 200


def test_unready_without_the_database(own):
    cluster, s = own
    cluster.server("stop")
    try:
        def down():
            st, h, j = get(s, "/readyz")
            return st == 503 and not j["checks"]["database"]["ok"]
        kp.wait_for(down, 30, "/readyz to report the database down")
        st, h, j = get(s, "/readyz")
        assert j["ready"] is False and h["retry-after"] == "5"
        assert j["checks"]["storage"]["ok"]  # the other checks still report
        assert get(s, "/healthz")[0] == 200
        assert s.https("GET", "/app/login", auth=False)[0] == 200
        # what needs the database: 503, Retry-After, a JSON error (never a hang or a crash)
        st, h, b = s.https("GET", "/dicom-web/studies")
        assert st == 503 and h["Retry-After"] == "5", (st, b)
        assert json.loads(b)["error"]["code"] == "database_error"
        # dicomd refuses a store it cannot make durable
        ct = os.path.join(kp.PYDICOM_DATA, "test_files", "CT_small.dcm")
        rc, statuses, out = s.storescu([ct])
        assert list(statuses.values()) == ["Refused: OutOfResources"], out
    finally:
        cluster.server("start")
    kp.wait_for(lambda: get(s, "/readyz")[0] == 200, 60, "/readyz to recover with the database")
    # the first store after the restart is acknowledged (dicomd's stale connection is replaced)
    ct = os.path.join(kp.PYDICOM_DATA, "test_files", "MR_small.dcm")
    rc, statuses, out = s.storescu([ct])
    assert list(statuses.values()) == ["ok"], out


def test_unready_without_the_bus(own):
    _, s = own
    s.kill("pacs-busd")
    try:
        def down():
            st, _, j = get(s, "/readyz")
            return st == 503 and not j["checks"]["bus"]["ok"] and j["checks"]["database"]["ok"]
        kp.wait_for(down, 30, "/readyz to report the bus down")
    finally:
        s.start("pacs-busd")
    kp.wait_for(lambda: get(s, "/readyz")[0] == 200, 60, "/readyz to recover with the bus")


# -- GET /metrics ---------------------------------------------------------------------------------
def metrics(s):
    from prometheus_client.parser import text_string_to_metric_families
    st, h, b = s.https("GET", "/metrics", auth=False)
    assert st == 200, b
    assert h["Content-Type"].startswith("text/plain; version=0.0.4")
    text = b.decode()
    samples = {}
    for fam in text_string_to_metric_families(text):  # the reference parser: raises on bad text
        for smp in fam.samples:
            samples[(smp.name, tuple(sorted(smp.labels.items())))] = smp.value
    return text, samples


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0)


def test_metrics_parse_and_move(own):
    _, s = own
    kp.wait_for(lambda: get(s, "/readyz")[0] == 200, 60, "ready")
    text, m0 = metrics(s)
    promtool = os.path.join(kp.REPO, "build", "tools", "promtool")
    if os.path.exists(promtool):  # the Prometheus project's own linter
        r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                           text=True)
        assert r.returncode == 0, r.stdout + r.stderr
    route = "/dicom-web/studies"
    before = value(m0, "klinika_http_requests_total", route=route, method="GET", status="200")
    for _ in range(3):
        assert s.https("GET", "/dicom-web/studies")[0] == 200
    assert s.login(s.ADMIN, "wrong password entirely")[0] == 401
    # a stored instance moves the index counter
    ct = os.path.join(kp.PYDICOM_DATA, "test_files", "CT_small.dcm")
    s.storescu([ct])
    kp.wait_for(lambda: value(metrics(s)[1], "klinika_instances_indexed_total") >= 1, 60,
                "the instance counted")
    _, m1 = metrics(s)
    assert value(m1, "klinika_http_requests_total", route=route, method="GET",
                 status="200") == before + 3
    assert value(m1, "klinika_http_request_duration_seconds_count", route=route) >= before + 3
    assert value(m1, "klinika_auth_login_failures_total") >= \
        value(m0, "klinika_auth_login_failures_total") + 1
    assert value(m1, "klinika_db_up") == 1 and value(m1, "klinika_bus_up") == 1
    assert value(m1, "klinika_storage_free_bytes") > 0
    assert value(m1, "klinika_http_db_workers") == 2
    kinds = {dict(k[1]).get("kind") for k in m1 if k[0] == "klinika_worker_last_seen_seconds"}
    assert {"indexer", "auditor"} <= kinds
    assert any(k[0] == "klinika_jobs" and dict(k[1]).get("type") == "index" for k in m1)
    assert value(m1, "klinika_sessions_active") >= 1
    assert value(m1, "klinika_schema_version") >= 6

    # pacs-dicomd's counters (its metrics.dicomd events) and the workers' (their heartbeats)
    def total(samples, name, **labels):
        return sum(v for (n, ls), v in samples.items()
                   if n == name and all(dict(ls).get(k) == x for k, x in labels.items()))

    def dicom_counted():
        m = metrics(s)[1]
        return m if total(m, "klinika_dicom_stores_total", outcome="success") >= 1 else None
    m2 = kp.wait_for(dicom_counted, 30, "the C-STORE in klinika_dicom_stores_total")
    # the running dicomd's series (an earlier test may have restarted it: its predecessor's
    # series stay for a minute), with at least the stored file's bytes (received bit for bit)
    me = f"{os.uname().nodename}:{s.procs['pacs-dicomd'].pid}"
    procs = {dict(ls).get("process") for (n, ls) in m2 if n == "klinika_dicom_stores_total"}
    assert me in procs, procs
    size = s.sql("SELECT min(file_size) FROM instances")[0][0]
    assert size and total(m2, "klinika_dicom_received_bytes_total", process=me) >= size
    assert total(m2, "klinika_dicom_associations_total", result="accepted", process=me) >= 1
    kp.wait_for(lambda: total(metrics(s)[1], "klinika_worker_jobs_done_total", kind="indexer")
                >= 1, 30, "the indexer's jobs in klinika_worker_jobs_done_total")


def test_metrics_refused_to_other_addresses(cluster):
    s = kp.System(cluster, gateway=True, extra_env={"KP_HTTP_METRICS_ALLOW": "10.9.9.9/32"})
    try:
        st, h, b = s.https("GET", "/metrics", auth=False)
        assert st == 403 and json.loads(b)["error"]["code"] == "forbidden"
        assert s.https("GET", "/metrics")[0] == 403  # an admin's token changes nothing
    finally:
        s.stop()


# -- what a monitoring team loads: config/monitoring/ ---------------------------------------------
MON = os.path.join(kp.REPO, "config", "monitoring")
PROMTOOL = os.path.join(kp.REPO, "build", "tools", "promtool")


def test_monitoring_files_use_real_metrics(own):
    """The alert rules and the dashboard only use metrics the system exports: the gateway's
    /metrics, and the audit verification's textfile (pacsctl audit verify --textfile)."""
    import yaml
    _, s = own
    st, _, b = s.https("GET", "/metrics", auth=False)
    # every family /metrics declares (# TYPE), with samples or not yet (no pending job now)
    names = set(re.findall(r"^# TYPE (klinika_\w+)", b.decode(), re.M))
    names |= {n + suffix for n in names for suffix in ("_bucket", "_sum", "_count")}
    tf = os.path.join(s.dir, "audit.prom")
    r = s.pacsctl("audit", "verify", "--textfile", tf)
    assert "intact" in r.stdout
    text = open(tf).read()
    assert "klinika_audit_chain_ok 1\n" in text
    names |= set(re.findall(r"^(klinika_\w+)", text, re.M))
    rules = yaml.safe_load(open(os.path.join(MON, "alerts.yml")))
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    # what the operations issue asks for, at least
    assert {"KlinikaGatewayDown", "KlinikaHighErrorRate", "KlinikaSlowRequests",
            "KlinikaQueueBacklog", "KlinikaDiskAlmostFull", "KlinikaFailedLoginBurst",
            "KlinikaAuditChainBroken"} <= alerts
    dash = json.load(open(os.path.join(MON, "grafana-dashboard.json")))
    exprs += [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = set()
    for e in exprs:
        used |= set(re.findall(r"\b(klinika_\w+)", e))
    assert used and not used - names, f"not exported: {sorted(used - names)}"
    if os.path.exists(PROMTOOL):
        r = subprocess.run([PROMTOOL, "check", "rules", os.path.join(MON, "alerts.yml")],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
        r = subprocess.run([PROMTOOL, "check", "config", "--syntax-only",
                            os.path.join(MON, "prometheus.yml")], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr


def test_audit_textfile_reports_a_broken_chain(own):
    _, s = own
    tf = os.path.join(s.dir, "audit-broken.prom")
    # record 1 must exist before it can be altered (run alone, the trail may still be empty)
    kp.wait_for(lambda: s.sql("SELECT count(*) FROM audit_log")[0][0] >= 1, 60, "an audit record")
    import psycopg2
    c = psycopg2.connect(s.dsn)  # as a superuser could: the append-only trigger off
    try:
        cur = c.cursor()
        cur.execute("ALTER TABLE audit_log DISABLE TRIGGER ALL")
        cur.execute("UPDATE audit_log SET actor = 'mallory' WHERE seq = 1")
        assert cur.rowcount == 1
        cur.execute("ALTER TABLE audit_log ENABLE TRIGGER ALL")
        c.commit()
    finally:
        c.close()
    r = s.pacsctl("audit", "verify", "--textfile", tf, check=False)
    assert r.returncode == 1 and "BROKEN" in r.stdout
    assert "klinika_audit_chain_ok 0\n" in open(tf).read()


# -- request ids ----------------------------------------------------------------------------------
def test_request_ids_reach_the_logs_and_the_indexer(own):
    _, s = own
    st, h, _ = s.https("GET", "/dicom-web/studies", {"X-Request-Id": "ward7-req.42"})
    assert st == 200 and h["X-Request-Id"] == "ward7-req.42"
    st, h, _ = s.https("GET", "/dicom-web/studies", {"X-Request-Id": "no spaces please"})
    assert re.fullmatch(r"[0-9a-f]{16}", h["X-Request-Id"])  # ours instead of a bad one
    st, h2, _ = s.https("GET", "/dicom-web/studies")
    assert re.fullmatch(r"[0-9a-f]{16}", h2["X-Request-Id"]) and h2["X-Request-Id"] != h["X-Request-Id"]
    kp.wait_for(lambda: "[ward7-req.42]" in s.log("pacs-gateway"), 10, "the id in the access log")
    # a STOW-RS upload: the index job carries the id into the indexer's log line
    bnd = "kpboundary42"
    f = os.path.join(kp.PYDICOM_DATA, "test_files", "JPEG2000.dcm")
    body = (b"--" + bnd.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" +
            open(f, "rb").read() + b"\r\n--" + bnd.encode() + b"--\r\n")
    st, h, b = s.https("POST", "/dicom-web/studies",
                       {"Content-Type": f'multipart/related; type="application/dicom"; boundary={bnd}',
                        "X-Request-Id": "stow-7f3a"}, body)
    assert st == 200, b
    rid = s.sql("SELECT payload->>'rid' FROM jobs WHERE type = 'index' AND payload->>'rid' IS NOT NULL")
    assert rid == [("stow-7f3a",)]


# -- pacsctl status / health ----------------------------------------------------------------------
def test_pacsctl_status_and_health(own):
    cluster, s = own
    kp.wait_for(lambda: get(s, "/readyz")[0] == 200, 60, "ready")
    r = s.pacsctl("status")
    out = r.stdout
    for what in ("database", "schema", "bus", "storage", "dicom", "https"):
        assert re.search(rf"^ok\s+{what}\s", out, re.M), out
    assert re.search(r"^\s+indexer\s+1\s", out, re.M) and re.search(r"^\s+auditor\s+1\s", out, re.M)
    assert "job queue" in out and out.rstrip().endswith("healthy")
    for args in (("db",), ("bus",), ("dicom",), ("worker", "indexer"), ("worker", "auditor")):
        r = s.pacsctl("health", *args)
        assert r.returncode == 0 and "healthy" in r.stdout, (args, r.stdout)
    r = s.pacsctl("health", "worker", "nosuchkind", check=False)
    assert r.returncode == 1 and "unhealthy" in r.stdout
    assert s.pacsctl("health", "sideways", check=False).returncode == 2
    # with dicomd gone: status and the probe say so
    s.kill("pacs-dicomd")
    try:
        r = s.pacsctl("status", check=False)
        assert r.returncode == 1 and re.search(r"^FAIL\s+dicom\s", r.stdout, re.M), r.stdout
        assert r.stdout.rstrip().endswith("NOT healthy")
        assert s.pacsctl("health", "dicom", check=False).returncode == 1
    finally:
        s.start_dicomd()
