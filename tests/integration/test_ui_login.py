"""The sign-in page with the second factor, in a real browser (Debian's chromium through
playwright-core): the viewer sends the browser to /app/login, the password and then the TOTP code
lead back to the OHIF study list, the session cookie authorises OHIF's DICOMweb requests
(frames included), and after logout the same request gets 401."""
import base64
import hashlib
import hmac
import json
import os
import shutil
import struct
import subprocess
import tempfile
import time

import pydicom
import pytest

import kp
from test_ui_ohif import CHROMIUM, PLAYWRIGHT, _missing

CT = os.path.join(kp.PYDICOM_DATA, "test_files", "CT_small.dcm")
PW = "Browser-Login-Pass-3"


def totp(secret, t):
    key = base64.b32decode(secret + "=" * (-len(secret) % 8))
    h = hmac.new(key, struct.pack(">Q", int(t) // 30), hashlib.sha1).digest()
    o = h[-1] & 15
    return "%06d" % ((struct.unpack(">I", h[o:o + 4])[0] & 0x7FFFFFFF) % 1000000)


@pytest.fixture(scope="module")
def gw(cluster):
    why = _missing()
    if why:
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    s = kp.System(cluster, gateway=True)
    try:
        s.send_each([CT])
        yield s
    finally:
        s.stop()


def test_login_with_mfa_in_the_browser_then_logout(gw, tmp_path):
    gw.add_user("drmfa", PW, "doctor", sites=["default"])
    st, j = gw.login("drmfa", PW)
    h = {"Authorization": "Bearer " + j["access_token"], "Content-Type": "application/json"}
    st, _, b = gw.https("POST", "/api/auth/mfa/setup", h)
    secret = json.loads(b)["secret"]
    if time.time() % 30 > 25:
        time.sleep(6)
    st, _, b = gw.https("POST", "/api/auth/mfa/confirm", h,
                        json.dumps({"code": totp(secret, time.time())}))
    assert st == 200, b
    time.sleep(31 - time.time() % 30)  # the browser's code must be of a later step (no replay)
    ds = pydicom.dcmread(CT)
    spec = {"base": f"https://127.0.0.1:{gw.https_port}", "playwright": PLAYWRIGHT,
            "chromium": CHROMIUM, "userDataDir": tempfile.mkdtemp(prefix="kp-chromium-"),
            "user": "drmfa", "password": PW, "secret": secret,
            "family": str(ds.PatientName).split("^")[0],
            "frameUrl": (f"/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
                         f"/instances/{ds.SOPInstanceUID}/frames/1")}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    try:
        r = subprocess.run(["node", os.path.join(os.path.dirname(__file__), "auth_ui.js"),
                            str(path)], capture_output=True, text=True, timeout=300)
    finally:
        shutil.rmtree(spec["userDataDir"], ignore_errors=True)
    assert r.stdout.strip(), r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert not out.get("error"), out
    assert out["redirected"] and out["mfaAsked"] and out["listed"], out
    assert out["frameBefore"] == 200 and out["logout"] == 204 and out["frameAfter"] == 401, out
