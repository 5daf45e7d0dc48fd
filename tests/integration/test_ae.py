"""The modality registry: pacsctl ae add/list/remove/echo, with validation and a real C-ECHO."""
import socket

import kp


def test_registry_and_echo(cluster):
    s = kp.System(cluster, start=False)
    try:
        s.start("pacs-busd")
        s.start_dicomd()
        assert "no modality registered" in s.pacsctl("ae", "list").stdout
        r = s.pacsctl("ae", "add", "KLINIKA", "--host", "127.0.0.1", "--port", str(s.port),
                      "--description", "our own dicomd", "--site", "main")
        assert "added KLINIKA" in r.stdout
        r = s.pacsctl("ae", "add", "CT_SCANNER_2", "--host", "ct2.example", "--port", "104",
                      "--no-find", "--no-retrieve", "--tls")
        out = s.pacsctl("ae", "list").stdout
        assert "KLINIKA" in out and "our own dicomd" in out
        line = next(l for l in out.splitlines() if l.startswith("CT_SCANNER_2"))
        assert "store" in line and "find" not in line and "retrieve" not in line and " yes " in line
        # updating keeps one row
        assert "updated KLINIKA" in s.pacsctl("ae", "add", "KLINIKA", "--host", "127.0.0.1", "--port",
                                           str(s.port)).stdout
        assert s.sql("SELECT count(*) FROM modalities")[0][0] == 2

        # a real C-ECHO from KLINIKA to the registered peer (here our own daemon)
        r = s.pacsctl("ae", "echo", "KLINIKA")
        assert "success" in r.stdout
        # a registered peer that is not listening: a clear failure, no hang
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            dead = sock.getsockname()[1]
        s.pacsctl("ae", "add", "DEAD", "--host", "127.0.0.1", "--port", str(dead))
        r = s.pacsctl("ae", "echo", "DEAD", check=False)
        assert r.returncode != 0 and "failed" in r.stdout
        # the peer rejects our association (wrong called AE for our daemon)
        s.pacsctl("ae", "add", "NOTKLINIKA", "--host", "127.0.0.1", "--port", str(s.port))
        r = s.pacsctl("ae", "echo", "NOTKLINIKA", check=False)
        assert r.returncode != 0 and "rejected" in r.stdout
        r = s.pacsctl("ae", "echo", "UNKNOWN", check=False)
        assert r.returncode != 0 and "not registered" in r.stderr

        assert "removed DEAD" in s.pacsctl("ae", "remove", "DEAD").stdout
        r = s.pacsctl("ae", "remove", "DEAD", check=False)
        assert r.returncode != 0
    finally:
        s.stop()


def test_invalid_entries_are_refused(cluster):
    s = kp.System(cluster, start=False)
    try:
        bad = [
            ["ae", "add", "THIS_AE_TITLE_IS_TOO_LONG", "--host", "h", "--port", "104"],
            ["ae", "add", "BACK\\SLASH", "--host", "h", "--port", "104"],
            ["ae", "add", " LEADING", "--host", "h", "--port", "104"],
            ["ae", "add", "OK", "--host", "h", "--port", "0"],
            ["ae", "add", "OK", "--host", "h", "--port", "70000"],
            ["ae", "add", "OK", "--host", "h", "--port", "10x"],
            ["ae", "add", "OK", "--port", "104"],
            ["ae", "add", "OK", "--host", "h", "--port", "104", "--bogus"],
        ]
        for args in bad:
            r = s.pacsctl(*args, check=False)
            assert r.returncode == 2, (args, r.stdout, r.stderr)
            assert r.stderr.strip(), args
        assert s.sql("SELECT count(*) FROM modalities")[0][0] == 0
    finally:
        s.stop()
