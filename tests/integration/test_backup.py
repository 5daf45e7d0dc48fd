"""pacsctl backup / restore: an encrypted snapshot of the index and the storage; a second backup
copies nothing new (incremental); backup -> wipe -> restore brings back every study, user and
audit row with the audit chain intact and every file byte for byte; `backup verify` names a
corrupted and a missing object; a wrong key, a tampered file and a non-empty target are refused."""
import glob
import hashlib
import os
import re
import shutil
import subprocess

import pytest

import kp
from datasets import pydicom_files

PW = "Backup-Restore-Drill-2026"


@pytest.fixture(scope="module")
def gw(cluster):
    s = kp.System(cluster, gateway=True)
    try:
        files = [f for f in pydicom_files() if "CT_small" in f or "MR_small" in f or
                 "JPEG2000" in f or "chr_" in os.path.basename(f)][:12]
        s.send_each(files)
        s.add_user("drbackup", PW, "doctor")
        assert s.login("drbackup", PW)[0] == 200
        kp.wait_for(lambda: s.sql("SELECT count(*) FROM jobs WHERE type = 'audit' AND "
                                  "state = 'pending'")[0][0] == 0, 60, "audit settled")
        yield s
    finally:
        s.stop()


def pacsctl(env, *args, check=True):
    r = subprocess.run([os.path.join(kp.BIN, "pacsctl"), *args], env=env, capture_output=True,
                       text=True, timeout=600)
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


def snapshot_of(out):
    return re.search(r"^snapshot: (\S+)$", out, re.M).group(1)


def tree(root):
    out = {}
    for p in glob.glob(os.path.join(root, "**", "*"), recursive=True):
        rel = os.path.relpath(p, root)
        if os.path.isfile(p) and not rel.startswith("."):
            out[rel] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def test_backup_wipe_restore(gw, cluster, tmp_path):
    env = dict(gw.env)
    key = str(tmp_path / "backup.key")
    r = pacsctl(env, "backup", "keygen", key)
    assert oct(os.stat(key).st_mode & 0o777) == "0o600"
    assert pacsctl(env, "backup", "keygen", key, check=False).returncode != 0  # never overwrites
    env["KP_BACKUP_KEY_FILE"] = key
    dest = str(tmp_path / "backups")
    r = pacsctl(env, "backup", dest)
    snap = snapshot_of(r.stdout)
    assert os.path.isfile(os.path.join(snap, "db.enc")) and os.path.isfile(os.path.join(snap, "manifest.enc"))
    # encrypted at rest: no DICOM preamble, no patient name in any object
    objs = glob.glob(os.path.join(dest, "objects", "*", "*"))
    assert len(objs) == len(set(tree(gw.env["KP_STORAGE_ROOT"]).values())) >= 3
    for o in objs:
        data = open(o, "rb").read()
        assert data[:5] == b"KPBK1" and b"DICM" not in data and b"CompressedSamples" not in data
    r = pacsctl(env, "backup", "verify", snap)
    m = re.search(r"scratch restore: (\d+) tables restored, (\d+) with the counts", r.stdout)
    assert m and m.group(1) == m.group(2) and int(m.group(1)) >= 10, r.stdout
    # a second backup copies nothing new
    r2 = pacsctl(env, "backup", dest)
    assert re.search(r"\(0 new, 0\.0 MB copied\)", r2.stdout), r2.stdout
    snap2 = snapshot_of(r2.stdout)

    before = {t: gw.sql(f"SELECT count(*) FROM {t}")[0][0]
              for t in ("studies", "instances", "users", "audit_log")}
    files_before = tree(gw.env["KP_STORAGE_ROOT"])

    # restore into an empty installation: a database without schema, an empty storage
    cluster.admin("CREATE DATABASE kp_restored")
    renv = dict(env, KP_DB_CONNINFO=cluster.dsn("kp_restored"),
                KP_STORAGE_ROOT=str(tmp_path / "restored-storage"))
    r = pacsctl(renv, "restore", snap2)
    assert "restore complete" in r.stdout
    import psycopg2
    c = psycopg2.connect(renv["KP_DB_CONNINFO"])
    try:
        cur = c.cursor()
        for t, n in before.items():
            cur.execute(f"SELECT count(*) FROM {t}")
            assert cur.fetchone()[0] == n, t
        cur.execute("SELECT path, file_sha256 FROM instances")
        rows = cur.fetchall()
    finally:
        c.close()
    assert tree(renv["KP_STORAGE_ROOT"]) == files_before
    for path, sha in rows:
        assert files_before[path] == sha
    assert "intact" in pacsctl(renv, "audit", "verify").stdout
    # a restore never overwrites an installation
    r = pacsctl(renv, "restore", snap2, check=False)
    assert r.returncode == 1 and "already has a schema" in r.stderr

    # damage: one object altered, one removed -> verify names both, exit 1
    m = {}
    for o in sorted(objs)[:2]:
        m[o] = open(o, "rb").read()
    a, b = sorted(objs)[:2]
    data = bytearray(m[a])
    data[len(data) // 2] ^= 0x01
    open(a, "wb").write(bytes(data))
    os.unlink(b)
    r = pacsctl(env, "backup", "verify", snap2, check=False)
    assert r.returncode == 1 and "scratch restore" not in r.stdout
    bad = re.findall(r"^BAD  (.+?): (.+)$", r.stdout, re.M)
    assert len(bad) == 2, r.stdout
    reasons = " ".join(x[1] for x in bad)
    assert "missing" in reasons and "altered" in reasons
    # and a restore from it stops at the damaged file
    cluster.admin("CREATE DATABASE kp_restored2")
    renv2 = dict(renv, KP_DB_CONNINFO=cluster.dsn("kp_restored2"),
                 KP_STORAGE_ROOT=str(tmp_path / "restored-storage-2"))
    r = pacsctl(renv2, "restore", snap2, check=False)
    assert r.returncode == 1 and "restore failed" in r.stderr
    for o, d in m.items():
        open(o, "wb").write(d)
    assert pacsctl(env, "backup", "verify", "--no-scratch", snap2).returncode == 0

    # another key reads nothing
    other = str(tmp_path / "other.key")
    pacsctl(env, "backup", "keygen", other)
    r = pacsctl(dict(env, KP_BACKUP_KEY_FILE=other), "backup", "verify", snap2, check=False)
    assert r.returncode == 1 and "another key" in r.stdout
    shutil.rmtree(renv["KP_STORAGE_ROOT"], ignore_errors=True)


def test_prune_keeps_the_newest_and_what_they_need(gw, tmp_path):
    """prune --keep 1: older snapshots go, and so do the objects only they referred to; the kept
    snapshot still verifies completely (nothing it needs was removed)."""
    env = dict(gw.env)
    key = str(tmp_path / "backup.key")
    pacsctl(env, "backup", "keygen", key)
    env["KP_BACKUP_KEY_FILE"] = key
    dest = str(tmp_path / "backups")
    first = snapshot_of(pacsctl(env, "backup", dest).stdout)
    objs_first = set(glob.glob(os.path.join(dest, "objects", "*", "*")))
    # a file in storage that only the first snapshot has: removed before the second backup
    root = gw.env["KP_STORAGE_ROOT"]
    extra = os.path.join(root, "zz", "extra-only-in-first.bin")
    os.makedirs(os.path.dirname(extra), exist_ok=True)
    open(extra, "wb").write(os.urandom(4096))
    try:
        second = snapshot_of(pacsctl(env, "backup", dest).stdout)
    finally:
        os.unlink(extra)
    third = snapshot_of(pacsctl(env, "backup", dest).stdout)
    assert len({first, second, third}) == 3
    assert len(glob.glob(os.path.join(dest, "objects", "*", "*"))) == len(objs_first) + 1
    r = pacsctl(env, "backup", "prune", dest, "--keep", "1")
    assert "2 snapshot(s) and 1 object(s) removed, 1 snapshot(s) kept" in r.stdout, r.stdout
    assert not os.path.exists(first) and not os.path.exists(second) and os.path.isdir(third)
    assert set(glob.glob(os.path.join(dest, "objects", "*", "*"))) == objs_first
    pacsctl(env, "backup", "verify", "--no-scratch", third)
    # --keep is required and at least 1
    assert pacsctl(env, "backup", "prune", dest, check=False).returncode == 2
    assert pacsctl(env, "backup", "prune", dest, "--keep", "0", check=False).returncode == 2
    assert pacsctl(env, "backup", "prune", dest, "--keep", "1x", check=False).returncode == 2
    # while a backup holds DIR/.lock (shared), prune refuses and removes nothing: it could
    # otherwise delete an object the running backup has just written or reuses
    import fcntl
    fourth = snapshot_of(pacsctl(env, "backup", dest).stdout)
    before = set(glob.glob(os.path.join(dest, "objects", "*", "*")))
    with open(os.path.join(dest, ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_SH)
        r = pacsctl(env, "backup", "prune", dest, "--keep", "1", check=False)
        assert r.returncode == 1 and "under way" in r.stderr, (r.stdout, r.stderr)
        assert os.path.isdir(third) and os.path.isdir(fourth)
        # another backup shares the lock
        snapshot_of(pacsctl(env, "backup", dest).stdout)
    assert before <= set(glob.glob(os.path.join(dest, "objects", "*", "*")))
    r = pacsctl(env, "backup", "prune", dest, "--keep", "1")
    assert "2 snapshot(s)" in r.stdout and not os.path.exists(third), r.stdout


def test_schedule_prints_units_systemd_accepts(gw, tmp_path):
    key = str(tmp_path / "backup.key")
    pacsctl(gw.env, "backup", "keygen", key)
    r = pacsctl(dict(gw.env, KP_BACKUP_KEY_FILE=key), "backup", "schedule", str(tmp_path),
                "--at", "01:15")
    blocks = r.stdout.split("\n[Unit]")
    service, timer = "[Unit]" + blocks[1], "[Unit]" + blocks[2].split("\n# crontab")[0]
    assert f"backup {tmp_path} --key {key}" in service and "audit verify --textfile" in service
    assert "OnCalendar=*-*-* 01:15:00" in timer
    cron = r.stdout.strip().splitlines()[-1]
    assert cron.startswith("15 1 * * * /usr/bin/pacsctl") and "prune" in cron
    if shutil.which("systemd-analyze"):
        d = tmp_path / "units"
        d.mkdir()
        (d / "klinika-backup.service").write_text(service)
        (d / "klinika-backup.timer").write_text(timer)
        v = subprocess.run(["systemd-analyze", "verify", "--man=no", str(d / "klinika-backup.timer"),
                            str(d / "klinika-backup.service")], capture_output=True, text=True,
                           timeout=60)
        errors = [l for l in v.stderr.splitlines()
                  if "klinika-backup" in l and "/usr/bin/pacsctl" not in l]
        assert not errors, v.stderr
    assert pacsctl(gw.env, "backup", "schedule", str(tmp_path), "--at", "25:00",
                   check=False).returncode == 2
