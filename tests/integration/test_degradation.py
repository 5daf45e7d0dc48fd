"""Graceful degradation: PostgreSQL stopped in the middle of a storescu load. While it is down,
stores are refused (a DIMSE failure, never an acknowledgement of data that is not durable);
nothing acknowledged is lost; when it is back, ingest resumes by itself (the same associations
go on storing, every process reconnects) and the modality's re-send of the refused instances
completes the study: every instance indexed exactly once, its file intact.
(The broker, indexer and dicomd killed during a load: test_load_faults.py.)
Runs on a private PostgreSQL cluster, since it stops it."""
import glob
import json
import os
import subprocess
import time

import pydicom
import pytest

import kp
from test_load_faults import check_exactly_once, collect, dataset_bytes, send_parallel

N = 600


@pytest.fixture(scope="module")
def files():
    d = os.path.join(kp.BUILD, "testdata", "ct600")
    subprocess.run(["/usr/bin/python3", os.path.join(kp.REPO, "tests/data/gen_ct.py"), d,
                    "--instances", str(N), "--studies", "3", "--series-per-study", "2"],
                   check=True, timeout=600)
    f = sorted(glob.glob(os.path.join(d, "ct_*.dcm")))
    assert len(f) == N
    return f


def test_database_stopped_during_a_load(files):
    cluster = kp.Cluster()
    s = None
    try:
        s = kp.System(cluster, indexers=2)
        # the load goes through dicomd's own counting of acknowledged stores: the outbox rows
        procs = send_parallel(s, files, parts=3)
        kp.wait_for(lambda: s.count("jobs") >= 100, 300, "100 acknowledged", 0.02)
        cluster.server("stop")
        time.sleep(3)  # stores arriving now cannot be made durable: refused
        cluster.server("start")
        status = collect(procs)
        acked = [f for f in files if status.get(f) == "ok"]
        refused = [f for f in files if status.get(f) != "ok"]
        print(f"\n{len(acked)} acknowledged, {len(refused)} refused while the database was down")
        assert refused, "the load finished before the database stopped; nothing was refused"
        assert len(acked) >= 100  # those acknowledged before the stop, at least
        # refused with a DIMSE failure status (or not sent: the association was aborted)
        assert set(status.values()) <= {"ok", "Refused: OutOfResources"}, set(status.values())

        sops = lambda: {r[0]: r[1] for r in s.sql("SELECT sop_uid, path FROM instances")}  # noqa
        kp.wait_for(lambda: len(sops()) >= len(acked), 300, "every acknowledged instance indexed")
        s.wait_jobs_settled(300)
        idx, root = sops(), s.env["KP_STORAGE_ROOT"]
        for f in acked:  # acknowledged = durable: indexed, and its data set intact
            u = pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID
            assert u in idx, f"acknowledged {f} is not indexed"
            assert dataset_bytes(os.path.join(root, idx[u])) == dataset_bytes(f)

        # the modality re-sends what was refused: the whole load ends up indexed once
        resend = collect([s.storescu_async(refused)])
        assert all(resend.get(f) == "ok" for f in refused)
        s.wait_indexed(N, 300)
        s.wait_jobs_settled(120)
        check_exactly_once(s, files)
        assert s.sql("SELECT sum(num_instances) FROM studies")[0][0] == N
    finally:
        if s:
            s.stop()
        cluster.stop()


def test_disk_full(cluster, tmp_path):
    """Storage on a 3 MB file system: once it is full, stores are refused with a DIMSE failure
    (and STOW-RS with a JSON error), nothing half-written stays behind, every acknowledged
    instance is indexed and intact, and after space is freed stores work again."""
    mnt = str(tmp_path / "small")
    os.makedirs(mnt)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", mnt], capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root): " + r.stderr.decode().strip())
    s = None
    try:
        # refuse below 1 MB free: a 0.5 MB instance never meets a full disk halfway
        s = kp.System(cluster, gateway=True, extra_env={"KP_STORAGE_ROOT": mnt,
                                                        "KP_STORAGE_MIN_FREE_MB": "1"})
        # 512x512 16-bit CT slices of about 0.5 MB: the 3 MB fill after a few
        big = sorted(glob.glob(os.path.join(kp.BUILD, "testdata", "ct600", "ct_*.dcm")))[:12]
        assert len(big) == 12
        status = {}
        for f in big:  # one association each, as a modality retrying would
            rc, st, out = s.storescu([f])
            status.update(st)
        acked = [f for f in big if status.get(f) == "ok"]
        refused = [f for f in big if status.get(f) != "ok"]
        assert acked and refused, status
        assert {status[f] for f in refused} == {"Refused: OutOfResources"}, status
        # STOW-RS: a JSON error, not a crash
        bnd = "kpfull"
        body = (b"--" + bnd.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" +
                open(refused[0], "rb").read() + b"\r\n--" + bnd.encode() + b"--\r\n")
        st, h, b = s.https("POST", "/dicom-web/studies",
                           {"Content-Type": f'multipart/related; type="application/dicom"; '
                                            f'boundary={bnd}'}, body)
        assert st == 507 and h["Retry-After"] == "60", (st, b)
        assert json.loads(b)["error"]["code"] == "storage_error"
        s.wait_indexed(len(acked), 120)
        rows = dict(s.sql("SELECT path, file_sha256 FROM instances"))
        for path, sha in rows.items():  # acknowledged = intact
            import hashlib
            assert hashlib.sha256(open(os.path.join(mnt, path), "rb").read()).hexdigest() == sha
        # nothing half-written: every file outside the temp directory is an indexed instance
        stored = [os.path.relpath(p, mnt) for p in glob.glob(os.path.join(mnt, "*", "*", "*"))]
        assert sorted(stored) == sorted(rows), (stored, rows)
        # space again: the modality's retry succeeds
        subprocess.run(["mount", "-o", "remount,size=64m", mnt], check=True)
        rc, st, out = s.storescu(refused)
        assert set(st.values()) == {"ok"}, out
        s.wait_indexed(len(big), 120)
    finally:
        if s:
            s.stop()
        subprocess.run(["umount", "-l", mnt], capture_output=True)
