"""Load and faults: 2,000 generated 512x512 16-bit CT instances over 4 parallel associations are
each indexed exactly once; with the indexer, the broker and the DICOM daemon killed (-9) and
restarted during the load, every acknowledged instance is indexed exactly once with its file
intact, and an instance whose association was cut is either fully present or absent."""
import glob
import os
import struct
import subprocess
import time

import pytest

import kp

N = 2000


@pytest.fixture(scope="module")
def dataset():
    d = os.path.join(kp.BUILD, "testdata", "ct2000")
    subprocess.run(["/usr/bin/python3", os.path.join(kp.REPO, "tests/data/gen_ct.py"), d,
                    "--instances", str(N), "--studies", "8", "--series-per-study", "2"],
                   check=True, timeout=600)
    files = sorted(glob.glob(os.path.join(d, "ct_*.dcm")))
    assert len(files) == N
    return files


def dataset_bytes(path):
    """The data set of a Part 10 file (everything after the File Meta Information)."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[128:132] == b"DICM"
    # (0002,0000) UL, explicit VR: tag(4) VR(2) len(2) value(4)
    group_len = struct.unpack("<I", data[140:144])[0]
    return data[144 + group_len:]


def send_parallel(system, files, parts=4):
    chunks = [files[i::parts] for i in range(parts)]
    return [system.storescu_async(c) for c in chunks]


def collect(procs, timeout=900):
    status = {}
    for p, out in procs:
        p.wait(timeout=timeout)
        with open(out) as f:
            status.update(kp.parse_storescu(f.read()))
    return status


def check_exactly_once(system, files):
    rows = system.sql("SELECT sop_uid, count(*) FROM instances GROUP BY sop_uid HAVING count(*) > 1")
    assert rows == []
    assert system.sql("SELECT count(*) FROM jobs WHERE state = 'failed'")[0][0] == 0


def test_load_four_associations(cluster, dataset):
    s = kp.System(cluster, indexers=2)
    try:
        t0 = time.time()
        status = collect(send_parallel(s, dataset))
        acked = [f for f in dataset if status.get(f) == "ok"]
        assert len(acked) == N, {k: v for k, v in status.items() if v != "ok"}
        s.wait_indexed(N, 300)
        s.wait_jobs_settled(120)
        elapsed = time.time() - t0
        print(f"\n{N} instances stored and indexed in {elapsed:.1f}s")
        assert s.count("instances") == N
        check_exactly_once(s, dataset)
        assert s.count("studies") == 8
        assert s.count("series") == 16
        assert s.count("patients") == 5
        agg = s.sql("SELECT sum(num_instances), sum(num_series) FROM studies")[0]
        assert tuple(agg) == (N, 16)
        assert s.sql("SELECT DISTINCT modalities FROM studies") == [(["CT"],)]
        # pacsctl stats reports the same counts
        out = s.pacsctl("stats").stdout
        assert f"instances  {N}" in out
    finally:
        s.stop()


def test_kill_minus_nine_loses_nothing(cluster, dataset):
    s = kp.System(cluster, indexers=2)
    try:
        def acked_rows():  # outbox rows = instances acknowledged so far
            return s.count("jobs")

        procs = send_parallel(s, dataset)
        kp.wait_for(lambda: acked_rows() >= 300, 300, "300 acknowledged", 0.02)
        s.kill("pacs-indexer#0")
        s.start("pacs-indexer#0", "pacs-indexer")
        kp.wait_for(lambda: acked_rows() >= 700, 300, "700 acknowledged", 0.02)
        s.kill("pacs-busd")
        time.sleep(0.2)
        s.start("pacs-busd")
        kp.wait_for(lambda: acked_rows() >= 1200, 300, "1200 acknowledged", 0.02)
        s.kill("pacs-dicomd")
        status = collect(procs)
        s.start_dicomd()
        s.wait_jobs_settled(300)

        acked = [f for f in dataset if status.get(f) == "ok"]
        cut = [f for f in dataset if status.get(f) != "ok"]
        print(f"\n{len(acked)} acknowledged before dicomd was killed, {len(cut)} not")
        assert len(acked) >= 1000  # committed rows can run a little ahead of answers seen
        assert len(cut) > 0, "dicomd was killed after the load finished; nothing was cut"
        sops = {r[0]: (r[1], r[2]) for r in s.sql("SELECT sop_uid, path, file_sha256 FROM instances")}
        root = s.env["KP_STORAGE_ROOT"]

        import pydicom
        def sop(f):
            return pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID

        # every acknowledged instance: indexed exactly once, stored data set intact
        for f in acked:
            u = sop(f)
            assert u in sops, f"acknowledged {f} ({u}) is not indexed"
            assert dataset_bytes(os.path.join(root, sops[u][0])) == dataset_bytes(f)
        # cut ones: either fully present (indexed, intact) or absent
        present = 0
        for f in cut:
            u = sop(f)
            if u in sops:
                present += 1
                assert dataset_bytes(os.path.join(root, sops[u][0])) == dataset_bytes(f)
        check_exactly_once(s, dataset)
        print(f"{present} of the cut instances were complete and are indexed")

        # the modality sends what was not acknowledged again: everything ends up indexed once
        resend = collect([s.storescu_async(cut)])
        assert all(resend.get(f) == "ok" for f in cut)
        s.wait_indexed(N, 300)
        s.wait_jobs_settled(120)
        assert s.count("instances") == N
        check_exactly_once(s, dataset)
        assert s.sql("SELECT sum(num_instances) FROM studies")[0][0] == N
    finally:
        s.stop()
