"""Scaling out over the bus (issue 6): workers announce their counters in heartbeats and
`pacsctl workers` lists them; a worker that stops answering has its jobs dispatched to another
one; only the clients whose CurveZMQ keys the broker lists may connect; a 3,000-instance load
is indexed exactly once by one indexer and again by three, two of them on a second "host" (a
network namespace with its own hostname, talking to busd over TCP with CURVE); while no worker
runs, dicomd and STOW-RS keep accepting and the backlog waits in PostgreSQL, the broker holding
no more than bus.max_jobs of it."""
import glob
import json
import os
import random
import re
import signal
import subprocess
import time

import pytest

import kp
from test_bus_curve import keygen
from test_load_faults import check_exactly_once

CT = os.path.join(kp.PYDICOM_DATA, "test_files", "CT_small.dcm")


def small_set(name, n, studies=6):
    d = os.path.join(kp.BUILD, "testdata", name)
    subprocess.run(["/usr/bin/python3", os.path.join(kp.REPO, "tests/data/gen_ct.py"), d,
                    "--instances", str(n), "--studies", str(studies), "--series-per-study", "2",
                    "--size", "64"], check=True, timeout=600)
    files = sorted(glob.glob(os.path.join(d, "ct_*.dcm")))
    assert len(files) == n
    return files


def workers(s, env=None, check=True):
    r = subprocess.run([os.path.join(kp.BIN, "pacsctl"), "workers", "--json"],
                       capture_output=True, text=True, timeout=60, env=env or s.env)
    if check:
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)
    return r


def test_workers_listed_with_their_counters(cluster):
    s = kp.System(cluster, indexers=2)
    try:
        files = small_set("scale40", 40, studies=2)
        rc, res, out = s.storescu(files)
        assert all(v == "ok" for v in res.values()), out
        s.wait_indexed(40, 60)
        s.wait_jobs_settled(60)
        pids = {s.procs[f"pacs-indexer#{i}"].pid for i in range(2)}

        def counted():  # heartbeats carry the counters: wait for one after the last job
            ws = [w for w in workers(s) if w.get("kind") == "indexer"]
            return ws if sum(w["done"] for w in ws) >= 40 else None
        ws = kp.wait_for(counted, 30, "indexer heartbeats counting 40 jobs")
        assert {w["pid"] for w in ws} == pids
        for w in ws:
            assert w["host"] == os.uname().nodename and w["failed"] == 0
            assert w["last_seen_ms"] < 5000 and w["started"] > time.time() - 600
        kinds = {w.get("kind") for w in workers(s)}
        assert {"indexer", "auditor", "reporter"} <= kinds
        text = s.pacsctl("workers").stdout
        assert re.search(r"^indexer: 2 live, (\d+) job\(s\) done$", text, re.M), text
        assert "last heartbeat" in text
        only = s.pacsctl("workers", "--kind", "auditor").stdout
        assert "auditor: 1 live" in only and "indexer" not in only
    finally:
        s.stop()


def test_silent_worker_jobs_go_to_another(cluster):
    """An indexer frozen while holding jobs (SIGSTOP: no heartbeat, no DONE) is declared lost
    after heartbeat_liveness x heartbeat_ms and its jobs go to the other indexer; when it wakes
    up it finishes what it held (idempotent) and comes back with a new connection: every
    instance is indexed exactly once."""
    s = kp.System(cluster, indexers=2, extra_env={"KP_BUS_HEARTBEAT_MS": "500",
                                                  "KP_BUS_HEARTBEAT_LIVENESS": "8"})
    try:
        kp.wait_for(lambda: len([w for w in workers(s) if w.get("kind") == "indexer"]) == 2,
                    30, "two indexers ready")
        frozen = s.procs["pacs-indexer#0"]
        frozen.send_signal(signal.SIGSTOP)
        files = small_set("scale60", 60, studies=2)
        procs = [s.storescu_async(files)]

        def holding():
            for w in workers(s):
                if w.get("pid") == frozen.pid and w["inflight"] > 0:
                    return w
        held = kp.wait_for(holding, 20, "the frozen indexer to be handed jobs", 0.05)
        for p, _ in procs:
            p.wait(timeout=120)
        s.wait_indexed(60 - held["inflight"], 60)
        # the broker gives up on it and re-dispatches its jobs
        kp.wait_for(lambda: frozen.pid not in {w.get("pid") for w in workers(s)}, 30,
                    "the frozen indexer to be declared lost")
        s.wait_indexed(60, 60)
        log = open(s.logs["pacs-busd"]).read()
        assert re.search(rf":{frozen.pid}:indexer lost \(no heartbeat\); [1-9]\d* job\(s\) "
                         r"queued again", log), log[-3000:]
        frozen.send_signal(signal.SIGCONT)
        kp.wait_for(lambda: frozen.pid in {w.get("pid") for w in workers(s)}, 30,
                    "the woken indexer to reconnect")
        s.wait_jobs_settled(60)
        assert s.count("instances") == 60
        check_exactly_once(s, files)
    finally:
        try:
            s.procs["pacs-indexer#0"].send_signal(signal.SIGCONT)
        except Exception:
            pass
        s.stop()


def curve_env(tmp_path, jobs_host="127.0.0.1"):
    server_key = str(tmp_path / "busd.key")
    pub = keygen(server_key)
    client_key = str(tmp_path / "site-a.key")
    client_pub = keygen(client_key)
    clients = tmp_path / "clients"
    clients.write_text(f"# bus clients\npublic = {client_pub}   # site A\n")
    ports = [kp.free_port() for _ in range(3)]
    return {
        "KP_BUS_CURVE": "true",
        "KP_BUS_CURVE_SERVER_PUBLIC": pub,
        "KP_BUS_CURVE_SERVER_SECRET_FILE": server_key,
        "KP_BUS_CURVE_KEYS_FILE": client_key,
        "KP_BUS_CURVE_CLIENTS_FILE": str(clients),
        "KP_BUS_JOBS_ENDPOINT": f"tcp://{jobs_host}:{ports[0]}",
        "KP_BUS_EVENTS_IN": f"tcp://{jobs_host}:{ports[1]}",
        "KP_BUS_EVENTS_OUT": f"tcp://{jobs_host}:{ports[2]}",
    }


def test_unknown_curve_key_is_refused(cluster, tmp_path):
    env = curve_env(tmp_path)
    s = kp.System(cluster, indexers=0, extra_env=env)
    try:
        assert "CurveZMQ clients restricted to the 1 key(s)" in s.log("pacs-busd")
        rogue_key = str(tmp_path / "rogue.key")
        rogue_pub = keygen(rogue_key)
        # a worker with a key the broker does not list: refused, never handed a job
        s.env["KP_BUS_CURVE_KEYS_FILE"] = rogue_key
        rogue = s.start("pacs-indexer#rogue", "pacs-indexer")
        s.env["KP_BUS_CURVE_KEYS_FILE"] = env["KP_BUS_CURVE_KEYS_FILE"]
        rc, res, out = s.storescu([CT])
        assert res[CT] == "ok", out
        kp.wait_for(lambda: rogue_pub in s.log("pacs-busd"), 30, "the refusal in busd's log")
        assert "public key not in the client list" in s.log("pacs-busd")
        time.sleep(2)
        assert s.count("instances") == 0 and rogue.poll() is None
        assert not [w for w in workers(s) if w.get("kind") == "indexer"]
        # pacsctl with that key, or with a fresh random one, cannot reach the broker either
        for k in (rogue_key, ""):
            r = workers(s, env=dict(s.env, KP_BUS_CURVE_KEYS_FILE=k), check=False)
            assert r.returncode == 1 and "not reachable" in r.stderr
        # the listed key works: its indexer does the job
        s.start("pacs-indexer#0", "pacs-indexer")
        s.wait_indexed(1, 30)
        # revoking needs no restart: remove the key, SIGHUP, new connections are refused
        open(env["KP_BUS_CURVE_CLIENTS_FILE"], "w").write(f"public = {rogue_pub}\n")
        s.procs["pacs-busd"].send_signal(signal.SIGHUP)
        kp.wait_for(lambda: "client list reloaded: 1 key(s)" in s.log("pacs-busd"), 10, "reload")
        r = workers(s, check=False)
        assert r.returncode == 1, r.stdout
    finally:
        s.stop()


# ---- a second host: a network namespace with its own hostname --------------------------------

class Netns:
    """A network namespace joined to this one by a veth pair on a private /30."""

    def __init__(self):
        tag = "%04x" % random.randrange(1 << 16)
        self.name = f"kp-{tag}"
        self.host_if, self.ns_if = f"kpa{tag}", f"kpb{tag}"
        net = random.randrange(1, 250)
        self.host_ip, self.ns_ip = f"10.213.{net}.1", f"10.213.{net}.2"
        cmds = [
            ["ip", "netns", "add", self.name],
            ["ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if],
            ["ip", "link", "set", self.ns_if, "netns", self.name],
            ["ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_if],
            ["ip", "link", "set", self.host_if, "up"],
            ["ip", "netns", "exec", self.name, "ip", "addr", "add", f"{self.ns_ip}/30", "dev",
             self.ns_if],
            ["ip", "netns", "exec", self.name, "ip", "link", "set", self.ns_if, "up"],
            ["ip", "netns", "exec", self.name, "ip", "link", "set", "lo", "up"],
        ]
        for c in cmds:
            r = subprocess.run(c, capture_output=True, text=True, timeout=30)
            if r.returncode != 0:
                self.close()
                raise OSError(f"{' '.join(c)}: {r.stderr.strip()}")

    def argv(self, hostname, *cmd):
        return ["ip", "netns", "exec", self.name, "unshare", "--uts", "sh", "-c",
                'hostname "$0" && exec "$@"', hostname, *cmd]

    def close(self):
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True, timeout=30)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=30)


@pytest.fixture
def netns():
    try:
        ns = Netns()
    except (OSError, FileNotFoundError) as e:
        why = f"cannot make a network namespace (needs root and iproute2): {e}"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    yield ns
    ns.close()


N = 3000
MAX_JOBS = 1000


def drain(s, n, what):
    t0 = time.monotonic()
    s.wait_indexed(n, 600)
    s.wait_jobs_settled(300)
    dt = time.monotonic() - t0
    print(f"\n{what}: {n} instances indexed in {dt:.1f} s ({n / dt:.0f}/s)")
    return dt


def test_scale_out_to_a_second_host(cluster, tmp_path, netns):
    files = small_set("scale3000", N, studies=10)
    env = curve_env(tmp_path, jobs_host=netns.host_ip)
    node_key = str(tmp_path / "site-b.key")
    node_pub = keygen(node_key)
    with open(env["KP_BUS_CURVE_CLIENTS_FILE"], "a") as f:
        f.write(f"public = {node_pub}   # site B\n")
    env["KP_BUS_MAX_JOBS"] = str(MAX_JOBS)
    s = kp.System(cluster, indexers=0, extra_env=env, gateway=True)
    try:
        # 1. back-pressure: no indexer runs; everything is still accepted, the backlog is in
        # PostgreSQL and the broker holds at most bus.max_jobs of it
        procs = [s.storescu_async(files[i::2]) for i in range(2)]
        for p, out in procs:
            assert p.wait(timeout=600) == 0, open(out).read()[-2000:]
        # STOW-RS too: the gateway accepts while the indexers are away
        with open(os.path.join(kp.PYDICOM_DATA, "test_files", "MR_small.dcm"), "rb") as f:
            mr = f.read()
        body = (b"--KpScaleB\r\nContent-Type: application/dicom\r\n\r\n" + mr +
                b"\r\n--KpScaleB--\r\n")
        st_, _, b = s.https("POST", "/dicom-web/studies", {
            "Authorization": "Bearer " + s.token, "Accept": "application/dicom+json",
            "Content-Type": 'multipart/related; type="application/dicom"; boundary=KpScaleB'},
            body)
        assert st_ == 200, b
        pending = s.sql("SELECT count(*) FROM jobs WHERE type = 'index' AND state = 'pending'")
        assert pending[0][0] == N + 1
        assert s.count("instances") == 0
        assert all(w.get("kind") != "indexer" for w in workers(s))
        queued = s.pacsctl("stats").stdout
        m = re.search(r"^\s+index\s+(\d+)\s+(\d+)", queued, re.M)
        assert m and int(m.group(1)) + int(m.group(2)) <= MAX_JOBS, queued
        assert "new jobs wait in the outbox" in s.log("pacs-busd")

        # 2. one indexer drains the backlog: every instance exactly once
        s.start("pacs-indexer#0", "pacs-indexer")
        one = drain(s, N + 1, "1 indexer")
        check_exactly_once(s, files)
        assert s.sql("SELECT sum(num_instances) FROM studies")[0][0] == s.count("instances")
        total = s.count("instances")
        assert total == N + 1

        # 3. the same backlog again, for three indexers: this one and two on "site B"
        s.kill("pacs-indexer#0", signal.SIGTERM)
        s.procs["pacs-indexer#0"].wait(timeout=30)
        s.sql("TRUNCATE instances, series, studies, patients RESTART IDENTITY CASCADE")
        s.sql("UPDATE jobs SET state = 'pending', attempts = 0, lease_until = now() "
              "WHERE type = 'index'")
        node_env = dict(s.env, KP_BUS_CURVE_KEYS_FILE=node_key)
        for i in range(2):
            log = open(os.path.join(s.dir, f"site-b-indexer-{i}.log"), "ab")
            s.logs[f"site-b#{i}"] = log.name
            s.procs[f"site-b#{i}"] = subprocess.Popen(
                netns.argv("kp-site-b", os.path.join(kp.BIN, "pacs-indexer")), env=node_env,
                cwd=s.dir, stdout=log, stderr=subprocess.STDOUT)
        kp.wait_for(lambda: len([w for w in workers(s) if w.get("host") == "kp-site-b"]) == 2,
                    30, "two indexers of site B ready")
        s.start("pacs-indexer#0", "pacs-indexer")
        three = drain(s, total, "3 indexers (2 over TCP + CURVE from another namespace)")
        check_exactly_once(s, files)
        assert s.sql("SELECT sum(num_instances) FROM studies")[0][0] == total

        def site_b_done():
            ws = [w for w in workers(s) if w.get("host") == "kp-site-b"]
            return sum(w["done"] for w in ws) if all(w["done"] > 0 for w in ws) else None
        done_b = kp.wait_for(site_b_done, 30, "site B's indexers to report jobs done")
        print(f"site B indexed {done_b} of {total}; 1 indexer {one:.1f} s, 3 indexers "
              f"{three:.1f} s")
        # a site B worker with a key the broker does not list gets nothing
        rogue_key = str(tmp_path / "rogue.key")
        keygen(rogue_key)
        r = subprocess.run(netns.argv("kp-site-c", os.path.join(kp.BIN, "pacsctl"), "workers"),
                           env=dict(node_env, KP_BUS_CURVE_KEYS_FILE=rogue_key),
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and "not reachable" in r.stderr
    finally:
        s.stop()
