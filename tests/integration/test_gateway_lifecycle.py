"""pacs-gateway start-up and shutdown: TLS set-up (generated certificate, TLS 1.2+, ALPN h2), the
guard against a second server on the same port, and a graceful SIGTERM."""
import concurrent.futures
import os
import signal
import socket
import ssl
import stat
import subprocess
import time

import pytest

import kp


@pytest.fixture(scope="module")
def gws(cluster):
    s = kp.System(cluster, gateway=True)
    yield s
    s.stop()


def handshake(port, **ctx_opts):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    for k, v in ctx_opts.items():
        if k == "alpn":
            ctx.set_alpn_protocols(v)
        else:
            setattr(ctx, k, v)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw) as t:
            return t.version(), t.selected_alpn_protocol(), t.getpeercert(binary_form=True)


def test_generated_certificate_and_tls(gws):
    key = os.path.join(gws.dir, "var/tls/server.key")
    crt = os.path.join(gws.dir, "var/tls/server.crt")
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert os.path.getsize(crt) > 100
    version, alpn, der = handshake(gws.https_port, alpn=["h2", "http/1.1"])
    assert version in ("TLSv1.2", "TLSv1.3") and alpn == "h2" and der
    version, alpn, _ = handshake(gws.https_port, maximum_version=ssl.TLSVersion.TLSv1_2)
    assert version == "TLSv1.2"
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        handshake(gws.https_port, minimum_version=ssl.TLSVersion.TLSv1,
                  maximum_version=ssl.TLSVersion.TLSv1_1)
    r = subprocess.run(["openssl", "x509", "-in", crt, "-noout", "-text"], capture_output=True,
                       text=True)
    assert "DNS:localhost" in r.stdout and "IP Address:127.0.0.1" in r.stdout


def test_second_gateway_on_the_same_port_is_refused(gws):
    r = subprocess.run([os.path.join(kp.BIN, "pacs-gateway")], env=gws.env, cwd=gws.dir,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    assert "another pacs-gateway" in r.stderr
    assert gws.https("GET", "/dicom-web/studies")[0] == 200


def test_missing_key_is_an_error(gws, tmp_path):
    crt = os.path.join(gws.dir, "var/tls/server.crt")
    env = dict(gws.env, KP_HTTP_TLS_CERT=crt, KP_HTTP_TLS_KEY=str(tmp_path / "nope.key"),
               KP_HTTP_HTTPS_PORT=str(kp.free_port()), KP_HTTP_HTTP_PORT="0")
    r = subprocess.run([os.path.join(kp.BIN, "pacs-gateway")], env=env, cwd=gws.dir,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "nope.key" in r.stderr
    assert not (tmp_path / "nope.key").exists()


def test_sigterm_is_graceful(gws):
    def hit(i):
        try:
            return gws.https("GET", "/dicom-web/studies?includefield=all&limit=1000")[0]
        except OSError:
            return "refused"

    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        futs = [ex.submit(hit, i) for i in range(16)]
        time.sleep(0.05)
        t0 = time.time()
        gws.procs["pacs-gateway"].send_signal(signal.SIGTERM)
        rc = gws.procs["pacs-gateway"].wait(timeout=20)
        took = time.time() - t0
        results = [f.result() for f in futs]
    assert rc == 0
    assert took < 12
    assert all(r in (200, "refused") for r in results), results
    log = gws.log("pacs-gateway")
    assert "exiting (status 0)" in log
    # the port is free again: a new gateway starts
    gws.start_gateway()
    assert gws.https("GET", "/dicom-web/studies")[0] == 200
