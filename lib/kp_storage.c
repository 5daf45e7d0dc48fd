/* kp_storage: durable file store (see kp_storage.h). */
#include "kp_storage.h"

#include "kp_errors.h"
#include "kp_log.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <openssl/evp.h>
#include <openssl/sha.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

struct kp_storage {
    char *root;
    char *tmpdir;
    bool fsync_on;
};

static int s_mkdir_p(const char *path)
{
    char buf[PATH_MAX];
    if (snprintf(buf, sizeof buf, "%s", path) >= (int)sizeof buf) return KP_EINVAL;
    for (char *p = buf + 1; *p; p++) {
        if (*p != '/') continue;
        *p = 0;
        if (mkdir(buf, 0750) && errno != EEXIST) return KP_EIO;
        *p = '/';
    }
    if (mkdir(buf, 0750) && errno != EEXIST) return KP_EIO;
    return 0;
}

static int s_fsync_fd_path(const char *path, int flags)
{
    int fd = open(path, flags | O_CLOEXEC);
    if (fd < 0) return KP_EIO;
    int rc = fsync(fd) ? KP_EIO : 0;
    close(fd);
    return rc;
}

kp_storage_t *kp_storage_new(const char *root, bool fsync_on)
{
    kp_storage_t *st = calloc(1, sizeof *st);
    if (!st) abort();
    char *abs = NULL;
    if (root[0] == '/') {
        abs = strdup(root);
    } else {
        char cwd[PATH_MAX];
        if (!getcwd(cwd, sizeof cwd)) goto error;
        if (asprintf(&abs, "%s/%s", cwd, root) < 0) abs = NULL;
    }
    if (!abs) abort();
    size_t l = strlen(abs);
    while (l > 1 && abs[l - 1] == '/')
        abs[--l] = 0;
    st->root = abs;
    if (asprintf(&st->tmpdir, "%s/.tmp", abs) < 0) abort();
    st->fsync_on = fsync_on;
    if (s_mkdir_p(st->root) || s_mkdir_p(st->tmpdir)) {
        kp_error("storage", "cannot create storage directory %s: %s", st->tmpdir, strerror(errno));
        goto error;
    }
    /* The 256 top-level directories exist from the start, so a store never has to make one. */
    bool made = false;
    for (int i = 0; i < 256; i++) {
        char dir[PATH_MAX];
        snprintf(dir, sizeof dir, "%s/%02x", st->root, i);
        if (mkdir(dir, 0750) == 0)
            made = true;
        else if (errno != EEXIST) {
            kp_error("storage", "cannot create %s: %s", dir, strerror(errno));
            goto error;
        }
    }
    if (made && fsync_on) s_fsync_fd_path(st->root, O_RDONLY | O_DIRECTORY);
    if (access(st->tmpdir, W_OK)) {
        kp_error("storage", "storage directory %s is not writable: %s", st->tmpdir,
                 strerror(errno));
        goto error;
    }
    return st;
error:
    kp_storage_destroy(&st);
    return NULL;
}

void kp_storage_destroy(kp_storage_t **stp)
{
    if (!stp || !*stp) return;
    free((*stp)->root);
    free((*stp)->tmpdir);
    free(*stp);
    *stp = NULL;
}

const char *kp_storage_root(const kp_storage_t *st)
{
    return st->root;
}
const char *kp_storage_tmpdir(const kp_storage_t *st)
{
    return st->tmpdir;
}

void kp_storage_relpath(const char *sop_uid, char out[KP_STORAGE_RELPATH_MAX])
{
    unsigned char md[SHA256_DIGEST_LENGTH];
    SHA256((const unsigned char *)sop_uid, strlen(sop_uid), md);
    char hex[65];
    for (int i = 0; i < SHA256_DIGEST_LENGTH; i++)
        snprintf(hex + 2 * i, 3, "%02x", md[i]);
    snprintf(out, KP_STORAGE_RELPATH_MAX, "%.2s/%.2s/%s.dcm", hex, hex + 2, hex);
}

bool kp_storage_relpath_valid(const char *rel)
{
    if (!rel || strlen(rel) != 6 + 64 + 4) return false;
    for (int i = 0; i < 74; i++) {
        char c = rel[i];
        if (i == 2 || i == 5) {
            if (c != '/') return false;
        } else if (i >= 70) {
            if (c != ".dcm"[i - 70]) return false;
        } else if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) {
            return false;
        }
    }
    return rel[0] == rel[6] && rel[1] == rel[7] && rel[3] == rel[8] && rel[4] == rel[9];
}

char *kp_storage_abspath(const kp_storage_t *st, const char *rel)
{
    char *p;
    if (asprintf(&p, "%s/%s", st->root, rel) < 0) abort();
    return p;
}

int kp_storage_fsync_path(const kp_storage_t *st, const char *path)
{
    if (!st->fsync_on) return 0;
    int rc = s_fsync_fd_path(path, O_RDONLY);
    if (rc) kp_error("storage", "fsync %s failed: %s", path, strerror(errno));
    return rc;
}

int kp_storage_sync_dir(kp_storage_t *st, const char *rel)
{
    if (!st->fsync_on) return 0;
    /* The leaf holds the new name; its parent holds the leaf's name when the leaf was just
     * made. fsync of a directory that has nothing unwritten returns at once. */
    char dir[PATH_MAX];
    snprintf(dir, sizeof dir, "%s/%.5s", st->root, rel);
    int rc = s_fsync_fd_path(dir, O_RDONLY | O_DIRECTORY);
    if (!rc) {
        snprintf(dir, sizeof dir, "%s/%.2s", st->root, rel);
        rc = s_fsync_fd_path(dir, O_RDONLY | O_DIRECTORY);
    }
    if (rc) kp_error("storage", "fsync of directory %s failed: %s", dir, strerror(errno));
    return rc;
}

/* kp_storage_commit for a relative path of the aa/bb/<64 hex>.<ext> shape, checked by the
 * caller. */
static int s_commit(kp_storage_t *st, const char *tmp_path, const char *rel, bool defer_dir_sync)
{
    int rc = kp_storage_fsync_path(st, tmp_path);
    if (rc) return rc;
    char *dst = kp_storage_abspath(st, rel);
    if (rename(tmp_path, dst) != 0) {
        if (errno != ENOENT) goto fail;
        /* The leaf directory is made on first use (the 256 top ones exist from the start); its
         * entry in the parent is made durable by kp_storage_sync_dir. */
        char dir[PATH_MAX];
        snprintf(dir, sizeof dir, "%s/%.5s", st->root, rel);
        if (mkdir(dir, 0750) && errno != EEXIST) {
            snprintf(dir, sizeof dir, "%s/%.2s", st->root, rel);
            if (mkdir(dir, 0750) && errno != EEXIST) goto fail;
            snprintf(dir, sizeof dir, "%s/%.5s", st->root, rel);
            if (mkdir(dir, 0750) && errno != EEXIST) goto fail;
            if (st->fsync_on) s_fsync_fd_path(st->root, O_RDONLY | O_DIRECTORY);
        }
        if (rename(tmp_path, dst)) goto fail;
    }
    free(dst);
    return defer_dir_sync ? 0 : kp_storage_sync_dir(st, rel);
fail:
    kp_error("storage", "cannot store %s: %s", rel, strerror(errno));
    free(dst);
    return KP_EIO;
}

int kp_storage_commit(kp_storage_t *st, const char *tmp_path, const char *rel, bool defer_dir_sync)
{
    if (!kp_storage_relpath_valid(rel)) return KP_EINVAL;
    return s_commit(st, tmp_path, rel, defer_dir_sync);
}

int kp_storage_tmpfile(kp_storage_t *st, char **path)
{
    if (asprintf(path, "%s/in-XXXXXX", st->tmpdir) < 0) abort();
    int fd = mkostemp(*path, O_CLOEXEC);
    if (fd < 0) {
        kp_error("storage", "cannot create a temp file in %s: %s", st->tmpdir, strerror(errno));
        free(*path);
        *path = NULL;
        return KP_EIO;
    }
    return fd;
}

int kp_storage_write(kp_storage_t *st, const char *rel, const void *buf, size_t len)
{
    char *tmp = NULL;
    int rc = KP_EIO;
    int fd = kp_storage_tmpfile(st, &tmp);
    if (fd < 0) return fd;
    const char *p = buf;
    while (len) {
        ssize_t w = write(fd, p, len);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) {
            kp_error("storage", "write to %s failed: %s", tmp, strerror(errno));
            goto error;
        }
        p += w;
        len -= (size_t)w;
    }
    if (st->fsync_on && fsync(fd)) goto error;
    close(fd);
    fd = -1;
    rc = kp_storage_commit(st, tmp, rel, false);
    if (rc) goto error;
    free(tmp);
    return 0;
error:
    if (fd >= 0) close(fd);
    unlink(tmp);
    free(tmp);
    return rc;
}

int kp_storage_sha256_file(const char *path, char hex[65], int64_t *size)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return KP_EIO;
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    if (!ctx) abort();
    EVP_DigestInit_ex(ctx, EVP_sha256(), NULL);
    static __thread unsigned char buf[1 << 16];
    int64_t total = 0;
    int rc = 0;
    for (;;) {
        ssize_t r = read(fd, buf, sizeof buf);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) {
            rc = KP_EIO;
            break;
        }
        if (r == 0) break;
        EVP_DigestUpdate(ctx, buf, (size_t)r);
        total += r;
    }
    close(fd);
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int mdlen = 0;
    EVP_DigestFinal_ex(ctx, md, &mdlen);
    EVP_MD_CTX_free(ctx);
    if (rc) return rc;
    for (unsigned i = 0; i < mdlen && i < 32; i++)
        snprintf(hex + 2 * i, 3, "%02x", md[i]);
    hex[64] = 0;
    if (size) *size = total;
    return 0;
}

int kp_storage_same_content(const char *a, const char *b)
{
    int rc = KP_EIO;
    int fa = open(a, O_RDONLY | O_CLOEXEC), fb = open(b, O_RDONLY | O_CLOEXEC);
    static __thread unsigned char ba[1 << 16], bb[1 << 16];
    if (fa < 0 || fb < 0) goto done;
    for (;;) {
        ssize_t ra = read(fa, ba, sizeof ba);
        if (ra < 0) goto done;
        size_t got = 0;
        while (got < (size_t)ra) { /* read the same amount from b */
            ssize_t rb = read(fb, bb + got, (size_t)ra - got);
            if (rb < 0) goto done;
            if (rb == 0) break;
            got += (size_t)rb;
        }
        if (got != (size_t)ra || memcmp(ba, bb, got)) {
            rc = 0;
            goto done;
        }
        if (ra == 0) {
            rc = 1;
            goto done;
        }
    }
done:
    if (fa >= 0) close(fa);
    if (fb >= 0) close(fb);
    return rc;
}

/* ---- the original's note (see kp_storage.h) ------------------------------------------------ */

/* "klinika-original 1 <size> <sha256>\n": a version, so a later format is recognised. */
#define S_NOTE_MAGIC "klinika-original 1 "

void kp_storage_original_relpath(const char *sop_uid, char out[KP_STORAGE_RELPATH_MAX])
{
    kp_storage_relpath(sop_uid, out);
    size_t n = strlen(out) - 4; /* the instance's name without ".dcm" */
    snprintf(out + n, KP_STORAGE_RELPATH_MAX - n, ".orig");
}

static bool s_is_sha256(const char *s)
{
    return strlen(s) == 64 && strspn(s, "0123456789abcdef") == 64;
}

int kp_storage_original_write(kp_storage_t *st, const char *sop_uid, int64_t size,
                              const char *sha256)
{
    if (size < 0 || !s_is_sha256(sha256)) return KP_EINVAL;
    char rel[KP_STORAGE_RELPATH_MAX], text[128], *tmp = NULL;
    kp_storage_original_relpath(sop_uid, rel);
    int len = snprintf(text, sizeof text, S_NOTE_MAGIC "%lld %s\n", (long long)size, sha256);
    int fd = kp_storage_tmpfile(st, &tmp);
    if (fd < 0) return fd;
    int rc = write(fd, text, (size_t)len) == len ? 0 : KP_EIO;
    close(fd);
    if (!rc) rc = s_commit(st, tmp, rel, false); /* fsync, rename, directory fsync */
    if (rc) {
        kp_error("storage", "cannot write %s: %s", rel, strerror(errno));
        unlink(tmp);
    }
    free(tmp);
    return rc;
}

int kp_storage_original_read(kp_storage_t *st, const char *sop_uid, int64_t *size, char sha256[65])
{
    char rel[KP_STORAGE_RELPATH_MAX], path[PATH_MAX], text[129];
    kp_storage_original_relpath(sop_uid, rel);
    snprintf(path, sizeof path, "%s/%s", st->root, rel);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        if (errno == ENOENT) return 0;
        kp_error("storage", "cannot open %s: %s", path, strerror(errno));
        return KP_EIO;
    }
    ssize_t n = read(fd, text, sizeof text - 1);
    close(fd);
    text[n > 0 ? n : 0] = 0;
    long long sz = -1;
    char hex[65] = "";
    size_t ml = strlen(S_NOTE_MAGIC);
    if (n <= 0 || strncmp(text, S_NOTE_MAGIC, ml) ||
        sscanf(text + ml, "%lld %64[0-9a-f]", &sz, hex) != 2 || sz < 0 || !s_is_sha256(hex)) {
        kp_error("storage", "%s is not a note of an original (ignored)", path);
        return KP_EIO;
    }
    *size = sz;
    memcpy(sha256, hex, 65);
    return 1;
}

int kp_storage_original_remove(kp_storage_t *st, const char *sop_uid)
{
    char rel[KP_STORAGE_RELPATH_MAX], path[PATH_MAX];
    kp_storage_original_relpath(sop_uid, rel);
    snprintf(path, sizeof path, "%s/%s", st->root, rel);
    if (unlink(path)) {
        if (errno == ENOENT) return 0;
        kp_error("storage", "cannot remove %s: %s", path, strerror(errno));
        return KP_EIO;
    }
    return kp_storage_sync_dir(st, rel);
}

int kp_storage_file_is(const char *path, int64_t size, const char *sha256)
{
    struct stat sb;
    if (stat(path, &sb)) return KP_EIO;
    if ((int64_t)sb.st_size != size) return 0;
    char hex[65];
    int64_t got = 0;
    if (kp_storage_sha256_file(path, hex, &got)) return KP_EIO;
    return got == size && !strcmp(hex, sha256);
}

static bool s_is_hex2(const char *n)
{
    return strlen(n) == 2 && strspn(n, "0123456789abcdef") == 2;
}

int kp_storage_walk(kp_storage_t *st, int (*fn)(void *user, const char *rel), void *user)
{
    int rc = 0;
    DIR *top = opendir(st->root);
    if (!top) return KP_EIO;
    struct dirent *a;
    while (!rc && (a = readdir(top))) {
        if (!s_is_hex2(a->d_name)) continue;
        char p1[PATH_MAX];
        if (snprintf(p1, sizeof p1, "%s/%.2s", st->root, a->d_name) >= (int)sizeof p1) continue;
        DIR *d1 = opendir(p1);
        if (!d1) continue;
        struct dirent *b;
        while (!rc && (b = readdir(d1))) {
            if (!s_is_hex2(b->d_name)) continue;
            char p2[PATH_MAX];
            if (snprintf(p2, sizeof p2, "%s/%s", p1, b->d_name) >= (int)sizeof p2) continue;
            DIR *d2 = opendir(p2);
            if (!d2) continue;
            struct dirent *c;
            while (!rc && (c = readdir(d2))) {
                char rel[KP_STORAGE_RELPATH_MAX + 8];
                if (snprintf(rel, sizeof rel, "%.2s/%.2s/%s", a->d_name, b->d_name, c->d_name) <
                        (int)sizeof rel &&
                    kp_storage_relpath_valid(rel))
                    rc = fn(user, rel);
            }
            closedir(d2);
        }
        closedir(d1);
    }
    closedir(top);
    return rc;
}

int kp_storage_clean_tmp(kp_storage_t *st, int max_age_s)
{
    DIR *d = opendir(st->tmpdir);
    if (!d) return 0;
    int n = 0;
    /* A precise clock: file times can be finer than time()'s coarse one, and a file made this
     * instant must not look as if it came from the future. */
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    time_t now = ts.tv_sec;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.') continue;
        char p[PATH_MAX];
        snprintf(p, sizeof p, "%s/%s", st->tmpdir, e->d_name);
        struct stat sb;
        if (stat(p, &sb) == 0 && S_ISREG(sb.st_mode) && now - sb.st_mtime >= max_age_s &&
            unlink(p) == 0)
            n++;
    }
    closedir(d);
    return n;
}
