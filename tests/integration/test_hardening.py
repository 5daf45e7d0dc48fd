"""Gateway hardening: a strict Content-Security-Policy on our own pages and the API, and a
real QR code at MFA enrolment."""
import json

import pytest

import kp

PW = "Hardening-Test-Pass-5"


@pytest.fixture(scope="module")
def gw(cluster):
    s = kp.System(cluster, gateway=True)
    try:
        s.add_user("drwho", PW, "doctor", sites=["default"])
        yield s
    finally:
        s.stop()


def test_mfa_enrolment_qr_code_reads_back_as_the_uri(gw, tmp_path):
    """The QR code offered at enrolment is a real one: rendered and decoded by zbar it gives
    the otpauth:// URI, which holds the same secret."""
    import subprocess
    st, j = gw.login("drwho", PW)
    h = {"Authorization": "Bearer " + j["access_token"]}
    st, _, b = gw.https("POST", "/api/auth/mfa/setup", h)
    assert st == 200, b
    setup = json.loads(b)
    assert setup["qr_svg"].startswith("<svg")
    svg, png = tmp_path / "qr.svg", tmp_path / "qr.png"
    svg.write_text(setup["qr_svg"])
    subprocess.run(["rsvg-convert", "-o", str(png), str(svg)], check=True, timeout=60)
    r = subprocess.run(["zbarimg", "-q", "--raw", str(png)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == setup["otpauth_uri"]
    assert "secret=" + setup["secret"] in setup["otpauth_uri"]


def test_strict_content_security_policy_on_our_pages(gw):
    st, h, _ = gw.https("GET", "/app/login", auth=False)
    assert st == 200
    csp = h["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp
    assert "frame-ancestors 'none'" in csp and "'unsafe-eval'" not in csp
    assert h["X-Frame-Options"] == "DENY"
    st, h, _ = gw.https("GET", "/api/auth/me")
    assert "frame-ancestors 'none'" in h["Content-Security-Policy"]
    # DICOMweb and the viewer keep the policy OHIF can run under
    st, h, _ = gw.https("GET", "/dicom-web/studies")
    from test_ui_ohif import assert_viewer_csp
    assert_viewer_csp(h["Content-Security-Policy"])
