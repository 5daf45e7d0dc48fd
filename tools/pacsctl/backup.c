/* pacsctl backup / restore: encrypted, incremental, verifiable backups.
 *
 *   pacsctl backup keygen FILE          a new backup key (32 random bytes, base64, mode 0600)
 *   pacsctl backup DIR                  a snapshot of the database and the storage into DIR
 *   pacsctl backup verify DIR/snapshots/ID [--no-scratch]
 *                                       every object decrypts and matches the manifest, and
 *                                       the dump restores into a scratch PostgreSQL cluster
 *                                       with the manifest's row counts
 *   pacsctl backup prune DIR --keep N   removes all but the newest N snapshots, then every object
 *                                       no remaining snapshot refers to
 *   pacsctl backup schedule DIR [--at HH:MM]
 *                                       prints a systemd timer + service and a crontab line for
 *                                       a nightly backup and audit check (installs nothing)
 *   pacsctl restore DIR/snapshots/ID    into an empty installation (a database without schema)
 * The key is backup.key_file (or --key FILE).
 *
 * DIR/.lock: a backup holds it shared while it writes (backups may run side by side: objects
 * are written under a temporary name and renamed), prune exclusive, so prune never removes an
 * object that a backup under way has just written or counts on finding.
 *
 * Layout of DIR:
 *   objects/xx/<name>           one encrypted copy of each distinct stored file; <name> is
 *                               HMAC-SHA256(key, its SHA-256), so equal files are stored once and
 *                               a later backup copies only new or changed files (incremental),
 *                               and the names reveal nothing about the content
 *   snapshots/<UTC time>/db.enc       pg_dump (custom format) of the index, encrypted
 *   snapshots/<UTC time>/manifest.enc the snapshot: every file (path, size, mtime, SHA-256),
 *                               the dump's SHA-256, row counts and the audit chain's head
 * A snapshot directory appears (rename) only once complete.
 *
 * Consistency: one REPEATABLE READ transaction exports its snapshot to pg_dump and lists, in the
 * same snapshot, the files the index refers to; those are copied first, then every other file
 * under storage.root. A referenced file that vanished meanwhile (replaced by pacs-compressor)
 * makes the backup fail with a message: run it again.
 *
 * Encryption: AES-256-GCM in 1 MiB chunks, each with its own nonce (random 8-byte prefix + chunk
 * counter) and tag; the last chunk is marked in the associated data, so a truncated, reordered
 * or altered file is refused. */
#include "kp_crypt.h"
#include "kp_errors.h"
#include "kp_log.h"
#include "kp_storage.h"
#include "pacsctl.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <jansson.h>
#include <limits.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>
#include <signal.h>
#include <spawn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

/* ---- key --------------------------------------------------------------------------------------
 */
static int s_key_load(const char *path, unsigned char key[32])
{
    FILE *f = fopen(path, "r");
    if (!f) {
        fprintf(stderr, "pacsctl: cannot read the backup key %s: %s (pacsctl backup keygen FILE)\n",
                path, strerror(errno));
        return 1;
    }
    char text[256];
    size_t n = fread(text, 1, sizeof text - 1, f);
    fclose(f);
    text[n] = 0;
    while (n && (text[n - 1] == '\n' || text[n - 1] == '\r' || text[n - 1] == ' '))
        text[--n] = 0;
    unsigned char out[256];
    int len = EVP_DecodeBlock(out, (const unsigned char *)text, (int)n);
    /* EVP_DecodeBlock counts the padding: 44 base64 characters with one '=' give 33 */
    if (len > 0 && n >= 1 && text[n - 1] == '=') len--;
    if (len > 0 && n >= 2 && text[n - 2] == '=') len--;
    if (len != 32) {
        fprintf(stderr, "pacsctl: %s is not a backup key (base64 of 32 bytes)\n", path);
        return 1;
    }
    memcpy(key, out, 32);
    OPENSSL_cleanse(out, sizeof out);
    return 0;
}

static int s_keygen(const char *path)
{
    unsigned char key[32];
    char b64[64];
    if (RAND_bytes(key, sizeof key) != 1) return 1;
    EVP_EncodeBlock((unsigned char *)b64, key, sizeof key);
    OPENSSL_cleanse(key, sizeof key);
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0) {
        fprintf(stderr, "pacsctl: cannot create %s: %s\n", path, strerror(errno));
        return 1;
    }
    size_t l = strlen(b64);
    b64[l++] = '\n';
    bool ok = write(fd, b64, l) == (ssize_t)l && fsync(fd) == 0;
    close(fd);
    OPENSSL_cleanse(b64, sizeof b64);
    if (!ok) return 1;
    printf("backup key written to %s: keep a copy apart from the backups (without it they "
           "cannot be read)\n",
           path);
    return 0;
}

/* An encrypted file at path (created 0600). 0, or KP_EIO with the reason printed. */
static int s_enc_open(kp_crypt_enc_t *e, const unsigned char key[32], const char *path)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0 || kp_crypt_enc_open_fd(e, key, fd)) {
        fprintf(stderr, "pacsctl: cannot write %s: %s\n", path, strerror(errno));
        return KP_EIO;
    }
    return 0;
}

/* ---- helpers ----------------------------------------------------------------------------------
 */
static int s_mkdirs(const char *path)
{
    char tmp[PATH_MAX];
    snprintf(tmp, sizeof tmp, "%s", path);
    for (char *p = tmp + 1; *p; p++) {
        if (*p != '/') continue;
        *p = 0;
        if (mkdir(tmp, 0700) && errno != EEXIST) return KP_EIO;
        *p = '/';
    }
    return mkdir(tmp, 0700) && errno != EEXIST ? KP_EIO : 0;
}

static void s_fsync_dir(const char *dir)
{
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd >= 0) {
        fsync(fd);
        close(fd);
    }
}

/* objects/xx/<HMAC-SHA256(key, sha256 hex)> under dir */
static void s_object_path(const char *dir, const unsigned char key[32], const char *sha256,
                          char *out, size_t outlen)
{
    unsigned char mac[32];
    unsigned int ml = 0;
    HMAC(EVP_sha256(), key, 32, (const unsigned char *)sha256, strlen(sha256), mac, &ml);
    char hex[65];
    for (int i = 0; i < 32; i++)
        snprintf(hex + 2 * i, 3, "%02x", mac[i]);
    snprintf(out, outlen, "%s/objects/%.2s/%s", dir, hex, hex);
}

/* A stored file's path relative to storage.root as recorded in a manifest: no absolute path,
 * no "." or ".." component, no hidden component (the temp dir), printable. */
static bool s_rel_safe(const char *rel)
{
    if (!rel || !*rel || rel[0] == '/' || strlen(rel) > 1024) return false;
    const char *p = rel;
    while (*p) {
        if (*p == '.' || *p == '/')
            return false; /* a component may not start with '.' or be empty */
        while (*p && *p != '/') {
            if ((unsigned char)*p < 0x21 || *p == 0x7f || *p == '\\') return false;
            p++;
        }
        if (*p == '/') p++;
    }
    return true;
}

/* Runs argv with its stdout (to_child false) or stdin (true) on a pipe; *fd is our end. */
static pid_t s_spawn_pipe(char *const argv[], bool to_child, int *fd)
{
    int p[2];
    if (pipe2(p, O_CLOEXEC)) return -1;
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, to_child ? p[0] : p[1], to_child ? 0 : 1);
    pid_t pid;
    int rc = posix_spawnp(&pid, argv[0], &fa, NULL, argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    close(to_child ? p[0] : p[1]);
    if (rc) {
        close(to_child ? p[1] : p[0]);
        fprintf(stderr, "pacsctl: cannot run %s: %s\n", argv[0], strerror(rc));
        return -1;
    }
    *fd = to_child ? p[1] : p[0];
    return pid;
}

static bool s_wait_ok(pid_t pid, const char *what)
{
    int st = 0;
    while (waitpid(pid, &st, 0) < 0 && errno == EINTR) {
    }
    if (WIFEXITED(st) && WEXITSTATUS(st) == 0) return true;
    fprintf(stderr, "pacsctl: %s failed (exit status %d)\n", what,
            WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st));
    return false;
}

/* ---- backup -----------------------------------------------------------------------------------
 */
typedef struct {
    const char *root;
    size_t rootlen;
    json_t *seen; /* path -> true */
    json_t *files;
    const char *dir;
    const unsigned char *key;
    json_t *prev; /* path -> {size, mtime, sha256} of the previous snapshot */
    long long nfiles, nnew, bytes_new, missing;
    bool tty;
} s_bk_t;

static s_bk_t *s_walk_ctx;

/* One file: hash (or reuse the previous snapshot's hash when size and mtime are unchanged),
 * copy the object when the backup does not have it yet, and list it. */
static int s_backup_file(s_bk_t *b, const char *rel, bool referenced)
{
    if (json_object_get(b->seen, rel)) return 0;
    json_object_set_new(b->seen, rel, json_true());
    char abs[PATH_MAX + 1100];
    snprintf(abs, sizeof abs, "%s/%s", b->root, rel);
    struct stat sb;
    if (stat(abs, &sb)) {
        if (referenced) {
            fprintf(stderr,
                    "pacsctl: %s is referenced by the index but missing (changed during "
                    "the backup? run it again)\n",
                    rel);
            b->missing++;
        }
        return 0;
    }
    char sha[65];
    json_t *pv = b->prev ? json_object_get(b->prev, rel) : NULL;
    if (pv && json_integer_value(json_object_get(pv, "size")) == (json_int_t)sb.st_size &&
        json_integer_value(json_object_get(pv, "mtime")) == (json_int_t)sb.st_mtime &&
        json_string_value(json_object_get(pv, "sha256"))) {
        snprintf(sha, sizeof sha, "%s", json_string_value(json_object_get(pv, "sha256")));
    } else {
        int64_t size;
        if (kp_storage_sha256_file(abs, sha, &size)) {
            fprintf(stderr, "pacsctl: cannot read %s\n", abs);
            return KP_EIO;
        }
    }
    char obj[PATH_MAX];
    s_object_path(b->dir, b->key, sha, obj, sizeof obj);
    if (access(obj, F_OK)) {
        char odir[PATH_MAX], tmp[PATH_MAX + 32];
        snprintf(odir, sizeof odir, "%s", obj);
        *strrchr(odir, '/') = 0;
        if (s_mkdirs(odir)) return KP_EIO;
        snprintf(tmp, sizeof tmp, "%s.tmp.%d", obj, (int)getpid());
        kp_crypt_enc_t e;
        int fd = open(abs, O_RDONLY | O_CLOEXEC);
        int rc = fd < 0 ? KP_EIO : s_enc_open(&e, b->key, tmp);
        if (fd >= 0 && !rc) {
            char buf[1 << 16];
            ssize_t n;
            while (!rc && (n = read(fd, buf, sizeof buf)) > 0)
                rc = kp_crypt_enc_write(&e, buf, (size_t)n);
            char got[65];
            rc = kp_crypt_enc_close(&e, got, rc == 0);
            if (!rc && strcmp(got, sha)) {
                fprintf(stderr, "pacsctl: %s changed while it was copied; run the backup again\n",
                        rel);
                rc = KP_EIO;
            }
        }
        if (fd >= 0) close(fd);
        if (rc || rename(tmp, obj)) {
            unlink(tmp);
            fprintf(stderr, "pacsctl: cannot copy %s into the backup\n", rel);
            return KP_EIO;
        }
        s_fsync_dir(odir);
        b->nnew++;
        b->bytes_new += sb.st_size;
    }
    json_array_append_new(b->files, json_pack("{s:s,s:I,s:I,s:s}", "path", rel, "size",
                                              (json_int_t)sb.st_size, "mtime",
                                              (json_int_t)sb.st_mtime, "sha256", sha));
    b->nfiles++;
    if (b->tty && b->nfiles % 100 == 0)
        fprintf(stderr, "\r  %lld files, %lld new (%.1f MB)", b->nfiles, b->nnew,
                (double)b->bytes_new / 1e6);
    return 0;
}

static int s_nftw_cb(const char *path, const struct stat *sb, int type, struct FTW *ftw)
{
    (void)sb;
    const char *base = path + ftw->base;
    if (type == FTW_D && ftw->level > 0 && base[0] == '.') return FTW_SKIP_SUBTREE;
    if (type != FTW_F || base[0] == '.') return FTW_CONTINUE;
    const char *rel = path + s_walk_ctx->rootlen + 1;
    if (!s_rel_safe(rel)) return FTW_CONTINUE;
    return s_backup_file(s_walk_ctx, rel, false) ? FTW_STOP : FTW_CONTINUE;
}

static json_t *s_load_manifest(const char *snap, const unsigned char key[32], const char **why);

/* The newest complete snapshot's files, path -> entry (for the incremental hashing). */
static json_t *s_previous(const char *dir, const unsigned char key[32])
{
    char sd[PATH_MAX];
    snprintf(sd, sizeof sd, "%s/snapshots", dir);
    DIR *d = opendir(sd);
    if (!d) return NULL;
    char best[256] = "";
    struct dirent *de;
    while ((de = readdir(d)))
        if (de->d_name[0] != '.' && !strstr(de->d_name, ".tmp") && strcmp(de->d_name, best) > 0)
            snprintf(best, sizeof best, "%s", de->d_name);
    closedir(d);
    if (!best[0]) return NULL;
    char snap[PATH_MAX + 300];
    snprintf(snap, sizeof snap, "%s/%s", sd, best);
    const char *why;
    json_t *m = s_load_manifest(snap, key, &why);
    if (!m) return NULL;
    json_t *map = json_object();
    size_t i;
    json_t *f;
    json_array_foreach(json_object_get(m, "files"), i, f)
        json_object_set(map, json_string_value(json_object_get(f, "path")), f);
    json_decref(m);
    return map;
}

static int s_backup(const kp_config_t *cfg, const char *dir, const unsigned char key[32])
{
    int rc = 1;
    kp_db_t *db = pacsctl_db(cfg, true);
    if (!db) return 1;
    s_bk_t b = {.root = cfg->storage_root,
                .rootlen = strlen(cfg->storage_root),
                .seen = json_object(),
                .files = json_array(),
                .dir = dir,
                .key = key,
                .tty = isatty(STDERR_FILENO)};
    json_t *counts = json_object(), *manifest = NULL;
    char snapid[32], snap[PATH_MAX], tmpsnap[PATH_MAX + 8], path[PATH_MAX + 32], dbsha[65] = "";
    /* snapshots are named by the second they start in: a second backup within the same second
     * waits for the next one */
    for (int tries = 0;; tries++) {
        time_t now = time(NULL);
        struct tm tm;
        gmtime_r(&now, &tm);
        strftime(snapid, sizeof snapid, "%Y%m%dT%H%M%SZ", &tm);
        snprintf(snap, sizeof snap, "%s/snapshots/%s", dir, snapid);
        snprintf(tmpsnap, sizeof tmpsnap, "%s.tmp", snap);
        struct stat sb;
        if ((stat(snap, &sb) && stat(tmpsnap, &sb)) || tries >= 3) break;
        sleep(1);
    }
    if (s_mkdirs(tmpsnap) || s_mkdirs(dir)) {
        fprintf(stderr, "pacsctl: cannot create %s\n", tmpsnap);
        goto out;
    }
    b.prev = s_previous(dir, key);
    /* one snapshot for the dump and the list of referenced files */
    PGresult *r = NULL;
    if (kp_db_run(db, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY", 0, NULL) ||
        kp_db_exec(db, &r, "SELECT pg_export_snapshot()", 0, NULL))
        goto out;
    char snapshot[128];
    snprintf(snapshot, sizeof snapshot, "%s", PQgetvalue(r, 0, 0));
    PQclear(r);
    static const char *const tables[] = {"patients", "studies",         "series",    "instances",
                                         "users",    "roles",           "sites",     "audit_log",
                                         "reports",  "report_versions", "modalities"};
    for (size_t i = 0; i < sizeof tables / sizeof *tables; i++) {
        char q[128];
        snprintf(q, sizeof q, "SELECT count(*) FROM %s", tables[i]);
        if (kp_db_exec(db, &r, q, 0, NULL)) goto out;
        json_object_set_new(counts, tables[i], json_integer(atoll(PQgetvalue(r, 0, 0))));
        PQclear(r);
    }
    if (kp_db_exec(db, &r,
                   "SELECT coalesce(max(seq), 0), coalesce((SELECT hash FROM audit_log ORDER BY "
                   "seq DESC LIMIT 1), ''), (SELECT coalesce(max(version), 0) FROM "
                   "schema_migrations) FROM audit_log",
                   0, NULL))
        goto out;
    json_t *audit = json_pack("{s:I,s:s}", "seq", (json_int_t)atoll(PQgetvalue(r, 0, 0)), "hash",
                              PQgetvalue(r, 0, 1));
    int schema = atoi(PQgetvalue(r, 0, 2));
    PQclear(r);
    /* pg_dump in the exported snapshot */
    printf("backup %s: database ...\n", snapid);
    fflush(stdout);
    char dbarg[4096];
    snprintf(dbarg, sizeof dbarg, "--dbname=%s", cfg->db_conninfo);
    char snaparg[160];
    snprintf(snaparg, sizeof snaparg, "--snapshot=%s", snapshot);
    char *dump_argv[] = {"pg_dump", "--format=custom", "--no-owner", snaparg, dbarg, NULL};
    int pfd = -1;
    pid_t pid = s_spawn_pipe(dump_argv, false, &pfd);
    if (pid < 0) {
        json_decref(audit);
        goto out;
    }
    snprintf(path, sizeof path, "%s/db.enc", tmpsnap);
    kp_crypt_enc_t e;
    int er = s_enc_open(&e, key, path);
    char buf[1 << 16];
    ssize_t n;
    while ((n = read(pfd, buf, sizeof buf)) > 0)
        if (!er) er = kp_crypt_enc_write(&e, buf, (size_t)n);
    close(pfd);
    bool dump_ok = s_wait_ok(pid, "pg_dump");
    uint64_t dbbytes = e.bytes;
    er = kp_crypt_enc_close(&e, dbsha, er == 0 && dump_ok);
    if (er || !dump_ok) {
        json_decref(audit);
        goto out;
    }
    /* the files the index refers to, in the same snapshot, then everything else */
    if (kp_db_exec(db, &r,
                   "SELECT path FROM instances UNION ALL SELECT path FROM report_pdfs WHERE path "
                   "IS NOT NULL",
                   0, NULL)) {
        json_decref(audit);
        goto out;
    }
    printf("backup %s: %d files referenced by the index, then the rest of %s ...\n", snapid,
           PQntuples(r), cfg->storage_root);
    fflush(stdout);
    int fr = 0;
    for (int i = 0; i < PQntuples(r) && !fr; i++)
        fr = s_backup_file(&b, PQgetvalue(r, i, 0), true);
    PQclear(r);
    kp_db_run(db, "COMMIT", 0, NULL);
    if (!fr) {
        s_walk_ctx = &b;
        fr = nftw(cfg->storage_root, s_nftw_cb, 32, FTW_PHYS | FTW_ACTIONRETVAL) == FTW_STOP;
    }
    if (b.tty) fprintf(stderr, "\n");
    if (fr || b.missing) {
        json_decref(audit);
        goto out;
    }
    manifest = json_pack("{s:i,s:s,s:i,s:{s:s,s:I},s:o,s:o,s:O}", "version", 1, "created", snapid,
                         "schema", schema, "db", "sha256", dbsha, "size", (json_int_t)dbbytes,
                         "counts", counts, "audit_head", audit, "files", b.files);
    counts = NULL;
    char *text = json_dumps(manifest, JSON_COMPACT);
    snprintf(path, sizeof path, "%s/manifest.enc", tmpsnap);
    er = s_enc_open(&e, key, path);
    if (!er) er = kp_crypt_enc_write(&e, text, strlen(text));
    er = kp_crypt_enc_close(&e, NULL, er == 0);
    free(text);
    if (er) goto out;
    s_fsync_dir(tmpsnap);
    if (rename(tmpsnap, snap)) goto out;
    snprintf(path, sizeof path, "%s/snapshots", dir);
    s_fsync_dir(path);
    printf("backup %s complete: database %.1f MB, %lld files (%lld new, %.1f MB copied)\n"
           "snapshot: %s\n",
           snapid, (double)dbbytes / 1e6, b.nfiles, b.nnew, (double)b.bytes_new / 1e6, snap);
    rc = 0;
out:
    if (rc) {
        fprintf(stderr, "pacsctl: backup failed; the incomplete snapshot is %s\n", tmpsnap);
        kp_db_run(db, "ROLLBACK", 0, NULL);
    }
    json_decref(counts);
    json_decref(manifest);
    json_decref(b.seen);
    json_decref(b.files);
    json_decref(b.prev);
    kp_db_destroy(&db);
    return rc;
}

/* ---- reading a snapshot -----------------------------------------------------------------------
 */
typedef struct {
    char *buf;
    size_t len, cap;
} s_mem_t;

static int s_mem_add(void *user, const unsigned char *p, size_t n)
{
    s_mem_t *m = user;
    if (m->len + n + 1 > m->cap) {
        m->cap = (m->len + n + 1) * 2;
        m->buf = realloc(m->buf, m->cap);
        if (!m->buf) abort();
    }
    memcpy(m->buf + m->len, p, n);
    m->len += n;
    m->buf[m->len] = 0;
    return 0;
}

static json_t *s_load_manifest(const char *snap, const unsigned char key[32], const char **why)
{
    char path[PATH_MAX + 16];
    snprintf(path, sizeof path, "%s/manifest.enc", snap);
    s_mem_t m = {0};
    if (kp_crypt_decrypt(path, key, s_mem_add, &m, NULL, why)) {
        free(m.buf);
        return NULL;
    }
    json_t *j = m.buf ? json_loadb(m.buf, m.len, 0, NULL) : NULL;
    free(m.buf);
    if (!j || json_integer_value(json_object_get(j, "version")) != 1 ||
        !json_is_array(json_object_get(j, "files"))) {
        *why = "the manifest is not readable";
        json_decref(j);
        return NULL;
    }
    return j;
}

typedef struct {
    int fd;
    bool lenient; /* a reader that may stop early (pg_restore --list): once it has, discard */
    bool closed;
} s_fd_t;

static int s_to_fd(void *user, const unsigned char *p, size_t n)
{
    s_fd_t *o = user;
    if (o->closed) return 0;
    if (kp_crypt_write_all(o->fd, p, n)) return 0;
    if (o->lenient && errno == EPIPE) {
        o->closed = true;
        return 0;
    }
    return KP_EIO;
}

/* ---- a scratch PostgreSQL cluster (backup verify)
 * ------------------------------------------------ initdb into a temporary directory (as the
 * postgres user when we are root: initdb refuses root), a server on a Unix socket only, pg_restore
 * of the decrypted dump into it, the row counts compared with the manifest, then everything stopped
 * and removed. */
static bool s_run(char *const argv[])
{
    pid_t pid;
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
    posix_spawn_file_actions_addopen(&fa, 2, "/dev/null", O_WRONLY, 0);
    int rc = posix_spawnp(&pid, argv[0], &fa, NULL, argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    if (rc) return false;
    int st = 0;
    while (waitpid(pid, &st, 0) < 0 && errno == EINTR) {
    }
    return WIFEXITED(st) && WEXITSTATUS(st) == 0;
}

/* The newest /usr/lib/postgresql/N/bin with initdb, or false. */
static bool s_pg_bindir(char *out, size_t outlen)
{
    DIR *d = opendir("/usr/lib/postgresql");
    if (!d) return false;
    int best = -1;
    struct dirent *de;
    while ((de = readdir(d))) {
        int v = atoi(de->d_name);
        char p[512];
        snprintf(p, sizeof p, "/usr/lib/postgresql/%s/bin/initdb", de->d_name);
        if (v > best && access(p, X_OK) == 0) best = v;
    }
    closedir(d);
    if (best < 0) return false;
    snprintf(out, outlen, "/usr/lib/postgresql/%d/bin", best);
    return true;
}

static int s_rm_cb(const char *path, const struct stat *sb, int type, struct FTW *ftw)
{
    (void)sb;
    (void)ftw;
    return type == FTW_DP ? rmdir(path) : unlink(path);
}

/* Restores the snapshot's dump into the database of conninfo (pg_restore, one transaction)
 * and checks that what was decrypted is the dump the manifest names. true when done. */
static bool s_restore_dump(const char *conninfo, const char *snap, const unsigned char key[32],
                           json_t *m)
{
    char path[PATH_MAX + 16], got[65], dbarg[4096];
    snprintf(path, sizeof path, "%s/db.enc", snap);
    snprintf(dbarg, sizeof dbarg, "--dbname=%s", conninfo);
    /* privileges are not restored: the target may not have the roles of the source (a scratch
     * cluster); restore grants db.app_role's afterwards, as migrate does */
    char *argv[] = {"pg_restore",
                    "--exit-on-error",
                    "--no-owner",
                    "--no-privileges",
                    "--single-transaction",
                    dbarg,
                    NULL};
    int pfd = -1;
    pid_t pid = s_spawn_pipe(argv, true, &pfd);
    if (pid < 0) return false;
    s_fd_t sink = {.fd = pfd};
    const char *why = NULL;
    int dr = kp_crypt_decrypt(path, key, s_to_fd, &sink, got, &why);
    close(pfd);
    bool restored = s_wait_ok(pid, "pg_restore");
    const char *want = json_string_value(json_object_get(json_object_get(m, "db"), "sha256"));
    if (dr || !restored || !want || strcmp(got, want)) {
        printf("BAD  database dump: %s\n", dr          ? (why ? why : kp_strerror(dr))
                                           : !restored ? "pg_restore failed"
                                                       : "content differs from the manifest");
        return false;
    }
    return true;
}

/* Compares each table's row count in db with the manifest's, printing each difference; returns
 * how many differ, *n the tables compared. */
static int s_compare_counts(kp_db_t *db, json_t *m, int *n)
{
    const char *t;
    json_t *c;
    int differ = 0;
    *n = 0;
    json_object_foreach(json_object_get(m, "counts"), t, c)
    {
        char q[128];
        PGresult *r = NULL;
        snprintf(q, sizeof q, "SELECT count(*) FROM %s", t);
        long long got = -1;
        if (kp_db_exec(db, &r, q, 0, NULL) == 0) {
            got = atoll(PQgetvalue(r, 0, 0));
            PQclear(r);
        }
        (*n)++;
        if (got != json_integer_value(c)) {
            printf("BAD  table %s: %lld rows restored, %lld at backup time\n", t, got,
                   (long long)json_integer_value(c));
            differ++;
        }
    }
    return differ;
}

/* 0: restored and every count equal; 1: differs or failed (printed); -1: no PostgreSQL server
 * binaries here (skipped, said so). */
static int s_scratch_restore(const char *snap, const unsigned char key[32], json_t *m)
{
    char bin[256];
    if (!s_pg_bindir(bin, sizeof bin)) {
        printf("scratch restore: skipped (no PostgreSQL server binaries in /usr/lib/postgresql)\n");
        return -1;
    }
    char dir[] = "/tmp/kp-verify-XXXXXX";
    if (!mkdtemp(dir)) return 1;
    bool root = geteuid() == 0;
    char data[64], run[64], initdb[300], pgctl[300], opts[200], log[80];
    snprintf(data, sizeof data, "%s/data", dir);
    snprintf(run, sizeof run, "%s/run", dir);
    snprintf(log, sizeof log, "%s/postgres.log", dir);
    snprintf(initdb, sizeof initdb, "%s/initdb", bin);
    snprintf(pgctl, sizeof pgctl, "%s/pg_ctl", bin);
    int port = 20000 + (int)(getpid() % 20000);
    snprintf(opts, sizeof opts,
             "-c listen_addresses='' -c unix_socket_directories='%s' -p %d "
             "-c fsync=off",
             run, port);
    int rc = 1;
    bool started = false;
    mkdir(run, 0700);
    chmod(dir, 0755);
    if (root) {
        char *chown_argv[] = {"chown", "-R", "postgres:", dir, NULL};
        if (!s_run(chown_argv)) {
            printf("scratch restore: cannot hand %s to the postgres user\n", dir);
            goto out;
        }
    }
    {
        char *a[] = {
            "runuser", "-u",      "postgres",     "--",        initdb, "-D",   data,
            "-U",      "klinika", "--auth=trust", "--no-sync", "-E",   "UTF8", "--locale=C.UTF-8",
            NULL};
        if (!s_run(root ? a : a + 4)) {
            printf("scratch restore: initdb failed\n");
            goto out;
        }
        char *b[] = {"runuser", "-u", "postgres", "--", pgctl, "-D", data,    "-w",
                     "-t",      "60", "-l",       log,  "-o",  opts, "start", NULL};
        if (!s_run(root ? b : b + 4)) {
            printf("scratch restore: the scratch server did not start (see %s)\n", log);
            goto out;
        }
        started = true;
    }
    char conninfo[256];
    snprintf(conninfo, sizeof conninfo, "host=%s port=%d dbname=postgres user=klinika", run, port);
    kp_db_t *db = kp_db_connect(conninfo, 10, false, NULL);
    if (!db || kp_db_run(db, "CREATE DATABASE verify", 0, NULL)) {
        kp_db_destroy(&db);
        printf("scratch restore: cannot create the scratch database\n");
        goto out;
    }
    kp_db_destroy(&db);
    snprintf(conninfo, sizeof conninfo, "host=%s port=%d dbname=verify user=klinika", run, port);
    if (!s_restore_dump(conninfo, snap, key, m)) goto out;
    db = kp_db_connect(conninfo, 10, false, NULL);
    if (!db) goto out;
    int n = 0, differ = s_compare_counts(db, m, &n);
    kp_db_destroy(&db);
    printf("scratch restore: %d tables restored, %d with the counts of the backup\n", n,
           n - differ);
    rc = differ ? 1 : 0;
out:
    if (started) {
        char *s[] = {"runuser", "-u", "postgres", "--", pgctl,  "-D",
                     data,      "-m", "fast",     "-w", "stop", NULL};
        s_run(root ? s : s + 4);
    }
    nftw(dir, s_rm_cb, 16, FTW_DEPTH | FTW_PHYS);
    return rc;
}

/* verify: every object decrypts to the content the manifest says; the dump too, pg_restore
 * reads its table of contents, and (scratch) it restores into a scratch cluster with the row
 * counts of the manifest. Prints each difference; 0 when none. */
static int s_verify(const char *dir, const char *snap, const unsigned char key[32], bool scratch)
{
    const char *why;
    json_t *m = s_load_manifest(snap, key, &why);
    if (!m) {
        printf("snapshot %s: manifest %s\n", snap, why);
        return 1;
    }
    long long bad = 0, ok = 0;
    size_t i;
    json_t *f;
    bool tty = isatty(STDERR_FILENO);
    json_array_foreach(json_object_get(m, "files"), i, f)
    {
        const char *rel = json_string_value(json_object_get(f, "path"));
        const char *sha = json_string_value(json_object_get(f, "sha256"));
        char obj[PATH_MAX], got[65];
        if (!rel || !sha) continue;
        s_object_path(dir, key, sha, obj, sizeof obj);
        int rc = kp_crypt_decrypt(obj, key, NULL, NULL, got, &why);
        if (rc) {
            printf("BAD  %s: %s\n", rel, why ? why : kp_strerror(rc));
            bad++;
        } else if (strcmp(got, sha)) {
            printf("BAD  %s: content differs from the manifest\n", rel);
            bad++;
        } else {
            ok++;
        }
        if (tty && i % 100 == 0) fprintf(stderr, "\r  %zu files checked", i);
    }
    if (tty) fprintf(stderr, "\n");
    /* the dump: decrypts, matches, and pg_restore can read its table of contents */
    char path[PATH_MAX + 16], got[65];
    snprintf(path, sizeof path, "%s/db.enc", snap);
    char *list_argv[] = {"pg_restore", "--list", NULL};
    int pfd = -1;
    pid_t pid = s_spawn_pipe(list_argv, true, &pfd);
    s_fd_t sink = {.fd = pfd, .lenient = true};
    int rc = pid < 0 ? KP_EIO : kp_crypt_decrypt(path, key, s_to_fd, &sink, got, &why);
    if (pfd >= 0) close(pfd);
    bool list_ok = pid >= 0 && s_wait_ok(pid, "pg_restore --list");
    const char *want = json_string_value(json_object_get(json_object_get(m, "db"), "sha256"));
    if (rc || !want || strcmp(got, want) || !list_ok) {
        printf("BAD  database dump: %s\n", rc         ? (why ? why : kp_strerror(rc))
                                           : !list_ok ? "pg_restore cannot read it"
                                                      : "content differs from the manifest");
        bad++;
    }
    if (!bad && scratch) {
        int sr = s_scratch_restore(snap, key, m);
        if (sr > 0) bad++;
    }
    printf("snapshot %s: %lld files intact, %lld problems; database dump %s\n",
           json_string_value(json_object_get(m, "created")), ok, bad,
           bad && (rc || !list_ok) ? "NOT intact" : "intact");
    char *counts = json_dumps(json_object_get(m, "counts"), JSON_COMPACT);
    printf("rows at backup time: %s\n", counts ? counts : "?");
    free(counts);
    json_decref(m);
    return bad ? 1 : 0;
}

/* restore: into an empty installation (no schema in the database); files into storage.root. */
static int s_restore(const kp_config_t *cfg, const char *dir, const char *snap,
                     const unsigned char key[32])
{
    const char *why;
    json_t *m = s_load_manifest(snap, key, &why);
    if (!m) {
        fprintf(stderr, "pacsctl: restore refused: manifest %s\n", why);
        return 1;
    }
    int rc = 1;
    kp_db_t *db = pacsctl_db(cfg, false);
    if (!db) goto out;
    PGresult *r = NULL;
    if (kp_db_exec(db, &r, "SELECT to_regclass('schema_migrations') IS NOT NULL", 0, NULL))
        goto out;
    bool has = !strcmp(PQgetvalue(r, 0, 0), "t");
    PQclear(r);
    if (has) {
        fprintf(stderr, "pacsctl: restore refused: the database already has a schema; restore "
                        "into an empty database (createdb, then point db.conninfo at it)\n");
        goto out;
    }
    /* files first: a restored index never points at a file not yet there */
    kp_storage_t *st = kp_storage_new(cfg->storage_root, cfg->storage_fsync);
    if (!st) goto out;
    size_t i;
    json_t *f;
    long long nfiles = 0;
    bool tty = isatty(STDERR_FILENO);
    json_array_foreach(json_object_get(m, "files"), i, f)
    {
        const char *rel = json_string_value(json_object_get(f, "path"));
        const char *sha = json_string_value(json_object_get(f, "sha256"));
        if (!s_rel_safe(rel) || !sha) {
            fprintf(stderr, "pacsctl: restore refused: unsafe path in the manifest\n");
            kp_storage_destroy(&st);
            goto out;
        }
        char obj[PATH_MAX], got[65], abs[PATH_MAX + 1100], tmp[PATH_MAX + 64];
        s_object_path(dir, key, sha, obj, sizeof obj);
        snprintf(abs, sizeof abs, "%s/%s", cfg->storage_root, rel);
        snprintf(tmp, sizeof tmp, "%s/restore.%d.%zu", kp_storage_tmpdir(st), (int)getpid(), i);
        s_fd_t out = {.fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0640)};
        int dr = out.fd < 0 ? KP_EIO : kp_crypt_decrypt(obj, key, s_to_fd, &out, got, &why);
        bool ok = !dr && !strcmp(got, sha) && fsync(out.fd) == 0;
        if (out.fd >= 0) close(out.fd);
        char pdir[PATH_MAX + 1100];
        snprintf(pdir, sizeof pdir, "%s", abs);
        *strrchr(pdir, '/') = 0;
        if (!ok || s_mkdirs(pdir) || rename(tmp, abs)) {
            unlink(tmp);
            fprintf(stderr, "pacsctl: restore failed at %s: %s\n", rel,
                    dr ? (why ? why : kp_strerror(dr)) : "content differs from the manifest");
            kp_storage_destroy(&st);
            goto out;
        }
        s_fsync_dir(pdir);
        nfiles++;
        if (tty && nfiles % 100 == 0) fprintf(stderr, "\r  %lld files restored", nfiles);
    }
    if (tty) fprintf(stderr, "\n");
    kp_storage_destroy(&st);
    printf("restore: %lld files into %s; database ...\n", nfiles, cfg->storage_root);
    fflush(stdout);
    if (!s_restore_dump(cfg->db_conninfo, snap, key, m)) {
        fprintf(stderr, "pacsctl: restore of the database failed\n");
        goto out;
    }
    /* the rows are those counted at backup time */
    int ntables = 0;
    bool same = s_compare_counts(db, m, &ntables) == 0;
    if (!same) goto out;
    if (pacsctl_app_role(cfg, db)) goto out;
    printf("restore complete: snapshot %s; run pacsctl audit verify to check the audit chain\n",
           json_string_value(json_object_get(m, "created")));
    rc = 0;
out:
    kp_db_destroy(&db);
    json_decref(m);
    return rc;
}

/* Takes DIR/.lock (made with DIR when missing): LOCK_SH for a backup, which waits for a prune to
 * end; LOCK_EX | LOCK_NB for a prune, which gives up while a backup runs. The descriptor (held
 * until exit), or -1 with the reason printed. */
static int s_lock(const char *dir, int how)
{
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/.lock", dir);
    int fd = s_mkdirs(dir) ? -1 : open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0) {
        fprintf(stderr, "pacsctl: cannot open %s: %s\n", path, strerror(errno));
        return -1;
    }
    if (flock(fd, how)) {
        if (errno == EWOULDBLOCK)
            fprintf(stderr, "pacsctl: a backup into %s is under way; prune after it ends\n", dir);
        else
            fprintf(stderr, "pacsctl: cannot lock %s: %s\n", path, strerror(errno));
        close(fd);
        return -1;
    }
    return fd;
}

/* ---- prune ------------------------------------------------------------------------------------
 */

static int s_cmp_desc(const void *a, const void *b)
{
    return -strcmp(*(char *const *)a, *(char *const *)b);
}

/* Keeps the newest `keep` snapshots (their names are UTC times, so they sort by age), removes
 * the others, then every object none of the kept manifests names. Refuses when a kept manifest
 * cannot be read (it could not say which objects it needs). 0 or 1. */
static int s_prune(const char *dir, const unsigned char key[32], long keep)
{
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/snapshots", dir);
    DIR *d = opendir(path);
    if (!d) {
        fprintf(stderr, "pacsctl: %s: %s\n", path, strerror(errno));
        return 1;
    }
    char **names = NULL;
    size_t n = 0, cap = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        size_t nl = strlen(e->d_name);
        /* not a snapshot: hidden entries, and ID.tmp of a backup under way or one that failed */
        if (e->d_name[0] == '.' || (nl > 4 && !strcmp(e->d_name + nl - 4, ".tmp"))) continue;
        if (n == cap) {
            cap = cap ? 2 * cap : 64;
            names = realloc(names, cap * sizeof *names);
            if (!names) abort();
        }
        names[n] = strdup(e->d_name);
        if (!names[n]) abort();
        n++;
    }
    closedir(d);
    qsort(names, n, sizeof *names, s_cmp_desc);
    int rc = 1;
    /* the objects the kept snapshots need: their names, as the backup made them */
    json_t *need = json_object();
    if (!need) abort();
    for (size_t i = 0; i < n && (long)i < keep; i++) {
        char snap[PATH_MAX];
        snprintf(snap, sizeof snap, "%s/snapshots/%s", dir, names[i]);
        const char *why = NULL;
        json_t *m = s_load_manifest(snap, key, &why);
        if (!m) {
            fprintf(stderr, "pacsctl: prune refused: snapshot %s: manifest %s\n", names[i], why);
            goto out;
        }
        size_t k;
        json_t *f;
        json_array_foreach(json_object_get(m, "files"), k, f)
        {
            const char *sha = json_string_value(json_object_get(f, "sha256"));
            if (!sha) continue;
            char obj[PATH_MAX];
            s_object_path(dir, key, sha, obj, sizeof obj);
            json_object_set_new(need, obj, json_true());
        }
        json_decref(m);
    }
    long removed_snaps = 0, removed_objs = 0;
    for (size_t i = (size_t)(keep < 0 ? 0 : keep); i < n; i++) {
        char snap[PATH_MAX];
        snprintf(snap, sizeof snap, "%s/snapshots/%s", dir, names[i]);
        if (nftw(snap, s_rm_cb, 16, FTW_DEPTH | FTW_PHYS)) {
            fprintf(stderr, "pacsctl: cannot remove %s: %s\n", snap, strerror(errno));
            goto out;
        }
        printf("removed snapshot %s\n", names[i]);
        removed_snaps++;
    }
    snprintf(path, sizeof path, "%s/objects", dir);
    DIR *od = opendir(path);
    struct dirent *sub;
    while (od && (sub = readdir(od))) {
        if (sub->d_name[0] == '.') continue;
        char sd[PATH_MAX + 256];
        snprintf(sd, sizeof sd, "%s/%s", path, sub->d_name);
        DIR *x = opendir(sd);
        struct dirent *o;
        while (x && (o = readdir(x))) {
            if (o->d_name[0] == '.') continue;
            char obj[PATH_MAX + 512];
            snprintf(obj, sizeof obj, "%s/%s", sd, o->d_name);
            if (json_object_get(need, obj)) continue;
            if (unlink(obj) == 0) removed_objs++;
        }
        if (x) closedir(x);
    }
    if (od) closedir(od);
    printf("pruned %s: %ld snapshot(s) and %ld object(s) removed, %zu snapshot(s) kept\n", dir,
           removed_snaps, removed_objs, n < (size_t)keep ? n : (size_t)keep);
    rc = 0;
out:
    json_decref(need);
    for (size_t i = 0; i < n; i++)
        free(names[i]);
    free(names);
    return rc;
}

/* ---- schedule ---------------------------------------------------------------------------------
 */

static int s_schedule(const kp_config_t *cfg, const char *dir, const char *at, const char *keyfile)
{
    int hh, mm;
    if (sscanf(at, "%d:%d", &hh, &mm) != 2 || hh < 0 || hh > 23 || mm < 0 || mm > 59) {
        fprintf(stderr, "pacsctl: --at wants HH:MM\n");
        return 2;
    }
    /* a timer runs elsewhere: absolute paths for the key, the target and the config */
    char kabs[PATH_MAX], dabs[PATH_MAX], cabs[PATH_MAX];
    if (realpath(keyfile, kabs)) keyfile = kabs;
    if (realpath(dir, dabs)) dir = dabs;
    char conf[PATH_MAX + 16] = "";
    if (cfg->path && *cfg->path)
        snprintf(conf, sizeof conf, " --config %s", realpath(cfg->path, cabs) ? cabs : cfg->path);
    if (keyfile[0] != '/' || dir[0] != '/')
        fprintf(stderr, "pacsctl: warning: %s is a relative path; give it absolute in the units\n",
                keyfile[0] != '/' ? keyfile : dir);
    printf("# Nightly backup of Klinika PACS at %02d:%02d into %s (key %s), then the audit\n"
           "# chain check for monitoring, then pruning to the newest 14 snapshots.\n"
           "# Save the first block as /etc/systemd/system/klinika-backup.service, the second as\n"
           "# /etc/systemd/system/klinika-backup.timer, then: systemctl daemon-reload &&\n"
           "# systemctl enable --now klinika-backup.timer (or use the crontab line instead).\n"
           "# Keep a copy of the key apart from the backups; test a restore now and then with\n"
           "# pacsctl backup verify %s/snapshots/<ID>.\n\n",
           hh, mm, dir, keyfile, dir);
    /* the three steps, the same in the service and in the crontab line */
    char backup[4 * PATH_MAX], verify[PATH_MAX + 128], prune[4 * PATH_MAX];
    snprintf(backup, sizeof backup, "/usr/bin/pacsctl%s backup %s --key %s", conf, dir, keyfile);
    snprintf(verify, sizeof verify,
             "/usr/bin/pacsctl%s audit verify --textfile "
             "/var/lib/node_exporter/textfile/klinika_audit.prom",
             conf);
    snprintf(prune, sizeof prune, "/usr/bin/pacsctl%s backup prune %s --keep 14 --key %s", conf,
             dir, keyfile);
    printf("[Unit]\nDescription=Klinika PACS nightly backup\nAfter=postgresql.service\n\n"
           "[Service]\nType=oneshot\nUser=klinika\nExecStart=%s\nExecStart=%s\nExecStart=%s\n\n",
           backup, verify, prune);
    printf("[Unit]\nDescription=Klinika PACS nightly backup\n\n[Timer]\n"
           "OnCalendar=*-*-* %02d:%02d:00\nPersistent=true\nRandomizedDelaySec=300\n\n"
           "[Install]\nWantedBy=timers.target\n\n",
           hh, mm);
    printf("# crontab (user klinika):\n%d %d * * * %s && %s && %s\n", mm, hh, backup, verify,
           prune);
    return 0;
}

/* DIR/snapshots/ID -> DIR */
static bool s_split(const char *snap, char *dir, size_t dirlen)
{
    snprintf(dir, dirlen, "%s", snap);
    size_t l = strlen(dir);
    while (l > 1 && dir[l - 1] == '/')
        dir[--l] = 0;
    char *s = strrchr(dir, '/');
    if (!s) return false;
    *s = 0;
    s = strrchr(dir, '/');
    if (!s || strcmp(s + 1, "snapshots")) return false;
    *s = 0;
    if (!*dir) snprintf(dir, dirlen, "/");
    return true;
}

int pacsctl_backup(const kp_config_t *cfg, int argc, char **argv, bool restore)
{
    const char *keyfile = cfg->backup_key_file, *target = NULL, *at = "02:30";
    bool verify = false, keygen = false, scratch = true, prune = false, schedule = false;
    long keep = -1;
    for (int i = 0; i < argc; i++) {
        if (!strcmp(argv[i], "--key") && i + 1 < argc)
            keyfile = argv[++i];
        else if (!strcmp(argv[i], "--no-scratch"))
            scratch = false;
        else if (!strcmp(argv[i], "--keep") && i + 1 < argc) {
            char *end = NULL;
            keep = strtol(argv[++i], &end, 10);
            if (end == argv[i] || *end) keep = -1; /* not a number: refused below */
        } else if (!strcmp(argv[i], "--at") && i + 1 < argc)
            at = argv[++i];
        else if (!restore && i == 0 && !strcmp(argv[i], "verify"))
            verify = true;
        else if (!restore && i == 0 && !strcmp(argv[i], "keygen"))
            keygen = true;
        else if (!restore && i == 0 && !strcmp(argv[i], "prune"))
            prune = true;
        else if (!restore && i == 0 && !strcmp(argv[i], "schedule"))
            schedule = true;
        else if (!target && argv[i][0] != '-')
            target = argv[i];
        else
            target = NULL, i = argc;
    }
    if (!target || (prune && keep < 1)) {
        fprintf(stderr, "usage: pacsctl backup keygen FILE | backup DIR [--key F] | backup "
                        "verify DIR/snapshots/ID [--no-scratch] [--key F] | backup prune DIR "
                        "--keep N (N >= 1) [--key F] | backup schedule DIR [--at HH:MM] | restore "
                        "DIR/snapshots/ID [--key F]\n");
        return 2;
    }
    if (schedule) return s_schedule(cfg, target, at, keyfile);
    if (keygen) return s_keygen(target);
    /* a child (pg_dump, pg_restore) that exits early must give EPIPE, not kill us */
    signal(SIGPIPE, SIG_IGN);
    unsigned char key[32];
    if (s_key_load(keyfile, key)) return 1;
    int rc;
    if (prune) {
        int lock = s_lock(target, LOCK_EX | LOCK_NB);
        rc = lock < 0 ? 1 : s_prune(target, key, keep);
        if (lock >= 0) close(lock);
    } else if (!verify && !restore) {
        int lock = s_lock(target, LOCK_SH);
        rc = lock < 0 ? 1 : s_backup(cfg, target, key);
        if (lock >= 0) close(lock);
    } else {
        char dir[PATH_MAX];
        if (!s_split(target, dir, sizeof dir)) {
            fprintf(stderr, "pacsctl: %s is not DIR/snapshots/ID\n", target);
            rc = 2;
        } else {
            rc = verify ? s_verify(dir, target, key, scratch) : s_restore(cfg, dir, target, key);
        }
    }
    OPENSSL_cleanse(key, sizeof key);
    return rc;
}
