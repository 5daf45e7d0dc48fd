"""compose/ (docker-compose.yml, Dockerfile, make-secrets, entrypoint) and the systemd units,
tested as far as a machine without a container engine allows:
- the compose file parses, and docker-compose (Debian's client) validates it;
- every service runs a program the Makefile builds, every health check names a real check, and
  every KP_* setting it sets exists in lib/kp_config.def;
- the Dockerfile's runtime stage installs the package of every library our binaries link, and
  its build stage every -dev library scripts/install-deps lists;
- the systemd units pass `systemd-analyze verify` and start programs we build;
- the same topology runs here as processes: the compose services' own commands and settings
  (through compose/entrypoint, with the secrets make-secrets generates), hosts and ports mapped
  to loopback, the bus over TCP with CurveZMQ, two indexers: every health check passes, a
  stored instance is indexed, and /readyz is ready."""
import glob
import os
import re
import shutil
import subprocess
import tempfile

import pytest
import yaml

import kp

COMPOSE = os.path.join(kp.REPO, "compose")
OURS = "klinika-pacs"


def compose():
    with open(os.path.join(COMPOSE, "docker-compose.yml")) as f:
        return yaml.safe_load(f)


def ours(doc):
    """The services that run our image (not postgres)."""
    return {n: s for n, s in doc["services"].items() if "postgres" not in str(s.get("image"))}


def programs():
    text = open(os.path.join(kp.REPO, "Makefile")).read()
    block = re.search(r"^PROGRAMS\s*:=(.*?)(?<!\\)\n", text, re.S | re.M).group(1)
    return set(re.findall(r"([a-z][a-z-]*):[a-z/]+", block))


def settings():
    text = open(os.path.join(kp.REPO, "lib", "kp_config.def")).read()
    return {f"KP_{a}_{b}".upper() for a, b in re.findall(r"^KP_CONF\((\w+),\s*(\w+),", text, re.M)}


def env_of(doc, name):
    s = doc["services"][name]
    return dict(s.get("environment") or {})


# -- the files -----------------------------------------------------------------------------------
def test_compose_file_is_valid():
    doc = compose()
    want = {"postgres", "migrate", "busd", "dicomd", "gateway", "indexer", "auditor",
            "compressor", "reporter", "router"}
    assert want <= set(doc["services"]), set(doc["services"])
    assert doc["networks"]["backend"]["internal"] is True
    assert {"pgdata", "storage", "logs"} <= set(doc["volumes"])
    assert {"db_password", "db_app_password", "jwt_key", "tls_cert", "tls_key",
            "bus_server_key"} <= set(doc["secrets"])
    for name, s in doc["services"].items():
        if name != "migrate":
            assert s.get("restart") == "unless-stopped", name
            assert "healthcheck" in s, name
            assert s["deploy"]["resources"]["limits"]["memory"], name
        # only the front doors are published, and only they are on the frontend network
        if name in ("dicomd", "gateway"):
            assert "frontend" in s["networks"] and s.get("ports"), name
        else:
            assert "ports" not in s and s["networks"] == ["backend"], name
    # scalable workers: no fixed container name
    for w in ("indexer", "auditor", "compressor", "reporter", "router"):
        assert "container_name" not in doc["services"][w]
    if not shutil.which("docker-compose"):
        pytest.skip("docker-compose (Debian's client) is not installed")
    with tempfile.TemporaryDirectory() as tmp:
        envf = os.path.join(tmp, ".env")
        with open(envf, "w") as f:
            f.write("KLINIKA_BUS_PUBLIC_KEY='abc'\n")
        r = subprocess.run(["docker-compose", "--env-file", envf, "config", "-q"], cwd=COMPOSE,
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        # without the bus key (make-secrets not run) compose says what to do
        with open(envf, "w") as f:
            f.write("")
        r = subprocess.run(["docker-compose", "--env-file", envf, "config", "-q"], cwd=COMPOSE,
                           capture_output=True, text=True)
        assert r.returncode != 0 and "make-secrets" in r.stderr


def test_services_run_our_programs_with_real_settings():
    doc = compose()
    progs, keys = programs(), settings()
    common = doc["x-klinika-env"]
    for k in common:
        assert not k.startswith("KP_") or k in keys, k
    for name, s in ours(doc).items():
        cmd = s["command"]
        if cmd[0] == "bash":  # migrate: a shell line of pacsctl commands
            for part in cmd[2].split("&&"):
                assert part.split()[0] in progs, part
        else:
            assert cmd[0] in progs, (name, cmd)
        for k in env_of(doc, name):
            assert not k.startswith("KP_") or k in keys, (name, k)
        hc = (s.get("healthcheck") or {}).get("test", [])
        if "pacsctl" in hc:
            args = hc[hc.index("pacsctl") + 1:]
            assert args[0] == "health" and args[1] in ("db", "bus", "dicom", "worker"), (name, hc)
            if args[1] == "worker":
                assert args[2] == name  # the worker kind is the service name
        for e in hc:
            if isinstance(e, str) and re.match(r"KP_\w+=", e):
                assert e.split("=")[0] in keys, (name, e)


def test_dockerfile_has_every_library():
    text = open(os.path.join(COMPOSE, "Dockerfile")).read()
    build, runtime = text.split("FROM debian:12 AS runtime")
    # build stage: the -dev libraries of scripts/install-deps
    deps = open(os.path.join(kp.REPO, "scripts", "install-deps")).read()
    devs = set(re.findall(r"\b(lib[a-z0-9.+-]*-dev)\b", deps)) - {"libcmocka-dev", "libclang-rt-14-dev"}
    missing = {d for d in devs if not re.search(rf"\s{re.escape(d)}\s", build)}
    assert not missing, f"compose/Dockerfile's build stage lacks {missing}"
    # runtime stage: the package of each library a binary links directly
    base = {"libc6", "libgcc-s1", "libstdc++6", "zlib1g"}
    paths = {}
    for b in glob.glob(os.path.join(kp.BIN, "*")):
        out = subprocess.run(["ldd", b], capture_output=True, text=True).stdout
        needed = subprocess.run(["objdump", "-p", b], capture_output=True, text=True).stdout
        for lib in re.findall(r"NEEDED\s+(\S+)", needed):
            m = re.search(rf"{re.escape(lib)} => (\S+)", out)
            if m and "san" not in lib:
                paths[os.path.realpath(m.group(1))] = lib
    # one dpkg call (each costs a second): "package: /path" per line
    r = subprocess.run(["dpkg", "-S"] + sorted(paths), capture_output=True, text=True)
    owned = {}
    for line in r.stdout.splitlines():
        pkg, _, path = line.partition(": ")
        owned[path.strip()] = pkg.split(":")[0]
    for path, lib in paths.items():
        if path not in owned:  # a merged-/usr path: ask for the /lib form
            alt = subprocess.run(["dpkg", "-S", "/lib/x86_64-linux-gnu/" + os.path.basename(path)],
                                 capture_output=True, text=True)
            assert alt.returncode == 0, f"{lib} ({path}) belongs to no package"
            owned[path] = alt.stdout.split(":")[0]
    pkgs = {owned[p] for p in paths}
    missing = {p for p in pkgs - base if not re.search(rf"\s{re.escape(p)}\s", runtime)}
    assert not missing, f"compose/Dockerfile's runtime stage lacks {missing}"
    assert "USER klinika" in runtime


def test_systemd_units():
    units = glob.glob(os.path.join(COMPOSE, "systemd", "*.service"))
    progs = programs()
    assert len(units) >= 8
    with tempfile.TemporaryDirectory() as tmp:
        bindir = os.path.join(tmp, "bin")
        os.makedirs(bindir)
        for p in progs:
            os.symlink(os.path.join(kp.BIN, p), os.path.join(bindir, p))
        paths = []
        for u in units + glob.glob(os.path.join(COMPOSE, "systemd", "*.target")):
            text = open(u).read()
            for exe in re.findall(r"^ExecStart=(\S+)", text, re.M):
                assert os.path.basename(exe) in progs, (u, exe)
            name = os.path.basename(u).replace("@.service", "@1.service")
            dst = os.path.join(tmp, name)
            with open(dst, "w") as f:
                f.write(text.replace("/usr/local/bin/", bindir + "/"))
            paths.append(dst)
        if not shutil.which("systemd-analyze"):
            pytest.skip("systemd-analyze is not installed")
        r = subprocess.run(["systemd-analyze", "verify", "--man=no"] + paths,
                           capture_output=True, text=True, cwd=tmp)
        # units the target wants that are not files here are fine; nothing else may be said
        noise = [l for l in r.stderr.splitlines() if l.strip() and "not found" not in l
                 and "Failed to create" not in l]
        assert not noise, r.stderr


# -- the topology, as processes ------------------------------------------------------------------
class Topology:
    """Runs the compose services' commands with their settings mapped onto this machine."""

    def __init__(self, cluster, tmp):
        self.doc = compose()
        self.tmp = tmp
        self.dsn = cluster.new_database()
        self.secrets_dir = os.path.join(tmp, "secrets")
        envf = os.path.join(tmp, ".env")
        subprocess.run([os.path.join(COMPOSE, "make-secrets"), "--dir", self.secrets_dir,
                        "--env", envf, "--hostname", "localhost"], check=True,
                       capture_output=True, env=dict(os.environ, PACSCTL=os.path.join(kp.BIN, "pacsctl")))
        self.dotenv = {}
        for line in open(envf):
            k, _, v = line.strip().partition("=")
            self.dotenv[k] = v.strip("'")
        self.secret_files = {n: os.path.join(self.secrets_dir, os.path.basename(s["file"]))
                             for n, s in self.doc["secrets"].items()}
        self.ports = {"5555": kp.free_port(), "5556": kp.free_port(), "5557": kp.free_port(),
                      "11112": kp.free_port(), "8443": kp.free_port(), "8080": kp.free_port()}
        for d in ("storage", "logs"):
            os.makedirs(os.path.join(tmp, d))
        self.procs = []
        # what the image's ENV lines set, pointed at the repository
        self.image_env = {
            "KP_STORAGE_ROOT": os.path.join(tmp, "storage"),
            "KP_HTTP_OHIF_DIR": os.path.join(kp.REPO, "build", "ohif", "dist"),
            "KP_HTTP_WWW_DIR": os.path.join(kp.REPO, "gateway", "www"),
            "KP_AUTH_COMMON_PASSWORDS": os.path.join(kp.REPO, "config", "common-passwords.txt"),
        }
        dockerfile = open(os.path.join(COMPOSE, "Dockerfile")).read()
        for k in self.image_env:
            assert k in dockerfile, k

    def map(self, v):
        v = str(v)
        v = re.sub(r"\$\{(\w+)(?::[-?]([^}]*))?\}",
                   lambda m: self.dotenv.get(m.group(1), m.group(2) or ""), v)
        v = re.sub(r"host=postgres port=5432 dbname=klinika user=klinika[^\"]*", self.dsn, v)
        v = re.sub(r"tcp://(?:busd|\*|127\.0\.0\.1):(555[567])",
                   lambda m: f"tcp://127.0.0.1:{self.ports[m.group(1)]}", v)
        v = re.sub(r"127\.0\.0\.1:(8443|8080)", lambda m: f"127.0.0.1:{self.ports[m.group(1)]}", v)
        for name, path in self.secret_files.items():
            v = v.replace(f"/run/secrets/{name}", path)
        v = v.replace("/var/lib/klinika/storage", os.path.join(self.tmp, "storage"))
        v = v.replace("/var/log/klinika", os.path.join(self.tmp, "logs"))
        v = v.replace("/usr/share/klinika/schema", os.path.join(kp.REPO, "schema"))
        return v

    def env(self, name):
        e = {k: v for k, v in os.environ.items() if not k.startswith("KP_")}
        e["PATH"] = kp.BIN + ":" + e["PATH"]
        e.update(self.image_env)
        for k, v in env_of(self.doc, name).items():
            e[k] = self.map(v)
        if e.get("KP_HTTP_BIND") == "0.0.0.0":
            e["KP_HTTP_BIND"] = "127.0.0.1"  # tests listen on loopback only
        for k in ("KP_DICOM_PORT", "KP_HTTP_HTTPS_PORT", "KP_HTTP_HTTP_PORT"):
            if k in e:
                e[k] = str(self.ports[{"KP_DICOM_PORT": "11112", "KP_HTTP_HTTPS_PORT": "8443",
                                      "KP_HTTP_HTTP_PORT": "8080"}[k]])
        # keep the test quick: cheap password hashes, a fast heartbeat
        e.update({"KP_AUTH_ARGON2_M_KIB": "4096", "KP_AUTH_ARGON2_T": "1",
                  "KP_BUS_HEARTBEAT_MS": "500", "KP_HTTP_THREADS": "2"})
        return e

    def command(self, name):
        return [os.path.join(COMPOSE, "entrypoint")] + [self.map(a) for a in
                                                         self.doc["services"][name]["command"]]

    def run(self, name):
        return subprocess.run(self.command(name), env=self.env(name), cwd=self.tmp,
                              capture_output=True, text=True, timeout=120)

    def start(self, name):
        log = open(os.path.join(self.tmp, f"{name}-{len(self.procs)}.out"), "wb")
        p = subprocess.Popen(self.command(name), env=self.env(name), cwd=self.tmp, stdout=log,
                             stderr=subprocess.STDOUT)
        self.procs.append((name, p))
        return p

    def healthy(self, name):
        test = self.doc["services"][name]["healthcheck"]["test"]
        assert test[0] == "CMD"
        r = subprocess.run([self.map(a) for a in test[1:]], env=self.env(name), cwd=self.tmp,
                           capture_output=True, text=True, timeout=30)
        return r.returncode == 0

    def stop(self):
        for _, p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for _, p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def test_topology_runs_as_processes(cluster):
    tmp = tempfile.mkdtemp(prefix="kp-compose-")
    t = Topology(cluster, tmp)
    try:
        r = t.run("migrate")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "admin" in r.stdout + r.stderr  # the first administrator's one-time password
        t.start("busd")
        kp.wait_for(lambda: t.healthy("busd"), 30, "busd healthy")
        services = [n for n in ours(t.doc) if n not in ("migrate", "busd")]
        for n in services:
            t.start(n)
        t.start("indexer")  # --scale indexer=2
        for n in services:
            kp.wait_for(lambda: t.healthy(n), 60, f"{n} healthy")
        for name, p in t.procs:
            assert p.poll() is None, f"{name} exited"
        # two indexers on the CURVE bus
        st = subprocess.run([os.path.join(kp.BIN, "pacsctl"), "stats"], env=t.env("indexer"),
                            capture_output=True, text=True, cwd=tmp).stdout
        assert st.count(":indexer") == 2, st
        # a modality stores into dicomd; an indexer indexes it
        ct = os.path.join(kp.PYDICOM_DATA, "test_files", "CT_small.dcm")
        r = subprocess.run(["storescu", "-aec", "KLINIKA", "127.0.0.1", str(t.ports["11112"]), ct],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr

        def indexed():
            import psycopg2
            c = psycopg2.connect(t.dsn)
            try:
                cur = c.cursor()
                cur.execute("SELECT count(*) FROM instances")
                return cur.fetchone()[0] == 1
            finally:
                c.close()
        kp.wait_for(indexed, 60, "the instance indexed")
        # logs reach the logs volume through the entrypoint
        logs = glob.glob(os.path.join(tmp, "logs", "*.log"))
        assert logs and os.path.getsize(logs[0]) > 0
    finally:
        t.stop()
        shutil.rmtree(tmp, ignore_errors=True)
