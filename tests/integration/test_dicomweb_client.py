"""A second, independent client: the npm package dicomweb-client (dcmjs project) under node
searches (studies, series, instances) and retrieves (series metadata, a frame, an instance)
through the gateway, then stores two instances with it (STOW-RS: its body starts with CRLF
before the first delimiter and ends without one after the close delimiter)."""
import json
import os
import subprocess
import tempfile

import pydicom
import pytest

import datasets
import kp

STOWED = datasets.Studies("1.2.826.0.1.3680043.10.1411.94", {
    "S1": dict(name="Client^Stow", pid="CS1", birth="19900101", sex="O", date="20240401",
               time="090000", acc="CS-1", desc="stored by dicomweb-client", ref="",
               series=[("MR", 1, "a", [1, 2])]),
})

NPM_DIR = os.path.join(kp.BUILD, "npm-dicomweb-client")
PACKAGES = ["dicomweb-client@0.11.3", "xhr2@0.2.1"]


@pytest.fixture(scope="module")
def client_dir():
    if not os.path.isdir(os.path.join(NPM_DIR, "node_modules", "dicomweb-client")):
        os.makedirs(NPM_DIR, exist_ok=True)
        subprocess.run(["npm", "install", "--prefix", NPM_DIR, "--no-audit", "--no-fund",
                        "--no-save", *PACKAGES], check=True, capture_output=True, timeout=300)
    return NPM_DIR


def test_dicomweb_client_search_and_retrieve(cluster, client_dir):
    s = kp.System(cluster, gateway=True)
    try:
        f = os.path.join(kp.PYDICOM_DATA, "test_files", "CT_small.dcm")
        rc, res, out = s.storescu([f])
        assert res[f] == "ok", out
        s.wait_jobs_settled()
        ds = pydicom.dcmread(f)
        env = dict(os.environ, NODE_PATH=os.path.join(client_dir, "node_modules"),
                   NODE_TLS_REJECT_UNAUTHORIZED="0",  # the gateway's self-signed certificate
                   KP_TOKEN=s.token)
        stow_dir = tempfile.mkdtemp(dir=s.dir)
        stow_files = STOWED.write(stow_dir)
        r = subprocess.run(["node", os.path.join(os.path.dirname(__file__), "dicomweb_client.js"),
                            f"https://127.0.0.1:{s.https_port}", ds.StudyInstanceUID,
                            ds.SeriesInstanceUID, ds.SOPInstanceUID, *stow_files],
                           capture_output=True, text=True, timeout=120, env=env)
        assert r.returncode == 0, r.stderr + r.stdout
        got = json.loads(r.stdout.strip().splitlines()[-1])
        assert got["studies"] == [ds.StudyInstanceUID]
        assert got["series"] == [ds.SeriesInstanceUID]
        assert got["instances"] == [ds.SOPInstanceUID]
        assert got["metadata_sops"] == [ds.SOPInstanceUID]
        assert got["metadata_rows"] == ds.Rows
        assert got["frame_bytes"] == [ds.Rows * ds.Columns * 2]
        path = s.sql("SELECT path FROM instances")[0][0]
        assert got["instance_bytes"] == os.path.getsize(os.path.join(s.env["KP_STORAGE_ROOT"], path))
        assert got["instance_dicm"] == "DICM"
        # what it stored: referenced in the response, indexed, and stored byte for byte
        refs = got["stored"]["00081199"]["Value"]
        sops = [STOWED.sop_uid("S1", 0, n) for n in (1, 2)]
        assert [x["00081155"]["Value"][0] for x in refs] == sops
        assert "00081198" not in got["stored"]
        s.wait_jobs_settled()
        s.wait_indexed(3)
        for sop, f in zip(sops, stow_files):
            rel = s.sql("SELECT path FROM instances WHERE sop_uid = %s", (sop,))[0][0]
            with open(os.path.join(s.env["KP_STORAGE_ROOT"], rel), "rb") as a, open(f, "rb") as b:
                assert a.read() == b.read()
    finally:
        s.stop()
