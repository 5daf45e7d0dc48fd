"""A second, independent client: the npm package dicomweb-client (dcmjs project) under node
searches (studies, series, instances) and retrieves (series metadata, a frame, an instance)
through the gateway. Store (STOW-RS) joins when the gateway implements it."""
import json
import os
import subprocess

import pydicom
import pytest

import kp

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
                   NODE_TLS_REJECT_UNAUTHORIZED="0")  # the gateway's self-signed certificate
        r = subprocess.run(["node", os.path.join(os.path.dirname(__file__), "dicomweb_client.js"),
                            f"https://127.0.0.1:{s.https_port}", ds.StudyInstanceUID,
                            ds.SeriesInstanceUID, ds.SOPInstanceUID],
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
    finally:
        s.stop()
