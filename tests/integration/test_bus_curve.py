"""The bus between hosts: tcp:// endpoints with CurveZMQ. The whole pipeline works encrypted,
and a peer without the broker's public key (or without encryption) cannot talk to it."""
import os
import re
import stat
import subprocess

import kp


def keygen(path):
    r = subprocess.run([os.path.join(kp.BIN, "pacsctl"), "bus", "keygen", path],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return re.search(r"public key: (\S{40})", r.stdout).group(1)


def test_keygen(tmp_path):
    path = str(tmp_path / "k")
    pub = keygen(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    text = open(path).read()
    assert f"public = {pub}" in text and "secret = " in text
    r = subprocess.run([os.path.join(kp.BIN, "pacsctl"), "bus", "keygen", path],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0  # never overwrites a key


def test_pipeline_over_curve_tcp(cluster, tmp_path):
    server_key = str(tmp_path / "busd.key")
    pub = keygen(server_key)
    ports = [kp.free_port() for _ in range(3)]
    env = {
        "KP_BUS_CURVE": "true",
        "KP_BUS_CURVE_SERVER_PUBLIC": pub,
        "KP_BUS_CURVE_SERVER_SECRET_FILE": server_key,
        "KP_BUS_JOBS_ENDPOINT": f"tcp://127.0.0.1:{ports[0]}",
        "KP_BUS_EVENTS_IN": f"tcp://127.0.0.1:{ports[1]}",
        "KP_BUS_EVENTS_OUT": f"tcp://127.0.0.1:{ports[2]}",
    }
    s = kp.System(cluster, extra_env=env)
    try:
        assert "CurveZMQ on" in s.log("pacs-busd")
        f = os.path.join(kp.PYDICOM_DATA, "test_files", "CT_small.dcm")
        rc, res, out = s.storescu([f])
        assert res[f] == "ok", out
        s.wait_indexed(1, 30)
        s.wait_jobs_settled(30)
        st = s.pacsctl("stats").stdout
        assert "indexer" in st and "not reachable" not in st
        # the same broker, asked by a peer that trusts another key, or speaks in clear: no answer
        other = keygen(str(tmp_path / "other.key"))
        for bad in ({"KP_BUS_CURVE_SERVER_PUBLIC": other}, {"KP_BUS_CURVE": "false"}):
            r = subprocess.run([os.path.join(kp.BIN, "pacsctl"), "stats"], capture_output=True,
                               text=True, timeout=60, env=dict(s.env, **bad))
            assert "broker: not reachable" in r.stdout, r.stdout
        assert s.alive("pacs-busd")
    finally:
        s.stop()


def test_curve_misconfiguration_is_refused(tmp_path):
    env = dict(os.environ, KP_BUS_CURVE="true", KP_BUS_JOBS_ENDPOINT="tcp://127.0.0.1:1",
               KP_DB_CONNINFO="host=/nonexistent dbname=x", KP_DB_CONNECT_TIMEOUT="1")
    r = subprocess.run([os.path.join(kp.BIN, "pacs-busd")], capture_output=True, text=True,
                       timeout=30, env=env)
    assert r.returncode != 0 and "curve_server_secret_file" in r.stderr
    r = subprocess.run([os.path.join(kp.BIN, "pacsctl"), "stats"], capture_output=True,
                       text=True, timeout=30, env=dict(env, KP_BUS_CURVE_SERVER_PUBLIC="short"))
    assert "curve_server_public" in r.stderr
