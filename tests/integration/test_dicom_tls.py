"""DICOM TLS: pacs-dicomd's TLS listener (dicom.tls_port), C-MOVE to a destination registered
with TLS, and `pacsctl ae echo` over TLS, with DCMTK's own TLS tools on loopback.

A test CA signs the daemon's certificate (server and client use: it is presented to TLS clients
and to TLS move destinations), a client certificate for the SCUs and one for a storescp
destination; a second, untrusted CA signs another client certificate, which must be refused.
The plain listener keeps working next to the TLS one."""
import os
import re
import shutil
import subprocess
import tempfile

import pydicom
import pytest

import datasets
import kp

ROOT = "1.2.826.0.1.3680043.10.1411.66"
STUDIES = {
    "T1": dict(name="TLS^PATIENT", pid="TLS-001", date="20220202", time="101010", acc="TLSA-1",
               desc="over TLS", ref="", birth="19600101", sex="F",
               series=[("CT", 1, "Axial", [1, 2, 3])]),
}
_DATA = datasets.Studies(ROOT, STUDIES)


def _openssl(*args, cwd):
    r = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, (args, r.stderr)


def _make_ca(d, name):
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "2",
             "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.crt",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)


def _make_cert(d, name, ca, usage):
    ext = os.path.join(d, f"{name}.ext")
    with open(ext, "w") as f:
        f.write("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
                f"extendedKeyUsage={usage}\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-sha256", "-subj", f"/CN={name}",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-days", "2", "-sha256", "-extfile", ext, "-out", f"{name}.crt",
             cwd=d)


@pytest.fixture(scope="module")
def pki():
    d = tempfile.mkdtemp(prefix="kp-pki-")
    _make_ca(d, "ca")
    _make_cert(d, "dicomd", "ca", "serverAuth,clientAuth")
    _make_cert(d, "client", "ca", "clientAuth")
    _make_cert(d, "dest", "ca", "serverAuth")
    _make_ca(d, "evilca")
    _make_cert(d, "evil", "evilca", "clientAuth")
    _make_cert(d, "evildest", "evilca", "serverAuth")
    yield lambda name: os.path.join(d, name)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def tls(cluster, pki):
    tls_port = kp.free_port()
    s = kp.System(cluster, extra_env={
        "KP_DICOM_TLS_PORT": str(tls_port),
        "KP_DICOM_TLS_CERT": pki("dicomd.crt"),
        "KP_DICOM_TLS_KEY": pki("dicomd.key"),
        "KP_DICOM_TLS_CA": pki("ca.crt"),
    })
    s.tls_port = tls_port
    try:
        with tempfile.TemporaryDirectory() as d:
            files = _DATA.write(d)
            rc, res, out = s.storescu(files)
            assert all(res.get(f) == "ok" for f in files), out[-3000:]
        s.wait_indexed(3)
        s.pacsctl("ae", "add", "TLSSCU", "--host", "127.0.0.1", "--port", "104")
        yield s
    finally:
        s.stop()


def _tls_opts(pki, who="client", ca="ca.crt"):
    return ["+tls", pki(f"{who}.key"), pki(f"{who}.crt"), "+cf", pki(ca)]


def _run(cmd, env, timeout=60):
    r = subprocess.run(cmd, capture_output=True, timeout=timeout, env=env)
    return r.returncode, (r.stdout + r.stderr).decode("utf-8", "replace")


def test_echo_find_store_over_tls(tls, pki):
    rc, out = _run(["echoscu", "-aet", "TLSSCU", "-aec", "KLINIKA", *_tls_opts(pki),
                    "127.0.0.1", str(tls.tls_port)], tls.env)
    assert rc == 0, out
    uid = _DATA.study_uid("T1")
    rc, out = _run(["findscu", "-v", "-aet", "TLSSCU", "-aec", "KLINIKA", "-S", *_tls_opts(pki),
                    "-k", "QueryRetrieveLevel=IMAGE", "-k", f"StudyInstanceUID={uid}",
                    "-k", f"SeriesInstanceUID={_DATA.series_uid('T1', 0)}", "-k", "SOPInstanceUID",
                    "127.0.0.1", str(tls.tls_port)], tls.env)
    assert rc == 0 and "Final Find Response (Success)" in out, out[-3000:]
    got = set(re.findall(r"\(0008,0018\) UI \[([0-9.]+)\]", out))
    assert got == {_DATA.sop_uid("T1", 0, n) for n in (1, 2, 3)}
    # a new instance stored over TLS is acknowledged and indexed like any other
    with tempfile.TemporaryDirectory() as d:
        ds = pydicom.dcmread(_DATA.write(d)[0])
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = ROOT + ".9.9.9"
        path = os.path.join(d, "new.dcm")
        ds.save_as(path, write_like_original=True)
        rc, out = _run(["storescu", "-v", "-aet", "TLSSCU", "-aec", "KLINIKA", *_tls_opts(pki),
                        "127.0.0.1", str(tls.tls_port), path], tls.env)
        assert kp.parse_storescu(out).get(path) == "ok", out[-3000:]
    tls.wait_indexed(4)
    assert tls.sql("SELECT count(*) FROM instances WHERE sop_uid = %s", (ROOT + ".9.9.9",))[0][0] == 1
    assert "over TLS" in tls.log("pacs-dicomd")
    # the audit trail says which associations came over TLS
    kp.wait_for(lambda: tls.sql("SELECT count(*) FROM audit_log WHERE action = 'dicom.association' "
                                "AND actor = 'TLSSCU' AND detail->>'tls' = 'true'")[0][0] >= 3,
                60, "TLS associations in the audit trail")
    kp.wait_for(lambda: tls.sql("SELECT count(*) FROM audit_log WHERE action = 'dicom.association' "
                                "AND detail->>'tls' = 'false'")[0][0] >= 1,
                60, "plain associations in the audit trail")


def test_untrusted_client_certificate_refused(tls, pki):
    for cmd in (["echoscu"], ["findscu", "-S", "-k", "QueryRetrieveLevel=STUDY",
                              "-k", "StudyInstanceUID"]):
        rc, out = _run([cmd[0], "-aet", "TLSSCU", "-aec", "KLINIKA", *cmd[1:],
                        *_tls_opts(pki, "evil", "ca.crt"), "127.0.0.1", str(tls.tls_port)],
                       tls.env)
        assert rc != 0, out
        assert "Pending" not in out
    with tempfile.TemporaryDirectory() as d:
        path = _DATA.write(d)[0]
        rc, out = _run(["storescu", "-v", "-aet", "TLSSCU", "-aec", "KLINIKA",
                        *_tls_opts(pki, "evil", "ca.crt"), "127.0.0.1", str(tls.tls_port), path],
                       tls.env)
        assert rc != 0 and kp.parse_storescu(out).get(path) != "ok", out
    # a client that speaks plain DICOM to the TLS port gets nowhere either
    rc, out = _run(["echoscu", "-aet", "TLSSCU", "-aec", "KLINIKA", "127.0.0.1",
                    str(tls.tls_port)], tls.env)
    assert rc != 0, out
    # the daemon carries on: TLS with the trusted certificate and plain DICOM both work
    rc, out = _run(["echoscu", "-aet", "TLSSCU", "-aec", "KLINIKA", *_tls_opts(pki),
                    "127.0.0.1", str(tls.tls_port)], tls.env)
    assert rc == 0, out
    assert tls.echo() and tls.alive("pacs-dicomd")
    assert "TLS" in tls.log("pacs-dicomd")


def test_plain_listener_still_serves(tls):
    rc, out = _run(["findscu", "-v", "-aet", "TLSSCU", "-aec", "KLINIKA", "-S",
                    "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={_DATA.study_uid('T1')}",
                    "127.0.0.1", str(tls.port)], tls.env)
    assert rc == 0 and "Final Find Response (Success)" in out, out[-2000:]
    assert len(re.findall(r"Find Response: \d+ \(Pending\)", out)) == 1


class _TlsDest:
    """storescp over TLS (its certificate `cert` from the test CA unless told otherwise; it
    requires ours, signed by the test CA)."""

    def __init__(self, env, pki, aet, cert="dest"):
        self.dir = tempfile.mkdtemp(prefix="kp-tlsdest-")
        self.port = kp.free_port()
        self.log = open(os.path.join(self.dir, "storescp.log"), "wb")
        self.p = subprocess.Popen(["storescp", "-aet", aet, "-od", self.dir, "+B",
                                   "+tls", pki(f"{cert}.key"), pki(f"{cert}.crt"), "+cf", pki("ca.crt"),
                                   str(self.port)], env=env, stdout=self.log,
                                  stderr=subprocess.STDOUT)
        kp.wait_for(lambda: _run(["echoscu", "-aec", aet, "+tls", pki("client.key"),
                                  pki("client.crt"), "-ic", "127.0.0.1",
                                  str(self.port)], env, 20)[0] == 0, 20, f"TLS storescp {aet}")

    def files(self):
        got = {}
        for f in os.listdir(self.dir):
            if f.endswith(".log"):
                continue
            p = os.path.join(self.dir, f)
            got[str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)] = p
        return got

    def stop(self):
        self.p.terminate()
        self.p.wait(timeout=20)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def _movescu(system, dest, keys):
    cmd = ["movescu", "-d", "-aet", "TLSSCU", "-aec", "KLINIKA", "-aem", dest, "-S"]
    for k in keys:
        cmd += ["-k", k]
    rc, out = _run(cmd + ["127.0.0.1", str(system.port)], system.env, 120)
    st = re.findall(r"DIMSE Status\s*:\s*0x([0-9a-fA-F]{4})", out)
    return (int(st[-1], 16) if st else None), out


def test_move_to_tls_destination_and_ae_echo(tls, pki):
    dest = _TlsDest(tls.env, pki, "TLSDEST")
    try:
        tls.pacsctl("ae", "add", "TLSDEST", "--host", "127.0.0.1", "--port", str(dest.port),
                    "--tls")
        uid = _DATA.study_uid("T1")
        st, out = _movescu(tls, "TLSDEST", ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={uid}"])
        assert st == 0, out[-3000:]
        root = tls.env["KP_STORAGE_ROOT"]
        expect = {u: os.path.join(root, p) for u, p in tls.sql(
            "SELECT i.sop_uid, i.path FROM instances i JOIN series se ON se.pk = i.series_pk "
            "JOIN studies st ON st.pk = se.study_pk WHERE st.study_uid = %s", (uid,))}
        got = dest.files()
        assert set(got) == set(expect)
        for u, p in expect.items():
            assert pydicom.dcmread(got[u]).PixelData == pydicom.dcmread(p).PixelData

        # pacsctl ae echo goes over TLS for an AE registered with --tls
        r = tls.pacsctl("ae", "echo", "TLSDEST")
        assert "(TLS): success" in r.stdout, r.stdout
        tls.pacsctl("ae", "add", "KLINIKA", "--host", "127.0.0.1", "--port",
                    str(tls.tls_port), "--tls")
        assert "(TLS): success" in tls.pacsctl("ae", "echo", "KLINIKA").stdout
        # the same peer without the TLS flag: plain DICOM to a TLS port fails cleanly
        tls.pacsctl("ae", "add", "KLINIKA", "--host", "127.0.0.1", "--port", str(tls.tls_port))
        r = tls.pacsctl("ae", "echo", "KLINIKA", check=False)
        assert r.returncode != 0 and "failed" in r.stdout

        # TLS flagged, but the peer speaks plain DICOM: the move fails with a reason, no hang
        plain = kp.free_port()
        p = subprocess.Popen(["storescp", "-aet", "PLAINDEST", "-od", dest.dir, str(plain)],
                             env=tls.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            kp.wait_for(lambda: _run(["echoscu", "-aec", "PLAINDEST", "127.0.0.1", str(plain)],
                                     tls.env, 20)[0] == 0, 20, "plain storescp")
            tls.pacsctl("ae", "add", "PLAINDEST", "--host", "127.0.0.1", "--port", str(plain),
                        "--tls")
            st, out = _movescu(tls, "PLAINDEST", ["QueryRetrieveLevel=STUDY",
                                                 f"StudyInstanceUID={uid}"])
            assert st is not None and st != 0, out[-3000:]
        finally:
            p.terminate()
            p.wait(timeout=20)
        # a destination whose certificate our CA did not sign: refused, every sub-operation fails
        evil = _TlsDest(tls.env, pki, "EVILDEST", cert="evildest")
        try:
            tls.pacsctl("ae", "add", "EVILDEST", "--host", "127.0.0.1", "--port",
                        str(evil.port), "--tls")
            st, out = _movescu(tls, "EVILDEST", ["QueryRetrieveLevel=STUDY",
                                                f"StudyInstanceUID={uid}"])
            assert st == 0xA702, out[-3000:]
            assert evil.files() == {}
            r = tls.pacsctl("ae", "echo", "EVILDEST", check=False)
            assert r.returncode != 0 and "failed" in r.stdout
        finally:
            evil.stop()
        assert tls.alive("pacs-dicomd")
    finally:
        dest.stop()


def test_tls_misconfiguration_fails_clearly(cluster, pki):
    """A TLS port without a readable certificate stops the daemon at start with a clear
    message (never a listener that cannot handshake)."""
    s = kp.System(cluster, start=False, extra_env={
        "KP_DICOM_TLS_PORT": str(kp.free_port()),
        "KP_DICOM_TLS_CERT": pki("missing.crt"),
        "KP_DICOM_TLS_KEY": pki("dicomd.key"),
        "KP_DICOM_TLS_CA": pki("ca.crt"),
    })
    try:
        p = s.start("pacs-dicomd")
        p.wait(timeout=30)
        assert p.returncode != 0
        assert "missing.crt" in s.log("pacs-dicomd")
        # a key that does not belong to the certificate
        s.env["KP_DICOM_TLS_CERT"] = pki("dicomd.crt")
        s.env["KP_DICOM_TLS_KEY"] = pki("client.key")
        p = s.start("pacs-dicomd")
        p.wait(timeout=30)
        assert p.returncode != 0 and "does not match" in s.log("pacs-dicomd")
    finally:
        s.stop()


def test_peer_stalling_in_the_tls_handshake_blocks_nobody(cluster, pki):
    """A TLS peer that sends its ClientHello and then never answers the server's reply stalls in
    the middle of the handshake. dicomd runs handshakes itself, non-blocking, so meanwhile C-ECHO
    over TLS and over plain DICOM complete at once (before dicom.acse_timeout, 12 s here, which
    is how long the staller could otherwise hold the accept loop, and well before
    dicom.dimse_timeout, 60 s, which bounded a blocking handshake); the staller is closed after
    acse_timeout."""
    import socket
    import ssl
    import time
    tls_port = kp.free_port()
    s = kp.System(cluster, extra_env={
        "KP_DICOM_TLS_PORT": str(tls_port), "KP_DICOM_TLS_CERT": pki("dicomd.crt"),
        "KP_DICOM_TLS_KEY": pki("dicomd.key"), "KP_DICOM_TLS_CA": pki("ca.crt"),
        "KP_DICOM_ACSE_TIMEOUT": "12", "KP_DICOM_DIMSE_TIMEOUT": "60"})
    stallers = []
    try:
        s.pacsctl("ae", "add", "TLSSCU", "--host", "127.0.0.1", "--port", "104")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.load_cert_chain(pki("client.crt"), pki("client.key"))
        for _ in range(2):
            incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            obj = ctx.wrap_bio(incoming, outgoing, server_side=False)
            with pytest.raises(ssl.SSLWantReadError):
                obj.do_handshake()
            sock = socket.create_connection(("127.0.0.1", tls_port), timeout=30)
            sock.sendall(outgoing.read())  # the ClientHello; the server's answer is never read
            stallers.append(sock)
        time.sleep(0.5)  # the server has answered and now waits for the client's next flight
        t0 = time.monotonic()
        rc, out = _run(["echoscu", "-aet", "TLSSCU", "-aec", "KLINIKA", *_tls_opts(pki),
                        "127.0.0.1", str(tls_port)], s.env, timeout=90)
        assert rc == 0, out
        assert s.echo(aet="PLAINWHILESTALLED")
        assert time.monotonic() - t0 < 10, "served only after a stalled handshake timed out"
        # the stallers are dropped at acse_timeout, with a clear line each
        kp.wait_for(lambda: s.log("pacs-dicomd").count("no complete TLS handshake within 12 s")
                    >= 2, 40, "the stalled handshakes to be closed")
        for sock in stallers:
            sock.settimeout(5)
            try:
                while sock.recv(65536):  # the server's flight, then end of stream
                    pass
            except ConnectionResetError:
                pass
        rc, out = _run(["echoscu", "-aet", "TLSSCU", "-aec", "KLINIKA", *_tls_opts(pki),
                        "127.0.0.1", str(tls_port)], s.env)
        assert rc == 0, out
    finally:
        for sock in stallers:
            sock.close()
        s.stop()
