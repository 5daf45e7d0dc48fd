"""Helpers for the integration tests: a private PostgreSQL cluster, the real daemons, DCMTK tools.

Everything runs for real on loopback: scripts/pgcluster starts PostgreSQL in a temp directory,
pacs-busd / pacs-dicomd / pacs-indexer are the binaries the Makefile built (BUILD=build or
build/asan), and DICOM traffic comes from DCMTK's own storescu/echoscu.
"""
import codecs
import http.client
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time

import psycopg2

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD = os.path.join(REPO, os.environ.get("BUILD", "build"))
BIN = os.path.join(BUILD, "bin")
PYDICOM_DATA = "/usr/lib/python3/dist-packages/pydicom/data"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred, timeout, what, interval=0.1):
    end = time.time() + timeout
    while time.time() < end:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


APP_ROLE = "klinika_app"  # db.app_role's default


class Cluster:
    """One PostgreSQL cluster per test session; each System gets its own database."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="kp-pg-")
        os.chmod(self.dir, 0o755)
        self.port = free_port()
        out = subprocess.run([os.path.join(REPO, "scripts/pgcluster"), "start", self.dir,
                              str(self.port)], check=True, capture_output=True, text=True)
        self.conninfo = out.stdout.strip()
        self.n = 0
        # A migrated template makes each test database a cheap copy.
        self.admin("CREATE DATABASE kp_template")
        env = dict(os.environ, KP_DB_CONNINFO=self.dsn("kp_template"))
        subprocess.run([os.path.join(BIN, "pacsctl"), "migrate"], check=True, env=env,
                       cwd=REPO, capture_output=True)

    def dsn(self, db):
        return re.sub(r"dbname=\S+", f"dbname={db}", self.conninfo)

    def admin(self, sql):
        c = psycopg2.connect(self.dsn("postgres"))
        c.autocommit = True
        c.cursor().execute(sql)
        c.close()

    def new_database(self):
        self.n += 1
        name = f"kp_test_{self.n}"
        self.admin(f"CREATE DATABASE {name} TEMPLATE kp_template")
        return self.dsn(name)

    def server(self, cmd):
        """Stops ("stop") or starts again ("start") the server, keeping its data (tests of
        what happens while the database is down use a private Cluster for this)."""
        args = [os.path.join(REPO, "scripts/pgcluster"), cmd, self.dir]
        if cmd == "start":
            args.append(str(self.port))
        subprocess.run(args, check=True, capture_output=True)

    def stop(self):
        subprocess.run([os.path.join(REPO, "scripts/pgcluster"), "stop", self.dir])
        shutil.rmtree(self.dir, ignore_errors=True)


class System:
    """busd + dicomd + indexer(s) on a fresh database and storage directory; with gateway=True
    also pacs-gateway (HTTPS on self.https_port, its redirect on self.http_port, 127.0.0.1)."""

    def __init__(self, cluster, indexers=1, extra_env=None, start=True, gateway=False,
                 compressors=0, routers=0, db_user=APP_ROLE):
        self.dir = tempfile.mkdtemp(prefix="kp-sys-")
        self.dsn = cluster.new_database()
        self.port = free_port()
        run = os.path.join(self.dir, "run")
        os.makedirs(run)
        self.env = dict(os.environ)
        self.env.update({
            # the daemons and pacsctl connect as the services' role, like `make run` (pacsctl
            # migrate granted it everything but changing audit records); self.sql() and the
            # template's migration use the owner. db_user=None: the owner everywhere.
            "KP_DB_CONNINFO": f"{self.dsn} user={db_user}" if db_user else self.dsn,
            "KP_DB_CONNECT_TIMEOUT": "20",
            "KP_STORAGE_ROOT": os.path.join(self.dir, "storage"),
            "KP_DICOM_PORT": str(self.port),
            "KP_BUS_JOBS_ENDPOINT": f"ipc://{run}/jobs",
            "KP_BUS_EVENTS_IN": f"ipc://{run}/ev-in",
            "KP_BUS_EVENTS_OUT": f"ipc://{run}/ev-out",
            "KP_BUS_HEARTBEAT_MS": "500",
            "KP_JOBS_LEASE": "3",
            "KP_JOBS_SWEEP_INTERVAL": "1",
            # stores are refused below this much free space (test_degradation checks it); keep
            # it small so a test machine with little free disk still runs the suite
            "KP_STORAGE_MIN_FREE_MB": "16",
            "KP_LOG_LEVEL": "info",
            "TCP_NODELAY": "1",
        })
        self.gateway = gateway
        if gateway:
            self.https_port = free_port()
            self.http_port = free_port()
            self.env.update({
                "KP_HTTP_BIND": "127.0.0.1",
                "KP_HTTP_HTTPS_PORT": str(self.https_port),
                "KP_HTTP_HTTP_PORT": str(self.http_port),
                "KP_HTTP_THREADS": "2",
                "KP_HTTP_DB_POOL": "2",
                # the viewer make fetched (the gateway runs in a temporary directory)
                "KP_HTTP_OHIF_DIR": os.path.join(REPO, "build", "ohif", "dist"),
                "KP_HTTP_WWW_DIR": os.path.join(REPO, "gateway", "www"),
                "KP_AUTH_COMMON_PASSWORDS": os.path.join(REPO, "config", "common-passwords.txt"),
                # cheap hashes keep the tests fast (test_auth checks the defaults separately)
                "KP_AUTH_ARGON2_M_KIB": "4096",
                "KP_AUTH_ARGON2_T": "1",
                "KP_AUTH_ACCESS_TTL": "3600",
                # tests log in often from one address (test_ratelimit checks the real limits)
                "KP_HTTP_RATE_LOGIN_PER_MIN": "100000",
                "KP_HTTP_RATE_API_PER_SEC": "100000",
            })
        self.token = None  # the test administrator's access token (login_admin)
        self.env.update(extra_env or {})
        self.procs = {}
        self.logs = {}
        self.n_indexers = indexers
        self.n_compressors = compressors  # pacs-compressor processes (compress.* in extra_env)
        self.n_routers = routers  # pacs-router processes (router.* in extra_env)
        if start:
            try:
                self.start_all()
            except BaseException:
                self.stop()
                raise

    # -- processes -------------------------------------------------------------------------
    def start(self, name, binary=None):
        binary = binary or name.split("#")[0]
        log = open(os.path.join(self.dir, f"{name.replace('#', '-')}.log"), "ab")
        self.logs[name] = log.name
        p = subprocess.Popen([os.path.join(BIN, binary)], env=self.env, cwd=self.dir,
                             stdout=log, stderr=subprocess.STDOUT)
        self.procs[name] = p
        return p

    def start_all(self):
        self.start("pacs-busd")
        for i in range(self.n_indexers):
            self.start(f"pacs-indexer#{i}", "pacs-indexer")
        self.start("pacs-auditor#0", "pacs-auditor")
        self.start("pacs-reporter#0", "pacs-reporter")
        for i in range(self.n_compressors):
            self.start(f"pacs-compressor#{i}", "pacs-compressor")
        for i in range(self.n_routers):
            self.start(f"pacs-router#{i}", "pacs-router")
        self.start_dicomd()
        if self.gateway:
            self.start_gateway()

    ADMIN, ADMIN_PASSWORD = "kpadmin", "Kl1nika-test-admin-pw"

    def start_gateway(self):
        self.start("pacs-gateway")
        wait_for(lambda: self.https_ok(), 30, "pacs-gateway to answer HTTPS")
        if self.token is None and self.env.get("KP_HTTP_DEV_ALLOW_ALL") != "true":
            self.login_admin()

    def add_user(self, name, password, *roles, sites=(), temporary=False):
        env = dict(self.env, KP_TEST_PW=password)
        args = ["user", "add", name, "--password-env", "KP_TEST_PW"]
        for r in roles:
            args += ["--role", r]
        for s in sites:
            args += ["--site", s]
        if temporary:
            args.append("--temporary")
        r = subprocess.run([os.path.join(BIN, "pacsctl"), *args], env=env, cwd=self.dir,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr

    def login(self, user, password, **extra):
        """POST /api/auth/login; returns (status, json)."""
        import json
        body = dict(username=user, password=password, **extra)
        st, h, b = self.https("POST", "/api/auth/login", {"Content-Type": "application/json"},
                              json.dumps(body), auth=False)
        return st, json.loads(b or b"{}")

    def login_admin(self):
        """Creates the test administrator (once per database) and keeps its access token, which
        https() then sends with every request unless told otherwise (auth=False)."""
        if not self.sql("SELECT 1 FROM users WHERE username = %s", (self.ADMIN,)):
            self.add_user(self.ADMIN, self.ADMIN_PASSWORD, "admin")
        st, j = self.login(self.ADMIN, self.ADMIN_PASSWORD)
        assert st == 200, j
        self.token = j["access_token"]

    def https_ok(self):
        try:
            return self.https("GET", "/dicom-web/studies?limit=1")[0] in (200, 401)
        except OSError:
            return False

    def https(self, method, path, headers=None, body=None, timeout=30, port=None, tls=True,
              auth=True):
        """One request on a fresh connection; returns (status, headers, raw body bytes).
        The certificate is self-signed, so it is not verified; bodies are not decompressed.
        The test administrator's bearer token is added unless auth=False or the headers carry
        an Authorization or Cookie header already."""
        headers = dict(headers or {})
        if (auth and self.token and "Authorization" not in headers
                and "Cookie" not in headers):
            headers["Authorization"] = "Bearer " + self.token
        if tls:
            conn = http.client.HTTPSConnection("127.0.0.1", port or self.https_port,
                                               timeout=timeout,
                                               context=ssl._create_unverified_context())
        else:
            conn = http.client.HTTPConnection("127.0.0.1", port or self.http_port,
                                              timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers)
            r = conn.getresponse()
            return r.status, r.headers, r.read()
        finally:
            conn.close()

    def start_dicomd(self):
        self.start("pacs-dicomd")
        wait_for(lambda: self.echo(), 20, "pacs-dicomd to answer C-ECHO")

    def kill(self, name, sig=signal.SIGKILL):
        p = self.procs.get(name)
        if p and p.poll() is None:
            p.send_signal(sig)
            p.wait(timeout=20)

    def alive(self, name):
        p = self.procs.get(name)
        return p is not None and p.poll() is None

    def log(self, name):
        with open(self.logs[name], errors="replace") as f:
            return f.read()

    def stop(self):
        """Stops every process (SIGTERM, so sanitizer builds report leaks at exit) and fails
        when a log shows a sanitizer report or a crash."""
        for name in list(self.procs):
            self.kill(name, signal.SIGTERM)
        problems = []
        for name, path in self.logs.items():
            with open(path, errors="replace") as f:
                text = f.read()
            for marker in ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:",
                           "Segmentation fault", "terminate called"):
                if marker in text:
                    i = text.index(marker)
                    problems.append(f"{name}: {text[max(0, i - 200):i + 3000]}")
        if problems:
            keep = self.dir + ".failed"
            shutil.move(self.dir, keep)
            raise AssertionError("process problems (logs kept in %s):\n%s" % (keep, "\n".join(problems)))
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- DICOM clients --------------------------------------------------------------------
    def echo(self, aet="TESTSCU", aec="KLINIKA"):
        r = subprocess.run(["echoscu", "-aet", aet, "-aec", aec, "127.0.0.1", str(self.port)],
                           capture_output=True, text=True, timeout=30, env=self.env)
        return r.returncode == 0

    def storescu(self, files, aet="MODALITY", aec="KLINIKA", extra=(), timeout=600):
        """Sends files on one association; returns (returncode, {file: 'ok'|status}, output).

        Pass extra=["-R"] to propose exactly each file's SOP class and transfer syntax (how a
        modality sends compressed images as they are)."""
        cmd = ["storescu", "-v", "-nh", "-aet", aet, "-aec", aec, *extra, "127.0.0.1",
               str(self.port), *files]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=self.env)
        return r.returncode, parse_storescu(r.stdout + r.stderr), r.stdout + r.stderr

    def send_each(self, files):
        """Sends each file on its own association in its own SOP class and transfer syntax (as
        a modality would) and fails unless every one is acknowledged; waits until indexed."""
        for f in files:
            rc, res, out = self.storescu([f], extra=storescu_flags(f))
            assert res.get(f) == "ok", (f, out[-2000:])
        self.wait_jobs_settled()  # the outbox row is committed before each success

    def storescu_async(self, files, aet="MODALITY", extra=()):
        listfile = tempfile.NamedTemporaryFile("w", delete=False, dir=self.dir, suffix=".out")
        cmd = ["storescu", "-v", "-nh", "-aet", aet, "-aec", "KLINIKA", *extra, "127.0.0.1",
               str(self.port), *files]
        p = subprocess.Popen(cmd, stdout=listfile, stderr=subprocess.STDOUT, env=self.env)
        return p, listfile.name

    # -- database -------------------------------------------------------------------------
    def sql(self, q, args=None):
        c = psycopg2.connect(self.dsn)
        try:
            cur = c.cursor()
            cur.execute(q, args)
            rows = cur.fetchall() if cur.description else None
            c.commit()
            return rows
        finally:
            c.close()

    def count(self, table):
        return self.sql(f"SELECT count(*) FROM {table}")[0][0]

    def wait_indexed(self, n, timeout=120):
        return wait_for(lambda: self.count("instances") >= n, timeout,
                        f"{n} instances indexed (have {self.count('instances')})", 0.2)

    def wait_jobs_settled(self, timeout=120):
        return wait_for(lambda: self.sql("SELECT count(*) FROM jobs WHERE state='pending'")[0][0]
                        == 0, timeout, "every job done", 0.2)

    def pacsctl(self, *args, check=True):
        r = subprocess.run([os.path.join(BIN, "pacsctl"), *args], env=self.env, cwd=self.dir,
                           capture_output=True, text=True, timeout=600)
        if check and r.returncode != 0:
            raise AssertionError(f"pacsctl {' '.join(args)} failed: {r.stderr}")
        return r


_TS_FLAGS = {
    "1.2.840.10008.1.2.4.50": "-xy", "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.70": "-xs", "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu", "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw", "1.2.840.10008.1.2.5": "-xr",
    "1.2.840.10008.1.2.1.99": "-xd", "1.2.840.10008.1.2.4.100": "-xm",
    "1.2.840.10008.1.2.4.101": "-xh", "1.2.840.10008.1.2.4.102": "-xn",
}


def storescu_flags(path):
    """storescu options that propose exactly the file's own SOP class and transfer syntax, as a
    modality sending its images unchanged would (-R: only the needed SOP classes)."""
    try:
        import pydicom
        ts = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    except Exception:
        ts = ""
    flag = _TS_FLAGS.get(ts)
    return ["-R"] + ([flag] if flag else [])


_SEND = re.compile(r"Sending file: (.*)$")
_RSP = re.compile(r"Received Store Response(?: \((.*)\))?")
_STATUS = re.compile(r"DIMSE Status\s*:\s*0x([0-9A-Fa-f]{4})")


def parse_storescu(output):
    """Maps each file storescu tried to send to 'ok' or the failure it saw.

    With -v, storescu prints 'Sending file: F' before each C-STORE and 'Received Store Response
    (Success)' or '(<status text>)' after it; a file with no response line was not acknowledged."""
    result = {}
    current = None
    for line in output.splitlines():
        m = _SEND.search(line)
        if m:
            current = m.group(1).strip()
            result[current] = "unacknowledged"
            continue
        m = _RSP.search(line)
        if m and current:
            status = (m.group(1) or "").strip()
            result[current] = "ok" if status.startswith("Success") else (status or "failed")
            current = None
    return result


codecs.register_error("kp_latin1", lambda e: (e.object[e.start:e.end].decode("latin-1"), e.end))


def dcmdump_values(path, tags):
    """Values dcmdump shows for the given top-level tags, as UTF-8 (converted with +U8).

    When dcmdump cannot convert (a character set iconv lacks, e.g. ISO 2022 IR 87), the raw
    values are read the way the archive keeps them: valid UTF-8 as is, any other byte as
    ISO 8859-1."""
    r = subprocess.run(["dcmdump", "+U8", "-q", "+L", path], capture_output=True, timeout=60)
    if r.returncode != 0:
        raw = subprocess.run(["dcmdump", "-q", "+L", path], capture_output=True, timeout=60)
        if raw.returncode == 0:
            r = raw
    out = r.stdout.decode("utf-8", errors="kp_latin1")
    vals = {}
    for line in out.splitlines():
        if not line.startswith("("):
            continue  # nested items are indented
        m = re.match(r"\(([0-9a-f]{4}),([0-9a-f]{4})\) (\w\w) (.*?)\s+#\s+\d+,", line)
        if not m:
            continue
        tag = (m.group(1) + m.group(2)).upper()
        if tag not in tags:
            continue
        v = m.group(4)
        if v.startswith("[") and v.endswith("]"):
            v = v[1:-1]
        elif v.startswith("(no value"):
            v = ""
        vals[tag] = v.rstrip()
    return r.returncode, vals
